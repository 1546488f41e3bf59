"""POP3 commands as validated values: build one, and it is safe to write.

Every argument is checked when the :class:`Command` is built, so an argument carrying CR,
LF, NUL or any other control character is refused (:class:`InvalidArgument`) before a byte
reaches the server. APOP is deliberately absent: it is MD5-based and never used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from .errors import InvalidArgument

#: Largest message number or line count accepted in an argument (far beyond any mailbox).
MAX_NUMBER = 2**31 - 1
#: Longest USER/PASS argument; RFC 1939 says 40, real passwords can be longer.
MAX_CREDENTIAL_LENGTH = 1024
#: Longest SASL base64 line sent (a PLAIN response for two MAX_CREDENTIAL_LENGTH values).
# Room for an OAuth2 initial response too (an access token of up to 8192 characters).
MAX_SASL_LINE = 4 * (8192 + 2 * MAX_CREDENTIAL_LENGTH + 64) // 3 + 4

# C0 controls, DEL and the C1 controls: a command line must never carry them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MECHANISM = re.compile(r"[A-Z0-9_-]{1,20}")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


class Verb(StrEnum):
    """The POP3 commands this client sends."""

    USER = "USER"
    PASS = "PASS"  # noqa: S105 - a verb, not a password
    AUTH = "AUTH"
    STLS = "STLS"
    CAPA = "CAPA"
    STAT = "STAT"
    LIST = "LIST"
    UIDL = "UIDL"
    TOP = "TOP"
    RETR = "RETR"
    DELE = "DELE"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"


@dataclass(frozen=True, slots=True)
class Command:
    """One POP3 command with validated arguments; build it with the class methods.

    ``multiline`` tells whether a positive reply carries a dot-terminated body.
    """

    verb: Verb
    args: tuple[str | int, ...] = ()

    def __post_init__(self) -> None:
        _VALIDATORS[self.verb](self.args)

    @property
    def multiline(self) -> bool:
        """Whether ``+OK`` to this command is followed by a dot-terminated body."""
        if self.verb in (Verb.LIST, Verb.UIDL):
            return not self.args
        return self.verb in (Verb.CAPA, Verb.RETR, Verb.TOP)

    def encode(self) -> bytes:
        """The exact bytes of the command line, CRLF included."""
        if not self.args:
            return self.verb.value.encode("ascii") + b"\r\n"
        return f"{self.verb.value} {' '.join(map(str, self.args))}\r\n".encode()

    def __repr__(self) -> str:
        # Never put a password (or a SASL response, which encodes one) in a repr or a log.
        if self.verb in (Verb.PASS, Verb.AUTH) and len(self.args) > (self.verb is Verb.AUTH):
            return f"Command({self.verb.value} ***)"
        return f"Command({' '.join([self.verb.value, *map(str, self.args)])})"

    # Constructors, one per command.
    @classmethod
    def user(cls, name: str) -> Command:
        """``USER name``."""
        return cls(Verb.USER, (name,))

    @classmethod
    def pass_(cls, password: str) -> Command:
        """``PASS password`` (the password may contain spaces)."""
        return cls(Verb.PASS, (password,))

    @classmethod
    def auth(cls, mechanism: str, initial_response: str | None = None) -> Command:
        """``AUTH mechanism [initial-response]`` (RFC 5034); the response is base64 or ``=``."""
        if initial_response is None:
            return cls(Verb.AUTH, (mechanism,))
        return cls(Verb.AUTH, (mechanism, initial_response))

    @classmethod
    def stls(cls) -> Command:
        """``STLS`` (RFC 2595)."""
        return cls(Verb.STLS)

    @classmethod
    def capa(cls) -> Command:
        """``CAPA`` (RFC 2449)."""
        return cls(Verb.CAPA)

    @classmethod
    def stat(cls) -> Command:
        """``STAT``."""
        return cls(Verb.STAT)

    @classmethod
    def list(cls, number: int | None = None) -> Command:
        """``LIST`` (multi-line) or ``LIST n`` (single line)."""
        return cls(Verb.LIST) if number is None else cls(Verb.LIST, (number,))

    @classmethod
    def uidl(cls, number: int | None = None) -> Command:
        """``UIDL`` (multi-line) or ``UIDL n`` (single line)."""
        return cls(Verb.UIDL) if number is None else cls(Verb.UIDL, (number,))

    @classmethod
    def top(cls, number: int, lines: int) -> Command:
        """``TOP n lines``: the headers and the first ``lines`` body lines."""
        return cls(Verb.TOP, (number, lines))

    @classmethod
    def retr(cls, number: int) -> Command:
        """``RETR n``."""
        return cls(Verb.RETR, (number,))

    @classmethod
    def dele(cls, number: int) -> Command:
        """``DELE n``."""
        return cls(Verb.DELE, (number,))

    @classmethod
    def rset(cls) -> Command:
        """``RSET``."""
        return cls(Verb.RSET)

    @classmethod
    def noop(cls) -> Command:
        """``NOOP``."""
        return cls(Verb.NOOP)

    @classmethod
    def quit(cls) -> Command:
        """``QUIT``."""
        return cls(Verb.QUIT)


def check_text(value: object, what: str, *, max_length: int, spaces: bool) -> str:
    """Validate a text argument: a non-empty str without control characters."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string")
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > max_length:
        raise InvalidArgument(f"{what} is longer than {max_length} characters")
    if _CONTROL.search(value):
        raise InvalidArgument(f"{what} contains a control character (CR, LF, NUL...)")
    if not spaces and " " in value:
        raise InvalidArgument(f"{what} must not contain spaces")
    return value


