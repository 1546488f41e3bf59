"""The asyncio POP3 client: :class:`POP3Client`, an adapter over the sans-IO core.

Like httpcore's HTTP/1.1 connection, it writes what ``POP3Connection.send()`` returns
and reads until the core has an event ready. It adds what I/O needs: connecting (plain,
implicit TLS, or plain then STLS), verified certificates, a timeout on every network
step, flow control, pipelined batches and the error translation
``socket/ssl error -> POP3Error``.

Typical use::

    async with POP3Client(host, 995, Security.TLS, ca_file=ca) as client:
        await client.login(user, password)
        unique_ids = await client.uidl()
        wanted = [n for n, uid in unique_ids.items() if uid not in store]
        async with aclosing(client.retrieve_many(wanted, max_bytes=cap)) as messages:
            async for number, data in messages:
                store.add(unique_ids[number], data)
        store.commit()
        await client.dele(wanted)
    # leaving the block sends QUIT, which is when the server applies the deletions

Leaving ``async with`` through an exception closes the connection without QUIT, so no
message marked for deletion in that session is deleted.

One operation runs at a time (an ``asyncio.Lock`` serialises concurrent callers).
``retrieve_many`` and ``retr_chunks`` hold the connection between the items they yield:
starting another operation before such an iteration is exhausted abandons it (its
outstanding replies are read and discarded; resuming it raises
:class:`LocalProtocolError`). Closing the iterator early (``aclosing``, ``break``)
does the same, so the client stays usable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from enum import StrEnum
from types import TracebackType
from typing import Self, cast

from service.domain.enums import Security
from service.sasl import oauthbearer_response, xoauth2_response
from service.tls import client_context

from .commands import MAX_CREDENTIAL_LENGTH, Command, check_text
from .connection import (
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_RESPONSE,
    POP3Connection,
    State,
)
from .errors import (
    AuthNotSupported,
    CommandRejected,
    InvalidArgument,
    LocalProtocolError,
    MessageTooLarge,
    POP3ConnectError,
    POP3ConnectionLost,
    POP3Error,
    POP3TimeoutError,
    RemoteProtocolError,
    SessionDeadlineExceeded,
    TLSCertificateInvalid,
    TLSHandshakeError,
    TLSRequired,
    TransferTooSlow,
    UpdateFailed,
    login_refusal,
)
from .events import (
    NEED_DATA,
    Continuation,
    Err,
    Event,
    Greeting,
    Ok,
    ResponseData,
    ResponseEnd,
    ResponseStart,
)
from .replies import (
    Capabilities,
    MailboxStatus,
    parse_capabilities,
    parse_listing,
    parse_scan_line,
    parse_stat,
    parse_unique_id_line,
    parse_unique_ids,
)

#: Seconds allowed for each network step: connect, TLS handshake, each wait for data.
DEFAULT_TIMEOUT = 30.0
#: Commands kept in flight when the server pipelines; refilled when half are answered.
PIPELINE_WINDOW = 64
#: Received bytes buffered before the socket stops being read (flow control).
READ_HIGH_WATER = 1024 * 1024
#: A RETR may exceed its LIST size (servers may count LF, not CRLF): allow twice the
#: listed size plus this many bytes before deciding the server is lying.
LIST_SIZE_FACTOR = 2
LIST_SIZE_SLACK = 64 * 1024
#: RFC 5034: an AUTH command with its initial response must fit in 255 octets.
MAX_AUTH_LINE = 255
#: Longest OAuth2 access token accepted (providers' tokens run to a few kilobytes).
MAX_TOKEN_LENGTH = 8192
#: Default window over which ``min_rate`` is measured (seconds spent waiting for a reply).
DEFAULT_RATE_WINDOW = 60.0
# Slack for timer wake-ups a hair early: a window this close to full counts as full.
_CLOCK_SLACK = 1e-3

_USABLE_AFTER = (CommandRejected, InvalidArgument)


class AuthMechanism(StrEnum):
    """How :meth:`POP3Client.login` authenticates."""

    PLAIN = "PLAIN"  # AUTH PLAIN (RFC 4616), with the initial response when it fits
    LOGIN = "LOGIN"  # AUTH LOGIN (the widely deployed non-standard mechanism)
    USER = "USER"  # USER then PASS (RFC 1939)
    OAUTHBEARER = "OAUTHBEARER"  # RFC 7628, with an OAuth2 access token
    XOAUTH2 = "XOAUTH2"  # Google's and Microsoft's OAuth2 mechanism


_OAUTH_MECHANISMS = (AuthMechanism.OAUTHBEARER, AuthMechanism.XOAUTH2)


class _Stream:
    """Identity of one ``retrieve_many``/``retr_chunks`` iteration."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False


