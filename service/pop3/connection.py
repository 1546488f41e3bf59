"""The sans-IO POP3 protocol core: commands in, bytes out; bytes in, events out.

Modelled on h11: :class:`POP3Connection` does no I/O (no asyncio, socket or ssl here).
The caller writes whatever :meth:`POP3Connection.send` returns, feeds whatever it reads
to :meth:`POP3Connection.receive_data` (``b""`` for end of file) and calls
:meth:`POP3Connection.next_event` until it returns :data:`NEED_DATA`.

Replies are matched to commands in order, so several commands may be outstanding when
the server advertised PIPELINING (the caller sets :attr:`POP3Connection.pipelining`).
Commands that change the session (USER, PASS, AUTH, STLS) are never pipelined.

The RFC 1939 states are data (:class:`State` and the ``_ALLOWED`` table). After any
:class:`~service.pop3.errors.POP3Error` raised by ``send`` or ``next_event`` the
connection is in :attr:`State.ERROR` and refuses everything: the caller must close it.

Multi-line bodies are scanned with ``bytes.find`` for ``CRLF . CRLF`` and unstuffed with
``bytes.replace``, never line by line, and handed out in chunks once
:data:`STREAM_CHUNK` bytes are pending, so buffered memory stays bounded however large
the message is.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from .commands import Command, Verb, check_sasl_response
from .errors import (
    LineTooLong,
    LocalProtocolError,
    MessageTooLarge,
    POP3ConnectionLost,
    POP3Error,
    RemoteProtocolError,
    ResponseTooLarge,
)
from .events import (
    NEED_DATA,
    ConnectionClosed,
    Continuation,
    Err,
    Event,
    Greeting,
    NeedData,
    Ok,
    ResponseData,
    ResponseEnd,
    ResponseStart,
)
from .replies import response_code

#: Longest status line accepted (RFC 2449 allows 512 octets; be generous, not unbounded).
DEFAULT_MAX_LINE = 8192
#: Largest CAPA, LIST or UIDL body accepted (a 100,000-message UIDL is about 4 MB).
DEFAULT_MAX_RESPONSE = 32 * 1024 * 1024
#: Largest message accepted by RETR or TOP unless the caller sets a cap.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Pending body bytes that trigger a partial ResponseData instead of waiting for the end.
STREAM_CHUNK = 256 * 1024

_TERMINATOR = b"\r\n.\r\n"
_EMPTY_BODY = b".\r\n"
_STUFFED = b"\r\n.."
_UNSTUFFED = b"\r\n."
_CR = 0x0D
_SPACE = 0x20


class State(Enum):
    """Where the session is, from this side's point of view (RFC 1939 section 3)."""

    GREETING = "greeting"  # connected, banner not read yet
    AUTHORIZATION = "authorization"
    STARTTLS = "starttls"  # +OK to STLS read; the caller must do the TLS handshake now
    TRANSACTION = "transaction"
    UPDATE = "update"  # QUIT sent from TRANSACTION; the server applies deletions
    CLOSED = "closed"  # QUIT answered, or the server closed with nothing outstanding
    ERROR = "error"  # a protocol error happened; the connection is unusable


_ALLOWED: dict[State, frozenset[Verb]] = {
    State.AUTHORIZATION: frozenset(
        {Verb.USER, Verb.PASS, Verb.AUTH, Verb.STLS, Verb.CAPA, Verb.QUIT}
    ),
    State.TRANSACTION: frozenset(
        {
            Verb.STAT,
            Verb.LIST,
            Verb.UIDL,
            Verb.TOP,
            Verb.RETR,
            Verb.DELE,
            Verb.RSET,
            Verb.NOOP,
            Verb.CAPA,
            Verb.QUIT,
        }
    ),
}
# Commands after which the next command depends on the reply: never pipelined.
_BARRIERS = frozenset({Verb.USER, Verb.PASS, Verb.AUTH, Verb.STLS})
_MESSAGE_VERBS = frozenset({Verb.RETR, Verb.TOP})


@dataclass(slots=True)
class _Pending:
    """A reply still due: to ``command``, or the greeting when ``command`` is None."""

    command: Command | None
    limit: int