def check_sasl_response(value: object) -> str:
    """Validate a SASL line: base64, ``=`` (empty response) or ``*`` (cancel)."""
    if not isinstance(value, str) or len(value) > MAX_SASL_LINE:
        raise InvalidArgument("a SASL response must be a base64 string")
    # "" is an empty response to a challenge (RFC 5034 section 4; XOAUTH2's answer to
    # its error challenge); "=" an empty initial response.
    if value in ("", "=", "*") or _BASE64.fullmatch(value):
        return value
    raise InvalidArgument("a SASL response must be base64, '=' or '*'")


def _check_number(value: object, what: str, *, minimum: int) -> None:
    # bool is an int subclass; True is not a message number.
    if type(value) is not int or not minimum <= value <= MAX_NUMBER:
        raise InvalidArgument(f"{what} must be an integer from {minimum} to {MAX_NUMBER}")


def _arity(args: tuple[object, ...], *counts: int) -> None:
    if len(args) not in counts:
        raise InvalidArgument(f"expected {' or '.join(map(str, counts))} argument(s)")


def _no_args(args: tuple[object, ...]) -> None:
    _arity(args, 0)


def _one_number(args: tuple[object, ...]) -> None:
    _arity(args, 1)
    _check_number(args[0], "message number", minimum=1)


def _optional_number(args: tuple[object, ...]) -> None:
    _arity(args, 0, 1)
    if args:
        _check_number(args[0], "message number", minimum=1)


def _top(args: tuple[object, ...]) -> None:
    _arity(args, 2)
    _check_number(args[0], "message number", minimum=1)
    _check_number(args[1], "line count", minimum=0)


def _user(args: tuple[object, ...]) -> None:
    _arity(args, 1)
    check_text(args[0], "user name", max_length=MAX_CREDENTIAL_LENGTH, spaces=False)


def _pass(args: tuple[object, ...]) -> None:
    _arity(args, 1)
    check_text(args[0], "password", max_length=MAX_CREDENTIAL_LENGTH, spaces=True)


def _auth(args: tuple[object, ...]) -> None:
    _arity(args, 1, 2)
    if not isinstance(args[0], str) or not _MECHANISM.fullmatch(args[0]):
        raise InvalidArgument("a SASL mechanism is 1-20 of A-Z, 0-9, '-', '_'")
    if len(args) == 2 and check_sasl_response(args[1]) == "*":
        raise InvalidArgument("'*' cannot be an initial response")


_VALIDATORS = {
    Verb.USER: _user,
    Verb.PASS: _pass,
    Verb.AUTH: _auth,
    Verb.STLS: _no_args,
    Verb.CAPA: _no_args,
    Verb.STAT: _no_args,
    Verb.LIST: _optional_number,
    Verb.UIDL: _optional_number,
    Verb.TOP: _top,
    Verb.RETR: _one_number,
    Verb.DELE: _one_number,
    Verb.RSET: _no_args,
    Verb.NOOP: _no_args,
    Verb.QUIT: _no_args,
}