class _Channel(asyncio.Protocol):
    """Feeds received bytes straight into the core and wakes the task waiting for them.

    Besides each step's ``timeout`` it enforces the session's ``deadline`` (a loop time)
    and, when ``min_rate`` is set, the minimum transfer rate: within one reply, every
    ``rate_window`` seconds spent waiting must bring at least ``min_rate * rate_window``
    bytes. Time the client spends elsewhere (storing what it read) does not count.
    """

    def __init__(
        self,
        core: POP3Connection,
        timeout: float,
        *,
        session_timeout: float | None = None,
        min_rate: int = 0,
        rate_window: float = DEFAULT_RATE_WINDOW,
    ) -> None:
        self.core = core
        self.timeout = timeout
        self.session_timeout = session_timeout
        self.deadline: float | None = None  # loop time, set when the session starts
        self.min_rate = min_rate
        self.rate_window = rate_window
        self._waited = 0.0  # seconds spent waiting in the current rate window
        self._window_bytes = 0  # bytes received in the current rate window
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._window_bytes += len(data)
        self.core.receive_data(data)
        self._wake()
        if (
            not self._reading_paused
            and self.core.buffered > READ_HIGH_WATER
            and self.transport is not None
        ):
            # The reader is behind (a slow consumer of retrieve_many): let TCP push back.
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.core.receive_data(b"")
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.core.receive_data(b"")
        self._wake()
        self._wake_writer()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def start_session(self) -> None:
        """Start the session's clock (the deadline counts from here)."""
        if self.session_timeout is not None:
            self.deadline = asyncio.get_running_loop().time() + self.session_timeout

    def reply_complete(self) -> None:
        """A whole reply arrived: the rate is measured afresh for the next one."""
        self._waited = 0.0
        self._window_bytes = 0

    def step_bound(self, step: float) -> tuple[float, bool]:
        """How long the next network step may take, and whether the deadline is what
        bounds it; raises :class:`SessionDeadlineExceeded` once the deadline has passed."""
        if self.deadline is None:
            return step, False
        remaining = self.deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise self.deadline_error()
        return (remaining, True) if remaining < step else (step, False)

    def deadline_error(self) -> SessionDeadlineExceeded:
        return SessionDeadlineExceeded(
            f"the POP3 session ran past its limit of {self.session_timeout:g} s"
        )

    async def wait_for_data(self) -> None:
        """Wait until more bytes (or the end of the stream) arrive, at most ``timeout``,
        within the session's deadline and its minimum transfer rate."""
        timeout = self.timeout
        if self.lost:
            raise POP3ConnectionLost("the connection is closed")
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        while True:
            bound, by_deadline = self.step_bound(timeout)
            by_rate = False
            if self.min_rate and self.rate_window - self._waited < bound:
                bound, by_deadline, by_rate = self.rate_window - self._waited, False, True
            waiter = loop.create_future()
            self._waiter = waiter
            started = loop.time()
            # A timer on the waiter itself rather than ``asyncio.timeout``: no context
            # manager and no cancelling of the task, for every reply of every session.
            timer = loop.call_at(started + max(bound, 0.0), _time_out, waiter)
            try:
                await waiter
                arrived = True
            except TimeoutError:
                if by_deadline:
                    raise self.deadline_error() from None
                if not by_rate:
                    raise POP3TimeoutError(
                        f"no reply from the POP3 server within {timeout:g} s"
                    ) from None
                arrived = False
            finally:
                timer.cancel()
                self._waiter = None
                self._waited += loop.time() - started
            self._check_rate()
            if arrived:
                return

    def _check_rate(self) -> None:
        if not self.min_rate or self._waited < self.rate_window - _CLOCK_SLACK:
            return
        needed = self.min_rate * self.rate_window
        if self._window_bytes < needed:
            raise TransferTooSlow(
                f"the POP3 server sent {self._window_bytes} bytes in {self._waited:.3g} s,"
                f" below the minimum rate of {self.min_rate} bytes/s"
            )
        self._waited, self._window_bytes = 0.0, 0

    async def drain(self) -> None:
        """Wait until the transport accepts more writes, at most ``timeout``."""
        timeout = self.timeout
        if not self._writing_paused or self.lost:
            return
        bound, by_deadline = self.step_bound(timeout)
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiter = waiter
        try:
            async with asyncio.timeout(bound):
                await waiter
        except TimeoutError:
            if by_deadline:
                raise self.deadline_error() from None
            raise POP3TimeoutError(
                f"the POP3 server did not read our commands within {timeout:g} s"
            ) from None
        finally:
            self._drain_waiter = None


