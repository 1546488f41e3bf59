"""Parsers for reply payloads: CAPA, STAT, LIST and UIDL (sans-IO, strict).

Anything malformed is a :class:`RemoteProtocolError`: a server whose listings cannot be
trusted must not be trusted with DELE either.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import RemoteProtocolError

#: RFC 1939 section 7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
_UNIQUE_ID = re.compile(rb"[\x21-\x7e]{1,70}")
# Decimal numbers only (int() would also take "+1", " 1" and "1_0"); 20 digits is plenty.
_NUMBER = re.compile(rb"[0-9]{1,20}")
_RESPONSE_CODE = re.compile(r"\[([A-Za-z0-9/_-]{1,64})\]")


class MailboxStatus(NamedTuple):
    """The reply to STAT: messages not marked deleted and their total size in octets."""

    messages: int
    size: int


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the server advertised in reply to CAPA (RFC 2449).

    ``entries`` maps each upper-cased capability name to its arguments. ``supported`` is
    ``False`` when the server answered ``-ERR`` to CAPA (an RFC 1939-only server): then
    nothing is known and the client assumes USER/PASS, TOP and UIDL and no pipelining.
    """

    entries: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    supported: bool = True

    @classmethod
    def unsupported(cls) -> Capabilities:
        """The capabilities of a server that does not implement CAPA."""
        return cls({}, supported=False)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.upper() in self.entries

    @property
    def pipelining(self) -> bool:
        """Whether commands may be sent without waiting for each reply (RFC 2449)."""
        return "PIPELINING" in self.entries

    @property
    def stls(self) -> bool:
        """Whether STLS is offered (RFC 2595)."""
        return "STLS" in self.entries

    @property
    def user(self) -> bool:
        """Whether USER/PASS is offered (assumed when CAPA is not supported)."""
        return "USER" in self.entries or not self.supported

    @property
    def sasl(self) -> frozenset[str]:
        """The SASL mechanisms offered for AUTH, upper-cased."""
        return frozenset(arg.upper() for arg in self.entries.get("SASL", ()))

    @property
    def login_delay(self) -> int | None:
        """Minimum seconds between logins (``LOGIN-DELAY``), or ``None`` if not announced."""
        args = self.entries.get("LOGIN-DELAY")
        if not args or not args[0].isdecimal():
            return None
        return int(args[0])

    @property
    def per_user(self) -> bool:
        """Whether LOGIN-DELAY or EXPIRE say their value is only known after login."""
        return any(
            "USER" in (arg.upper() for arg in self.entries.get(name, ())[1:])
            for name in ("LOGIN-DELAY", "EXPIRE")
        )

    @property
    def expire(self) -> str | None:
        """The ``EXPIRE`` policy argument (days or ``NEVER``), if announced."""
        args = self.entries.get("EXPIRE")
        return args[0] if args else None

    @property
    def implementation(self) -> str | None:
        """The server software named in ``IMPLEMENTATION``, if announced."""
        args = self.entries.get("IMPLEMENTATION")
        return " ".join(args) if args else None


def parse_capabilities(body: bytes) -> Capabilities:
    """Parse the body of a CAPA reply (one capability per line)."""
    entries: dict[str, tuple[str, ...]] = {}
    for raw in _lines(body):
        words = raw.decode("utf-8", "replace").split()
        if words:
            entries[words[0].upper()] = tuple(words[1:])
    return Capabilities(entries)


def parse_stat(text: str) -> MailboxStatus:
    """Parse the text after ``+OK`` in a STAT reply: ``count size``."""
    parts = text.split()
    if len(parts) < 2:
        raise RemoteProtocolError(f"malformed STAT reply: {text[:80]!r}")
    return MailboxStatus(_number(parts[0], "STAT"), _number(parts[1], "STAT"))


def parse_scan_line(text: str, expected: int | None = None) -> tuple[int, int]:
    """Parse ``n size`` (a LIST line or the reply to ``LIST n``); extra words are ignored."""
    parts = text.split()
    if len(parts) < 2:
        raise RemoteProtocolError(f"malformed LIST line: {text[:80]!r}")
    number = _number(parts[0], "LIST")
    if expected is not None and number != expected:
        raise RemoteProtocolError(f"LIST {expected} answered for message {number}")
    return number, _number(parts[1], "LIST")


def parse_listing(body: bytes) -> dict[int, int]:
    """Parse the body of ``LIST``: message number to size; duplicates are an error."""
    sizes: dict[int, int] = {}
    for raw in _lines(body):
        number, size = parse_scan_line(raw.decode("ascii", "replace"))
        if number in sizes:
            raise RemoteProtocolError(f"LIST names message {number} twice")
        sizes[number] = size
    return sizes


def parse_unique_id_line(line: bytes, expected: int | None = None) -> tuple[int, str]:
    """Parse ``n unique-id`` (a UIDL line or the reply to ``UIDL n``), validating the id."""
    number_part, _, rest = line.strip(b" ").partition(b" ")
    unique_id = rest.strip(b" ")
    if not _NUMBER.fullmatch(number_part) or int(number_part) == 0:
        raise RemoteProtocolError(f"malformed UIDL line: {line[:80]!r}")
    if not _UNIQUE_ID.fullmatch(unique_id):
        raise RemoteProtocolError(
            f"invalid unique-id {unique_id[:80]!r}: RFC 1939 wants 1-70 characters in 0x21-0x7E"
        )
    number = int(number_part)
    if expected is not None and number != expected:
        raise RemoteProtocolError(f"UIDL {expected} answered for message {number}")
    return number, unique_id.decode("ascii")


def parse_unique_ids(body: bytes) -> dict[int, str]:
    """Parse the body of ``UIDL``; a repeated number or unique-id is a protocol error."""
    ids: dict[int, str] = {}
    seen: set[str] = set()
    for raw in _lines(body):
        number, unique_id = parse_unique_id_line(raw)
        if number in ids:
            raise RemoteProtocolError(f"UIDL names message {number} twice")
        if unique_id in seen:
            raise RemoteProtocolError(f"UIDL gives unique-id {unique_id!r} to two messages")
        seen.add(unique_id)
        ids[number] = unique_id
    return ids


def response_code(text: str) -> str | None:
    """The bracketed response code at the start of a reply text (``[IN-USE] ...``)."""
    match = _RESPONSE_CODE.match(text)
    return match.group(1).upper() if match else None


def _lines(body: bytes) -> list[bytes]:
    lines = body.split(b"\r\n")
    if lines and not lines[-1]:
        lines.pop()  # the body ends with CRLF
    return lines


def _number(word: str, what: str) -> int:
    if not _NUMBER.fullmatch(word.encode("ascii", "replace")):
        raise RemoteProtocolError(f"malformed number {word[:30]!r} in {what} reply")
    return int(word)
