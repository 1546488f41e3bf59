"""Events produced by :class:`~service.pop3.connection.POP3Connection` from server bytes.

One event per call of ``next_event()``:

- :class:`Greeting`: the server's ``+OK`` banner (a ``-ERR`` banner is an :class:`Err`
  whose ``command`` is ``None``);
- :class:`Ok` / :class:`Err`: a single-line reply to ``command``;
- :class:`Continuation`: a SASL challenge (``+ ...``) during AUTH;
- :class:`ResponseStart`, then zero or more :class:`ResponseData`, then
  :class:`ResponseEnd`: a multi-line reply. The data is already dot-unstuffed, with CRLF
  line ends, and is delivered in chunks so a large message is never held twice;
- :class:`ConnectionClosed`: the server closed the connection with no reply due;
- :data:`NEED_DATA`: nothing complete yet, feed more bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal

from .commands import Command


class _NeedData(Enum):
    NEED_DATA = "NEED_DATA"


#: Sentinel returned by ``next_event()`` when more bytes are needed.
NEED_DATA: Final = _NeedData.NEED_DATA
NeedData = Literal[_NeedData.NEED_DATA]


class Event:
    """Base of all events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Greeting(Event):
    """The server's ``+OK`` banner."""

    text: str


@dataclass(frozen=True, slots=True)
class Ok(Event):
    """A single-line ``+OK`` reply."""

    command: Command
    text: str


@dataclass(frozen=True, slots=True)
class Err(Event):
    """A ``-ERR`` reply (always a single line); ``command`` is ``None`` for the greeting.

    ``response_code`` is the bracketed RFC 2449 code (``IN-USE``, ``SYS/TEMP``...) if any.
    """

    command: Command | None
    text: str
    response_code: str | None


@dataclass(frozen=True, slots=True)
class Continuation(Event):
    """A SASL challenge (``+ base64``) in the middle of AUTH."""

    command: Command
    challenge: str


@dataclass(frozen=True, slots=True)
class ResponseStart(Event):
    """The ``+OK`` line of a multi-line reply; data and an end follow."""

    command: Command
    text: str


@dataclass(frozen=True, slots=True)
class ResponseData(Event):
    """A chunk of a multi-line reply, dot-unstuffed, CRLF line ends kept."""

    command: Command
    data: bytes


@dataclass(frozen=True, slots=True)
class ResponseEnd(Event):
    """The terminating ``.`` of a multi-line reply was read."""

    command: Command


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The server closed the connection and no reply was outstanding."""