class POP3Connection:
    """The state of one POP3 session, without any I/O.

    ``max_line`` bounds status lines, ``max_response`` the body of CAPA/LIST/UIDL, and
    ``max_message_bytes`` the body of RETR/TOP unless ``send()`` is given a lower
    ``limit``. Exceeding them raises :class:`LineTooLong`, :class:`ResponseTooLarge` or
    :class:`MessageTooLarge` (``abandoned=True``).
    """

    def __init__(
        self,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_response: int = DEFAULT_MAX_RESPONSE,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.max_line = max_line
        self.max_response = max_response
        self.max_message_bytes = max_message_bytes
        #: Set by the caller when the server advertised PIPELINING (RFC 2449).
        self.pipelining = False
        self._state = State.GREETING
        self._tls_active = False
        self._buffer = bytearray()
        self._eof = False
        self._pending: deque[_Pending] = deque([_Pending(None, max_line)])
        self._quit_sent = False
        self._user_accepted = False
        self._challenge_open = False
        self._discarded = 0
        # Multi-line body in progress: the entry being read, whether the buffer starts at
        # the beginning of a line, where to resume the terminator search, bytes handed out.
        self._body: _Pending | None = None
        self._line_start = True
        self._scan_from = 0
        self._delivered = 0
        self._end_due: _Pending | None = None
        self._line_scan = 0

    # Introspection ------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._state

    @property
    def tls_active(self) -> bool:
        """Whether :meth:`tls_established` was called after STLS."""
        return self._tls_active

    @property
    def pending(self) -> int:
        """How many replies (the greeting included) are still due."""
        return len(self._pending)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buffer)

    @property
    def discarded(self) -> int:
        """Bytes thrown away between ``+OK`` to STLS and the TLS handshake."""
        return self._discarded

    # Commands -----------------------------------------------------------------------

    def send(self, command: Command, *, limit: int | None = None) -> bytes:
        """Register ``command`` as awaiting a reply and return the bytes to write.

        ``limit`` caps the body of a RETR or TOP reply below ``max_message_bytes``.
        Raises :class:`LocalProtocolError` if the command is not allowed now (wrong state,
        a reply still due without pipelining, after QUIT...).
        """
        self._check_usable()
        try:
            self._check_sendable(command)
        except POP3Error:
            self._state = State.ERROR
            raise
        verb = command.verb
        if verb in _MESSAGE_VERBS:
            cap = self.max_message_bytes if limit is None else min(limit, self.max_message_bytes)
        else:
            cap = self.max_response
        self._pending.append(_Pending(command, cap))
        if verb is Verb.QUIT:
            self._quit_sent = True
            if self._state is State.TRANSACTION:
                self._state = State.UPDATE
        return command.encode()

    def send_sasl_response(self, response: str) -> bytes:
        """Answer the SASL challenge just received; ``*`` cancels the exchange."""
        self._check_usable()
        if not self._challenge_open:
            self._state = State.ERROR
            raise LocalProtocolError("no SASL challenge is waiting for a response")
        check_sasl_response(response)
        self._challenge_open = False
        return response.encode("ascii") + b"\r\n"

    def _check_sendable(self, command: Command) -> None:
        state = self._state
        verb = command.verb
        if self._quit_sent:
            raise LocalProtocolError(f"{verb} after QUIT")
        if state not in _ALLOWED:
            raise LocalProtocolError(f"{verb} is not allowed in state {state.value}")
        if verb not in _ALLOWED[state]:
            raise LocalProtocolError(f"{verb} is not allowed in state {state.value}")
        if self._pending:
            if not self.pipelining:
                raise LocalProtocolError(
                    f"{verb} while a reply is due and the server does not pipeline"
                )
            # A barrier is only ever sent alone, so checking the oldest entry is enough.
            head = self._pending[0].command
            if verb in _BARRIERS or (head is not None and head.verb in _BARRIERS):
                raise LocalProtocolError(f"{verb} cannot be pipelined with USER/PASS/AUTH/STLS")
        if verb is Verb.PASS and not self._user_accepted:
            raise LocalProtocolError("PASS must follow a successful USER")
        if verb is Verb.STLS and self._tls_active:
            raise LocalProtocolError("STLS on a connection that already uses TLS")

    # Bytes in -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the server; ``b""`` means the server closed.

        Bytes arriving between ``+OK`` to STLS and :meth:`tls_established` are discarded:
        they were sent in clear and could have been injected by anyone on the path.
        """
        if not data:
            self._eof = True
        elif self._eof or self._state in (State.CLOSED, State.ERROR):
            return
        elif self._state is State.STARTTLS:
            self._discarded += len(data)
        else:
            self._buffer += data

    def tls_established(self) -> None:
        """Tell the core that the TLS handshake after STLS completed.

        The buffer is emptied (again) and the session is back in AUTHORIZATION; the
        caller must issue CAPA again, as RFC 2595 requires.
        """
        self._check_usable()
        if self._state is not State.STARTTLS:
            self._state = State.ERROR
            raise LocalProtocolError("tls_established() without a successful STLS")
        self._buffer.clear()
        self._line_scan = 0
        self._state = State.AUTHORIZATION
        self._tls_active = True

    def next_event(self) -> Event | NeedData:
        """Return the next event, or :data:`NEED_DATA` if more bytes are needed."""
        self._check_usable()
        try:
            return self._next_event()
        except POP3Error:
            self._state = State.ERROR
            raise

    # Internals ----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._state is State.ERROR:
            raise LocalProtocolError("the connection is unusable after an earlier error")

    def _next_event(self) -> Event | NeedData:
        if self._body is not None:
            return self._read_body(self._body)
        if self._end_due is not None:
            return self._finish_body(self._end_due)
        if self._state is State.STARTTLS:
            return NEED_DATA  # nothing is read until tls_established()
        if not self._pending:
            return self._idle()
        line = self._read_line()
        if line is None:
            if self._eof:
                raise POP3ConnectionLost(f"the server closed the connection {self._awaiting()}")
            return NEED_DATA
        return self._status(line)

    def _idle(self) -> Event | NeedData:
        if self._state is State.CLOSED:
            self._buffer.clear()
            return ConnectionClosed() if self._eof else NEED_DATA
        if self._buffer:
            raise RemoteProtocolError(f"unsolicited data from the server: {self._preview()}")
        if self._eof:
            self._state = State.CLOSED
            return ConnectionClosed()
        return NEED_DATA

    def _awaiting(self) -> str:
        command = self._pending[0].command
        return "before its greeting" if command is None else f"while a reply to {command} was due"

    def _preview(self) -> str:
        return repr(bytes(self._buffer[:60]))

    def _read_line(self) -> bytes | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n", self._line_scan)
        if end < 0:
            size = len(buffer)
            if size > self.max_line:
                raise LineTooLong(
                    f"a status line is longer than {self.max_line} bytes {self._awaiting()}",
                    limit=self.max_line,
                )
            if size and not self._plausible_status(buffer):
                # Garbage is reported at once, not after waiting for a CRLF that may never come.
                raise RemoteProtocolError(
                    f"expected +OK or -ERR {self._awaiting()}, got {self._preview()}"
                )
            self._line_scan = size - 1 if size else 0
            return None
        if end > self.max_line:
            raise LineTooLong(
                f"a status line is longer than {self.max_line} bytes {self._awaiting()}",
                limit=self.max_line,
            )
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        self._line_scan = 0
        return line

    @staticmethod
    def _plausible_status(buffer: bytearray) -> bool:
        head = bytes(buffer[:4])
        return head.startswith(b"+") or b"-ERR".startswith(head) or head.startswith(b"-ERR")

    def _status(self, line: bytes) -> Event:
        entry = self._pending[0]
        command = entry.command
        if line.startswith(b"+OK") and (len(line) == 3 or line[3] == _SPACE):
            text = _text(line[4:])
            if command is None:
                self._pending.popleft()
                self._state = State.AUTHORIZATION
                return Greeting(text)
            if command.multiline:
                self._start_body(entry)
                return ResponseStart(command, text)
            self._pending.popleft()
            self._on_ok(command.verb)
            return Ok(command, text)
        if line.startswith(b"-ERR") and (len(line) == 4 or line[4] == _SPACE):
            text = _text(line[5:])
            self._pending.popleft()
            self._on_err(None if command is None else command.verb)
            return Err(command, text, response_code(text))
        if line.startswith(b"+") and command is not None and command.verb is Verb.AUTH:
            # RFC 5034: "+" SP base64; some servers send a bare "+" for an empty challenge.
            self._challenge_open = True
            return Continuation(command, _text(line[2:] if line[1:2] == b" " else line[1:]))
        what = "the greeting" if command is None else f"a reply to {command}"
        raise RemoteProtocolError(f"expected +OK or -ERR as {what}, got {line[:60]!r}")

    def _on_ok(self, verb: Verb) -> None:
        if verb is Verb.USER:
            self._user_accepted = True
        elif verb in (Verb.PASS, Verb.AUTH):
            self._state = State.TRANSACTION
        elif verb is Verb.STLS:
            # Whatever followed "+OK" in clear is dropped, and so is anything that arrives
            # before the handshake completes.
            self._discarded += len(self._buffer)
            self._buffer.clear()
            self._line_scan = 0
            self._state = State.STARTTLS
        elif verb is Verb.QUIT:
            self._state = State.CLOSED

    def _on_err(self, verb: Verb | None) -> None:
        self._challenge_open = False
        if verb is None or verb is Verb.QUIT:
            self._state = State.CLOSED
        elif verb in (Verb.USER, Verb.PASS):
            self._user_accepted = False

    def _start_body(self, entry: _Pending) -> None:
        self._body = entry
        self._line_start = True
        self._scan_from = 0
        self._delivered = 0

    def _read_body(self, entry: _Pending) -> Event | NeedData:
        buffer = self._buffer
        if self._line_start and buffer.startswith(_EMPTY_BODY):
            end, consumed = 0, 3
        else:
            found = buffer.find(_TERMINATOR, self._scan_from)
            if found < 0:
                return self._partial_body(entry)
            # The CRLF before "." ends the last line and belongs to the data.
            end, consumed = found + 2, found + 5
        self._body = None
        if end == 0:
            del buffer[:consumed]
            return self._finish_body(entry)
        data = self._take(entry, end, consumed)
        self._end_due = entry
        return ResponseData(_command_of(entry), data)

    def _partial_body(self, entry: _Pending) -> NeedData | ResponseData:
        buffer = self._buffer
        size = len(buffer)
        cut = 0
        next_line_start = True
        if size >= STREAM_CHUNK:
            # Cut after the last CRLF so that neither a terminator nor a stuffed dot is
            # split; on a very long line cut anywhere except between CR and LF, once the
            # first bytes tell a stuffed dot from the terminator.
            cut = buffer.rfind(b"\r\n")
            if cut >= 0:
                cut += 2
            elif not self._line_start or size >= 3:
                cut = size - 1 if buffer[-1] == _CR else size
                next_line_start = False
            else:
                cut = 0
        if cut <= 0:
            if self._eof:
                raise POP3ConnectionLost(f"the server closed the connection {self._awaiting()}")
            # A terminator may straddle the next read: rescan only the last 4 bytes.
            self._scan_from = size - 4 if size > 4 else 0
            return NEED_DATA
        data = self._take(entry, cut, cut)
        self._line_start = next_line_start
        rest = len(buffer)
        self._scan_from = rest - 4 if rest > 4 else 0
        return ResponseData(_command_of(entry), data)

    def _take(self, entry: _Pending, end: int, consumed: int) -> bytes:
        buffer = self._buffer
        with memoryview(buffer) as view:
            data = bytes(view[:end])
        del buffer[:consumed]
        if self._line_start and data.startswith(b".."):
            data = data[1:]
        data = data.replace(_STUFFED, _UNSTUFFED)
        self._delivered += len(data)
        if self._delivered > entry.limit:
            self._too_large(entry)
        return data

    def _too_large(self, entry: _Pending) -> None:
        command = _command_of(entry)
        if command.verb in _MESSAGE_VERBS:
            number = command.args[0]
            assert isinstance(number, int)
            raise MessageTooLarge(
                f"message {number} is larger than {entry.limit} bytes; transfer abandoned",
                number=number,
                limit=entry.limit,
                abandoned=True,
            )
        raise ResponseTooLarge(
            f"the reply to {command} is larger than {entry.limit} bytes", limit=entry.limit
        )

    def _finish_body(self, entry: _Pending) -> ResponseEnd:
        self._end_due = None
        self._pending.popleft()
        return ResponseEnd(_command_of(entry))


def _command_of(entry: _Pending) -> Command:
    # Only the greeting entry has no command, and it never has a body.
    assert entry.command is not None
    return entry.command


def _text(raw: bytes) -> str:
    """Decode reply text for humans and logs, with control characters neutralised."""
    text = raw.decode("utf-8", "replace")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in text)