class POP3Client:
    """An asyncio POP3 client (RFC 1939, 2449, 2595, 5034) for one session.

    ``security`` chooses implicit TLS (``Security.TLS``, port 995), plain then STLS,
    which is then mandatory (``Security.STARTTLS``), or plain text (``Security.NONE``).
    Certificates are verified and the host name checked against ``host``, using
    ``ssl_context`` if given, else :func:`service.tls.client_context` with ``ca_file``
    (pass one shared ``ssl_context`` when opening many connections: building a context
    loads the system CAs). ``connect_address`` is an already resolved IP address to dial
    instead of resolving ``host`` (TLS still verifies ``host``).

    ``timeout`` bounds each network step (connect, TLS handshake, each wait for data),
    not a whole transfer, so a big message on a slow link is fine and a silent server is
    not. ``session_timeout`` (seconds from :meth:`connect`) bounds the whole session,
    streaming included (:class:`SessionDeadlineExceeded`); ``min_rate`` (bytes per second,
    0 for none) abandons a server that, within one reply, sends less than that over
    ``rate_window`` seconds of waiting (:class:`TransferTooSlow`). ``max_line`` bounds
    status lines, ``max_response`` CAPA/LIST/UIDL replies and ``max_message_bytes`` any
    single message.
    """

    def __init__(
        self,
        host: str,
        port: int,
        security: Security,
        *,
        ca_file: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect_address: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        session_timeout: float | None = None,
        min_rate: int = 0,
        rate_window: float = DEFAULT_RATE_WINDOW,
        max_line: int = DEFAULT_MAX_LINE,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_response: int = DEFAULT_MAX_RESPONSE,
        pipeline_window: int = PIPELINE_WINDOW,
    ) -> None:
        check_text(host, "host", max_length=253, spaces=False)
        if type(port) is not int or not 0 < port < 65536:
            raise InvalidArgument("port must be an integer from 1 to 65535")
        if not isinstance(security, Security):
            raise InvalidArgument("security must be a Security value")
        if ssl_context is not None and ca_file is not None:
            raise InvalidArgument("give ssl_context or ca_file, not both")
        if connect_address is not None:
            try:
                ipaddress.ip_address(connect_address)
            except ValueError:
                raise InvalidArgument("connect_address must be an IP address") from None
        for name, value in (
            ("max_line", max_line),
            ("max_message_bytes", max_message_bytes),
            ("max_response", max_response),
            ("pipeline_window", pipeline_window),
        ):
            if type(value) is not int or value < 1:
                raise InvalidArgument(f"{name} must be a positive integer")
        if not timeout > 0:
            raise InvalidArgument("timeout must be positive")
        if session_timeout is not None and not session_timeout > 0:
            raise InvalidArgument("session_timeout must be positive")
        if type(min_rate) is not int or min_rate < 0:
            raise InvalidArgument("min_rate must be a non-negative integer")
        if not rate_window > 0:
            raise InvalidArgument("rate_window must be positive")
        self.host = host
        self.port = port
        self.security = security
        self._ca_file = ca_file
        self._ssl_context = ssl_context
        self._connect_address = connect_address
        self._timeout = float(timeout)
        self._session_timeout = None if session_timeout is None else float(session_timeout)
        self._min_rate = min_rate
        self._rate_window = float(rate_window)
        self._max_line = max_line
        self._max_message_bytes = max_message_bytes
        self._max_response = max_response
        self._window = pipeline_window
        self._core: POP3Connection | None = None
        self._channel: _Channel | None = None
        self._lock = asyncio.Lock()
        self._stream: _Stream | None = None
        self._broken: BaseException | None = None
        self._tls = False
        self._greeting: str | None = None
        self._capabilities: Capabilities | None = None
        self._sizes: dict[int, int] | None = None
        # Whether a DELE was sent since login (or RSET): QUIT then commits something.
        self._marked = False

    def __repr__(self) -> str:
        return f"POP3Client({self.host}:{self.port}, {self.security.value})"

    @property
    def _server(self) -> str:
        """How texts shown to callers name the server: by role and address, not class."""
        return f"the POP3 server at {self.host}:{self.port}"

    # Properties ---------------------------------------------------------------------

    @property
    def greeting(self) -> str | None:
        """The text of the server's banner, once connected."""
        return self._greeting

    @property
    def tls_active(self) -> bool:
        """Whether the connection is encrypted (implicit TLS, or after STLS)."""
        return self._tls

    @property
    def state(self) -> State | None:
        """The protocol state of the core, or ``None`` before :meth:`connect`."""
        return None if self._core is None else self._core.state

    @property
    def usable(self) -> bool:
        """Whether commands can still be sent (connected, no fatal error, no QUIT)."""
        return (
            self._core is not None
            and self._broken is None
            and self._core.state in (State.AUTHORIZATION, State.TRANSACTION)
        )

    @property
    def pipelining(self) -> bool:
        """Whether the server advertised PIPELINING (so batches are pipelined)."""
        return self._core is not None and self._core.pipelining

    @property
    def login_delay(self) -> int | None:
        """LOGIN-DELAY seconds from the last CAPA, if the server announced one.

        After :meth:`login` this is the user's own value when the server said it varies
        by user (CAPA is then read again).
        """
        return None if self._capabilities is None else self._capabilities.login_delay

    @property
    def cached_capabilities(self) -> Capabilities | None:
        """The capabilities read at connect (or by the last ``capabilities()`` call)."""
        return self._capabilities

    # Session ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and self.usable:
                await self.quit()
        finally:
            self.close()

    async def connect(self) -> None:
        """Connect, read the greeting, negotiate TLS as asked and read the capabilities.

        With ``Security.STARTTLS``, a server that does not offer STLS (or refuses it)
        fails with :class:`TLSRequired` before anything else is sent.
        """
        if self._core is not None:
            raise LocalProtocolError("connect() was already called on this client")
        core = POP3Connection(
            max_line=self._max_line,
            max_response=self._max_response,
            max_message_bytes=self._max_message_bytes,
        )
        self._core = core
        self._channel = _Channel(
            core,
            self._timeout,
            session_timeout=self._session_timeout,
            min_rate=self._min_rate,
            rate_window=self._rate_window,
        )
        self._channel.start_session()
        try:
            await self._open()
            event = await self._next_event()
            if isinstance(event, Err):
                raise POP3ConnectError(f"{self._server} refused the session: {event.text}")
            assert isinstance(event, Greeting)
            self._greeting = event.text
            if self.security is Security.STARTTLS:
                await self._starttls()
            self._capabilities = await self._read_capabilities()
            core.pipelining = self._capabilities.pipelining
        except BaseException as exc:
            self._fail(exc)
            raise

    async def login(
        self,
        username: str,
        password: str,
        *,
        mechanism: AuthMechanism | None = None,
        oauth2: bool = False,
    ) -> None:
        """Authenticate and enter the TRANSACTION state.

        By default AUTH PLAIN is used when the server offers it, else USER/PASS, else
        AUTH LOGIN. APOP is never used. Nothing is sent unless the connection is
        encrypted or ``Security.NONE`` was chosen. Raises :class:`AuthFailed` on
        ``-ERR``: :class:`MailboxLocked` for ``[IN-USE]``, :class:`PlaintextLoginRefused`
        when an unencrypted login is refused for want of TLS (see ``temporary`` for
        ``[LOGIN-DELAY]`` and ``[SYS/TEMP]``).

        ``oauth2``: ``password`` is an OAuth2 access token, sent with OAUTHBEARER or
        XOAUTH2, whichever the server offers (OAUTHBEARER first); :class:`AuthFailed`
        with ``auth_not_supported`` wording when it offers neither.
        """
        check_text(username, "user name", max_length=MAX_CREDENTIAL_LENGTH, spaces=True)
        if oauth2:
            check_text(password, "access token", max_length=MAX_TOKEN_LENGTH, spaces=False)
        else:
            check_text(password, "password", max_length=MAX_CREDENTIAL_LENGTH, spaces=True)
        async with self._operation():
            if self.security is not Security.NONE and not self._tls:
                # Defence in depth: connect() already refuses to continue without TLS.
                raise TLSRequired("refusing to send credentials over an unencrypted connection")
            chosen = mechanism or (
                self._choose_oauth_mechanism() if oauth2 else self._choose_mechanism()
            )
            if chosen in _OAUTH_MECHANISMS:
                raw = (
                    oauthbearer_response(username, password, self.host, self.port)
                    if chosen is AuthMechanism.OAUTHBEARER
                    else xoauth2_response(username, password)
                )
                # The initial response rarely fits RFC 5034's 255 octets: send it after
                # the empty challenge. On failure the server sends an error challenge,
                # answered as each mechanism asks (RFC 7628: a lone ^A; XOAUTH2: empty);
                # the -ERR that follows is the verdict.
                after_error = "AQ==" if chosen is AuthMechanism.OAUTHBEARER else ""
                await self._authenticate(Command.auth(chosen.value), iter((_b64(raw), after_error)))
            elif chosen is AuthMechanism.PLAIN:
                token = _b64(b"\0" + username.encode() + b"\0" + password.encode())
                if len(f"AUTH PLAIN {token}\r\n") <= MAX_AUTH_LINE:
                    await self._authenticate(Command.auth("PLAIN", token), iter(()))
                else:
                    await self._authenticate(Command.auth("PLAIN"), iter((token,)))
            elif chosen is AuthMechanism.LOGIN:
                answers = iter((_b64(username.encode()), _b64(password.encode())))
                await self._authenticate(Command.auth("LOGIN"), answers)
            else:
                user = Command.user(username)  # refuses a space before anything is sent
                self._expect_login_ok(await self._single(user))
                self._expect_login_ok(await self._single(Command.pass_(password)))
            self._sizes = None
            if self._capabilities is not None and self._capabilities.per_user:
                # RFC 2449: "LOGIN-DELAY n USER" before login means the real value is
                # only announced to the logged-in user.
                self._capabilities = await self._read_capabilities()

    async def capabilities(self, *, refresh: bool = False) -> Capabilities:
        """The server's capabilities (CAPA); cached unless ``refresh`` is true.

        Refresh after login to learn per-user values such as LOGIN-DELAY.
        """
        if self._capabilities is not None and not refresh:
            return self._capabilities
        async with self._operation():
            self._capabilities = await self._read_capabilities()
            return self._capabilities

    async def stat(self) -> MailboxStatus:
        """STAT: number of messages (not marked deleted) and their total size."""
        async with self._operation():
            ok = self._expect_ok(await self._single(Command.stat()))
            return parse_stat(ok.text)

    async def list(self) -> dict[int, int]:
        """LIST: message number to size in octets. Remembered to bound later RETRs."""
        async with self._operation():
            sizes = parse_listing(await self._multiline(Command.list()))
            self._sizes = dict(sizes)
            return sizes

    async def list_one(self, number: int) -> int:
        """``LIST n``: the size of one message."""
        command = Command.list(number)
        async with self._operation():
            ok = self._expect_ok(await self._single(command))
            return parse_scan_line(ok.text, expected=number)[1]

    async def uidl(self) -> dict[int, str]:
        """UIDL: message number to unique-id, validated (RFC 1939 section 7, no duplicates)."""
        async with self._operation():
            return parse_unique_ids(await self._multiline(Command.uidl()))

    async def uidl_one(self, number: int) -> str:
        """``UIDL n``: the unique-id of one message."""
        command = Command.uidl(number)
        async with self._operation():
            ok = self._expect_ok(await self._single(command))
            return parse_unique_id_line(ok.text.encode(), expected=number)[1]

    async def top(self, number: int, lines: int) -> bytes:
        """TOP: the headers, blank line and first ``lines`` body lines of a message."""
        command = Command.top(number, lines)
        async with self._operation():
            return await self._multiline(command, limit=self._message_limit(number, None))

    async def retr(self, number: int, *, max_bytes: int | None = None) -> bytes:
        """RETR: the whole message, CRLF line ends, dot-unstuffed.

        ``max_bytes`` lowers the client's ``max_message_bytes``. If ``list()`` was called
        in this session the transfer is also abandoned beyond twice the listed size plus
        :data:`LIST_SIZE_SLACK`; see :class:`MessageTooLarge` for the connection's fate.
        """
        command = Command.retr(number)
        async with self._operation():
            limit = self._message_limit(number, max_bytes)
            try:
                return await self._multiline(command, limit=limit)
            except MessageTooLarge as exc:
                raise self._annotated(exc, number) from None

    async def retr_chunks(
        self, number: int, *, max_bytes: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """RETR one message as a stream of chunks, so it is never held whole in memory.

        The chunks concatenate to what :meth:`retr` returns; limits are the same.
        """
        command = Command.retr(number)
        async with self._operation():
            limit = self._message_limit(number, max_bytes)
            stream = self._begin_stream()
            self._write(self._send(command, limit))
        try:
            while True:
                await self._step_in(stream)
                try:
                    event = await self._next_event()
                    while isinstance(event, ResponseStart):
                        event = await self._next_event()
                    if isinstance(event, Err):
                        raise self._rejection(event)
                    if not isinstance(event, ResponseData | ResponseEnd):
                        raise self._unexpected(event)
                except BaseException as exc:
                    self._step_failed(exc, number)
                    raise
                finally:
                    self._lock.release()
                if isinstance(event, ResponseEnd):
                    return
                yield event.data
        finally:
            await self._end_stream(stream)

    async def retrieve_many(
        self, numbers: Iterable[int], *, max_bytes: int | None = None
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        """Yield ``(number, message)`` for each of ``numbers``, in order.

        RETRs are pipelined in a sliding window when the server advertises PIPELINING
        (one at a time otherwise), so the server never waits for a round trip. Sizes come
        from LIST (sent first unless :meth:`list` was already called) and bound each
        transfer as in :meth:`retr`. A number whose listed size already exceeds the cap
        is refused before anything is sent (:class:`MessageTooLarge`, ``abandoned=False``):
        filter such messages out first. ``-ERR`` to a RETR raises :class:`CommandRejected`
        after the remaining replies have been read; the client stays usable.
        """
        wanted = [_message_number(n) for n in numbers]
        async with self._operation():
            if self._sizes is None and wanted:
                self._sizes = parse_listing(await self._multiline(Command.list()))
            limits = [self._message_limit(n, max_bytes) for n in wanted]
            stream = self._begin_stream()
        core = self._core
        assert core is not None
        window = self._window if core.pipelining else 1
        refill_at = window // 2
        sent = 0
        try:
            for index, number in enumerate(wanted):
                await self._step_in(stream)
                try:
                    if sent - index <= refill_at:
                        stop = min(len(wanted), index + window)
                        self._write(
                            b"".join(
                                self._send(Command.retr(wanted[i]), limits[i])
                                for i in range(sent, stop)
                            )
                        )
                        sent = stop
                    data = await self._read_message()
                except BaseException as exc:
                    self._step_failed(exc, number)
                    raise
                finally:
                    self._lock.release()
                yield number, data
        finally:
            await self._end_stream(stream)

    async def dele(self, numbers: int | Iterable[int]) -> None:
        """Mark messages deleted (pipelined); the server deletes them only at QUIT.

        If the server refuses any, :class:`CommandRejected` names them once every reply
        has been read, and the client stays usable.
        """
        wanted = (
            [_message_number(numbers)]
            if isinstance(numbers, int)
            else [_message_number(n) for n in numbers]
        )
        async with self._operation():
            core = self._core
            assert core is not None
            self._marked = True
            window = self._window if core.pipelining else 1
            refused: list[tuple[int, Err]] = []
            for start in range(0, len(wanted), window):
                batch = wanted[start : start + window]
                self._write(b"".join(self._send(Command.dele(n)) for n in batch))
                await self._drain_writes()
                for number in batch:
                    event = await self._next_event()
                    if isinstance(event, Err):
                        refused.append((number, event))
                    elif not isinstance(event, Ok):
                        raise self._unexpected(event)
            if refused:
                number, first = refused[0]
                listed = ", ".join(str(n) for n, _ in refused[:20])
                raise CommandRejected(
                    f"the POP3 server refused DELE for message(s) {listed}: {first.text}",
                    command="DELE",
                    text=first.text,
                    response_code=first.response_code,
                )

    async def rset(self) -> None:
        """RSET: unmark every message marked deleted in this session."""
        async with self._operation():
            self._expect_ok(await self._single(Command.rset()))
            self._marked = False

    async def noop(self) -> None:
        """NOOP: keep the session alive / check that the server answers."""
        async with self._operation():
            self._expect_ok(await self._single(Command.noop()))

    async def quit(self) -> None:
        """QUIT: end the session; from TRANSACTION this commits the deletions.

        Returns once the server said ``+OK``. ``-ERR`` raises :class:`UpdateFailed`
        (some deletions may not have been applied). The connection is closed either way.
        """
        async with self._operation():
            core = self._core
            assert core is not None
            try:
                event = await self._single(Command.quit())
            finally:
                self.close()
            if isinstance(event, Err):
                raise UpdateFailed(
                    f"the POP3 server answered -ERR to QUIT: {event.text}",
                    command="QUIT",
                    text=event.text,
                    response_code=event.response_code,
                )

    def quit_nowait(self) -> None:
        """Send QUIT and close, without waiting for the reply: for a session that marked
        nothing deleted, whose QUIT has nothing to commit (and a session that ends without
        QUIT deletes nothing either). The connection closes once QUIT is written. After a
        DELE this only closes the connection (no QUIT: nothing is deleted); use
        :meth:`quit` to commit deletions."""
        channel, core = self._channel, self._core
        if (
            self._marked
            or not self.usable
            or self._lock.locked()
            or self._stream is not None
            or core is None
            or core.state is not State.TRANSACTION
            or channel is None
            or channel.transport is None
        ):
            self.close()
            return
        try:
            self._write(self._send(Command.quit()))
        except (POP3Error, LocalProtocolError):
            self.close()
            return
        channel.transport.close()  # after the buffered QUIT is written

    def close(self) -> None:
        """Close the connection at once, without QUIT: nothing is deleted."""
        channel = self._channel
        if (
            channel is not None
            and channel.transport is not None
            and not channel.transport.is_closing()
        ):
            channel.transport.abort()
        if self._broken is None and self._core is not None and self._core.state is not State.CLOSED:
            self._broken = POP3ConnectionLost("the connection was closed")

    # Connection set-up -----------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = client_context(self._ca_file)
        return self._ssl_context

    async def _open(self) -> None:
        channel = self._channel
        assert channel is not None
        loop = asyncio.get_running_loop()
        tls = self.security is Security.TLS
        address = self._connect_address or self.host
        bound, by_deadline = channel.step_bound(self._timeout)
        try:
            async with asyncio.timeout(bound):
                await loop.create_connection(
                    lambda: channel,
                    address,
                    self.port,
                    ssl=self._tls_context() if tls else None,
                    server_hostname=self.host if tls else None,
                    ssl_handshake_timeout=self._timeout if tls else None,
                )
        except TimeoutError:
            if by_deadline:
                raise channel.deadline_error() from None
            step = "connecting to" if not tls else "connecting (with TLS) to"
            raise POP3TimeoutError(
                f"{step} {self._server} took longer than {self._timeout:g} s"
            ) from None
        except OSError as exc:
            raise _connect_error(self, exc) from exc
        self._tls = tls

    async def _starttls(self) -> None:
        capabilities = await self._read_capabilities()
        # A server without CAPA may still know STLS; one that lists capabilities without
        # STLS does not offer it. Either way nothing but STLS is tried in clear.
        if capabilities.supported and not capabilities.stls:
            raise TLSRequired(f"{self._server} does not offer STLS; no password was sent")
        event = await self._single(Command.stls())
        if isinstance(event, Err):
            raise TLSRequired(f"the POP3 server refused STLS: {event.text}")
        channel, core = self._channel, self._core
        assert channel is not None and channel.transport is not None and core is not None
        loop = asyncio.get_running_loop()
        bound, by_deadline = channel.step_bound(self._timeout)
        try:
            async with asyncio.timeout(bound):
                transport = await loop.start_tls(
                    channel.transport,
                    channel,
                    self._tls_context(),
                    server_hostname=self.host,
                    ssl_handshake_timeout=self._timeout,
                )
        except TimeoutError:
            if by_deadline:
                raise channel.deadline_error() from None
            raise POP3TimeoutError(
                f"the TLS handshake after STLS with {self._server} took longer than"
                f" {self._timeout:g} s"
            ) from None
        except OSError as exc:
            raise _connect_error(self, exc) from exc
        if transport is None:
            raise POP3ConnectionLost(f"{self._server} closed the connection during STLS")
        channel.transport = transport
        core.tls_established()
        self._tls = True

    async def _read_capabilities(self) -> Capabilities:
        try:
            return parse_capabilities(await self._multiline(Command.capa()))
        except CommandRejected:
            return Capabilities.unsupported()

    def _choose_mechanism(self) -> AuthMechanism:
        capabilities = self._capabilities or Capabilities.unsupported()
        if "PLAIN" in capabilities.sasl:
            return AuthMechanism.PLAIN
        if capabilities.user or "LOGIN" not in capabilities.sasl:
            return AuthMechanism.USER
        return AuthMechanism.LOGIN

    def _choose_oauth_mechanism(self) -> AuthMechanism:
        capabilities = self._capabilities or Capabilities.unsupported()
        for mechanism in _OAUTH_MECHANISMS:
            if mechanism.value in capabilities.sasl:
                return mechanism
        offered = " ".join(capabilities.sasl) or "none"
        raise AuthNotSupported(
            f"the POP3 server offers no OAuth2 SASL mechanism (OAUTHBEARER, XOAUTH2): {offered}"
        )

    async def _authenticate(self, command: Command, answers: Iterator[str]) -> None:
        core = self._core
        assert core is not None
        self._write(self._send(command))
        while True:
            event = await self._next_event()
            if isinstance(event, Continuation):
                # More challenges than the mechanism has answers: cancel ("*").
                self._write(core.send_sasl_response(next(answers, "*")))
            elif isinstance(event, Ok):
                return
            elif isinstance(event, Err):
                self._expect_login_ok(event)
            else:
                raise self._unexpected(event)

    # Operations and streams ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _operation(self) -> AsyncIterator[None]:
        async with self._lock:
            self._check_usable()
            if self._stream is not None:
                await self._abandon_stream()
            try:
                yield
            except BaseException as exc:
                self._step_failed(exc, None)
                raise

    def _check_usable(self) -> None:
        if self._core is None:
            raise LocalProtocolError("connect() first (or use 'async with')")
        if self._broken is not None:
            raise LocalProtocolError(
                f"the connection to {self._server} is unusable after an earlier error:"
                f" {self._broken}"
            ) from self._broken
        if self._core.state in (State.UPDATE, State.CLOSED):
            raise LocalProtocolError(f"the session with {self._server} has ended")

    def _step_failed(self, exc: BaseException, number: int | None) -> None:
        """Keep the connection only after errors that leave both sides in step."""
        if isinstance(exc, _USABLE_AFTER):
            return
        if isinstance(exc, MessageTooLarge) and not exc.abandoned:
            return
        if isinstance(exc, LocalProtocolError) and (
            self._core is None or self._core.state is not State.ERROR
        ):
            return  # refused before any I/O
        if isinstance(exc, MessageTooLarge) and number is not None:
            self._annotated(exc, number)
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
        channel = self._channel
        if channel is not None and channel.transport is not None:
            channel.transport.abort()

    def _begin_stream(self) -> _Stream:
        stream = _Stream()
        self._stream = stream
        return stream

    async def _step_in(self, stream: _Stream) -> None:
        await self._lock.acquire()
        if stream.abandoned or self._stream is not stream:
            self._lock.release()
            raise LocalProtocolError(
                "this iteration was abandoned: another operation ran on the client first"
            )
        try:
            self._check_usable()
        except BaseException:
            self._lock.release()
            raise

    async def _end_stream(self, stream: _Stream) -> None:
        if self._stream is not stream:
            return
        async with self._lock:
            if self._stream is not stream:
                return
            await self._abandon_stream()

    async def _abandon_stream(self) -> None:
        """Read and discard what an unfinished iteration left in flight."""
        stream = self._stream
        assert stream is not None
        stream.abandoned = True
        self._stream = None
        core = self._core
        if core is None or self._broken is not None or core.state is State.ERROR:
            return
        try:
            while core.pending:
                await self._next_event()
        except BaseException as exc:
            self._fail(exc)
            raise

    # Reading and writing ----------------------------------------------------------------

    def _send(self, command: Command, limit: int | None = None) -> bytes:
        core = self._core
        assert core is not None
        return core.send(command, limit=limit)

    def _write(self, data: bytes) -> None:
        channel = self._channel
        assert channel is not None
        transport = channel.transport
        if transport is None or transport.is_closing() or channel.lost:
            raise POP3ConnectionLost(f"the connection to {self._server} is closed")
        transport.write(data)

    async def _drain_writes(self) -> None:
        channel = self._channel
        assert channel is not None
        await channel.drain()

    async def _next_event(self) -> Event:
        core, channel = self._core, self._channel
        assert core is not None and channel is not None
        while True:
            event = core.next_event()
            if event is not NEED_DATA:
                if not isinstance(event, ResponseStart | ResponseData):
                    channel.reply_complete()
                return event
            await channel.wait_for_data()

    async def _single(self, command: Command) -> Ok | Err:
        self._write(self._send(command))
        event = await self._next_event()
        if isinstance(event, Ok | Err):
            return event
        raise self._unexpected(event)

    async def _multiline(self, command: Command, *, limit: int | None = None) -> bytes:
        self._write(self._send(command, limit))
        return await self._read_message()

    async def _read_message(self) -> bytes:
        """Read one multi-line reply (the oldest outstanding) and return its body."""
        core, channel = self._core, self._channel
        assert core is not None and channel is not None
        next_event = core.next_event
        chunks: list[bytes] = []
        while True:
            event = next_event()
            if isinstance(event, ResponseData):
                chunks.append(event.data)
            elif isinstance(event, ResponseEnd):
                channel.reply_complete()
                return b"".join(chunks)
            elif event is NEED_DATA:
                await channel.wait_for_data()
            elif isinstance(event, Err):
                channel.reply_complete()
                raise self._rejection(event)
            elif not isinstance(event, ResponseStart):
                raise self._unexpected(event)

    def _message_limit(self, number: int, max_bytes: int | None) -> int:
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 1):
            raise InvalidArgument("max_bytes must be a positive integer")
        cap = (
            self._max_message_bytes
            if max_bytes is None
            else min(max_bytes, self._max_message_bytes)
        )
        listed = None if self._sizes is None else self._sizes.get(number)
        if listed is None:
            return cap
        if listed > cap:
            raise MessageTooLarge(
                f"message {number} is {listed} bytes, over the {cap}-byte cap; not retrieved",
                number=number,
                limit=cap,
                listed_size=listed,
                abandoned=False,
            )
        return min(cap, listed * LIST_SIZE_FACTOR + LIST_SIZE_SLACK)

    def _annotated(self, exc: MessageTooLarge, number: int) -> MessageTooLarge:
        if exc.listed_size is None and self._sizes is not None:
            exc.listed_size = self._sizes.get(number)
        return exc

    def _expect_ok(self, event: Ok | Err, rejected: type[CommandRejected] = CommandRejected) -> Ok:
        if isinstance(event, Err):
            raise self._rejection(event, rejected)
        return event

    def _expect_login_ok(self, event: Ok | Err) -> Ok:
        """``-ERR`` to USER, PASS or AUTH, classified by the server's code and text."""
        if isinstance(event, Err):
            kind = login_refusal(event.response_code, event.text, encrypted=self._tls)
            raise self._rejection(event, kind)
        return event

    def _rejection(
        self, event: Err, kind: type[CommandRejected] = CommandRejected
    ) -> CommandRejected:
        verb = "greeting" if event.command is None else event.command.verb.value
        return kind(
            f"the POP3 server answered -ERR to {verb}: {event.text}",
            command=verb,
            text=event.text,
            response_code=event.response_code,
        )

    def _unexpected(self, event: Event) -> POP3Error:
        return RemoteProtocolError(
            f"the POP3 server sent {_EVENT_NAMES.get(type(event), 'a reply')} where none was due"
        )


# Events as a person reading a protocol trace would call them.
_EVENT_NAMES: dict[type[Event], str] = {
    Greeting: "a greeting",
    Ok: "+OK",
    Err: "-ERR",
    Continuation: "a SASL challenge",
    ResponseStart: "a multi-line reply",
    ResponseData: "multi-line data",
    ResponseEnd: "the end of a multi-line reply",
}


def _time_out(waiter: asyncio.Future[None]) -> None:
    """End a wait for data that took too long (the waiter raises ``TimeoutError``)."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii") or "="


def _message_number(value: object) -> int:
    if type(value) is not int or value < 1:
        raise InvalidArgument(f"message numbers are positive integers, got {value!r}")
    return value


def _connect_error(client: POP3Client, exc: OSError) -> POP3Error:
    server = f"the POP3 server at {client.host}:{client.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSCertificateInvalid(
            f"the certificate of {client.host} did not verify: {exc.verify_message}"
        )
    if isinstance(exc, ssl.SSLError):
        hint = ""
        if client.security is Security.TLS:
            # The usual cause: implicit TLS against a port that speaks plain POP3 first.
            hint = "; if this port speaks plain POP3 (like 110), set security to starttls"
        return TLSHandshakeError(
            f"the TLS handshake with {server} failed ({exc.reason or exc}){hint}"
        )
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return POP3ConnectionLost(f"{server} dropped the connection: {exc.strerror or exc}")
    return POP3ConnectError(f"cannot connect to {server}: {exc.strerror or exc}")
