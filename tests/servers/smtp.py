"""Real SMTP servers on loopback for tests and benchmarks: aiosmtpd and Postfix smtp-sink.

aiosmtpd (in the test's own event loop, on a free port chosen by the kernel)
------------------------------------------------------------------------------
``start_smtpd(...)`` / ``running_smtpd(...)`` start a recording server. It keeps, per
connection, every command verb it dispatched (``SessionLog.commands``; AUTH is recorded
as ``"AUTH <MECHANISM>"``, never with credentials) and every plaintext byte it received
(``SessionLog.raw``), and per accepted message the envelope and the exact bytes after
the server removed dot-stuffing (``ReceivedMessage.data``). Options:

- ``tls``: ``"none"``, ``"starttls"`` (offered, not required) or ``"implicit"``;
  the certificate comes from the test CA (``SMTPTLSFiles.ca_file`` trusts it).
- ``users``: ``{"alice": "secret"}`` enables AUTH PLAIN/LOGIN with these accounts;
  ``auth_require_tls`` (default True) hides AUTH until TLS is up.
- ``rcpt_replies``: ``{"nobody@example.com": "550 5.1.1 No such user"}`` refuses those
  recipients (matched case-insensitively); ``mail_reply``/``data_reply`` replace the reply
  to MAIL / to the final dot.
- ``pause_before``: a command (``"DATA"``) whose handling waits until the test sets
  ``recorder.resume``; ``recorder.paused`` is set when it arrives (no sleeps needed).
- ``smtputf8``: advertise SMTPUTF8 (default True).

pytest fixtures: ``smtp_tls_files`` (session), ``smtpd_factory`` (``await
smtpd_factory(**options)``, all stopped at teardown), and ready-made ``smtpd`` (plain),
``smtpd_starttls`` (STARTTLS, AUTH after TLS), ``smtpd_tls`` (implicit TLS, AUTH) and
``smtpd_no_starttls`` (no STARTTLS at all but AUTH offered in clear: what a client sees
behind an attacker who strips STARTTLS). The accounts are :data:`SMTPD_USERS`.

Postfix smtp-sink (a separate process in its own process group)
----------------------------------------------------------------
``start_smtp_sink(...)`` / ``running_smtp_sink(...)`` run ``/usr/sbin/smtp-sink`` on a free
loopback port with fault injection: ``soft_reject`` (``-r``, 4xx), ``hard_reject`` (``-f``,
5xx), ``disconnect`` (``-q``, drop without reply), ``reply_421`` (``-Q``), ``delay``
(``-W CMD:SECONDS``) for commands such as ``"MAIL"``, ``"RCPT"``, ``"DATA"``, ``"."``, and
``dump=True`` (``-d``) to keep each message: ``SmtpSink.messages()``. It is stopped by pid
(SIGTERM to its process group, then SIGKILL). Fixture: ``smtp_sink_factory(**options)``.
A missing smtp-sink is an error, never a skip: install the Debian package ``postfix``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import pytest_asyncio
import trustme
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

LOOPBACK = "127.0.0.1"
SMTPD_HOSTNAME = "smtpd.mailroom.test"
CERT_NAMES = ("localhost", LOOPBACK, "smtp.mailroom.test")
"""Names the test server certificate is valid for."""
SMTPD_USERS: Mapping[str, str] = {"alice": "correct horse battery staple"}
"""Accounts of the ready-made AUTH fixtures."""

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SINK_BACKLOG = 128
SMTP_SINK_READY_TIMEOUT = 10.0  # seconds until smtp-sink must accept connections
SMTP_SINK_STOP_TIMEOUT = 5.0  # seconds after SIGTERM before SIGKILL
SMTP_SINK_PORT_ATTEMPTS = 5  # another process may grab the free port first
WAIT_FOR_MESSAGES_TIMEOUT = 10.0  # default upper bound for SMTPDRecorder.wait_for_messages

TLSMode = Literal["none", "starttls", "implicit"]


# -- TLS material ----------------------------------------------------------------------


@dataclass(frozen=True)
class SMTPTLSFiles:
    """The test CA and a server certificate for :data:`CERT_NAMES`."""

    ca: trustme.CA
    ca_file: str  # PEM of the CA that signed the server certificate
    wrong_ca_file: str  # PEM of an unrelated CA: verification against it must fail
    server_cert: trustme.LeafCert

    def server_context(self) -> ssl.SSLContext:
        """Server-side TLS context presenting the test certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(context)
        return context


def make_tls_files(directory: Path) -> SMTPTLSFiles:
    """Create a CA, a server certificate and an unrelated CA's PEM under ``directory``."""
    ca = trustme.CA()
    wrong_ca = trustme.CA()
    ca_file = directory / "ca.pem"
    wrong_ca_file = directory / "wrong-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    wrong_ca.cert_pem.write_to_path(str(wrong_ca_file))
    return SMTPTLSFiles(
        ca=ca,
        ca_file=str(ca_file),
        wrong_ca_file=str(wrong_ca_file),
        server_cert=ca.issue_cert(*CERT_NAMES),
    )


# -- aiosmtpd with recording -----------------------------------------------------------


@dataclass
class SessionLog:
    """One client connection as the server saw it."""

    peer: Any
    commands: list[str] = field(default_factory=list)  # "EHLO", "STARTTLS", "AUTH PLAIN", ...
    raw: bytearray = field(default_factory=bytearray)  # all plaintext received


@dataclass(frozen=True)
class ReceivedMessage:
    """A message the server accepted (250 to the final dot)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # exactly as received, dot-stuffing removed
    mail_options: tuple[str, ...]
    tls: bool  # the connection was encrypted when DATA finished
    login: str | None  # the authenticated user, if any


class SMTPDRecorder:
    """aiosmtpd handler: records messages, and refuses what it is told to."""

    def __init__(
        self,
        *,
        rcpt_replies: Mapping[str, str] | None = None,
        mail_reply: str | None = None,
        data_reply: str | None = None,
        pause_before: str | None = None,
    ) -> None:
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.mail_reply = mail_reply
        self.data_reply = data_reply
        # Hold the command named here until ``resume`` is set; ``paused`` says it arrived.
        self.pause_before = pause_before
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        self.messages: list[ReceivedMessage] = []
        self.sessions: list[SessionLog] = []
        self._arrived = asyncio.Event()

    @property
    def commands(self) -> list[str]:
        """Every command of every session, in order."""
        return [command for log in self.sessions for command in log.commands]

    @property
    def raw(self) -> bytes:
        """Every plaintext byte received, all sessions."""
        return b"".join(bytes(log.raw) for log in self.sessions)

    async def wait_for_messages(
        self, count: int, timeout: float = WAIT_FOR_MESSAGES_TIMEOUT
    ) -> list[ReceivedMessage]:
        """Wait until ``count`` messages arrived (the timeout only prevents a hang)."""
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return list(self.messages)

    # aiosmtpd hooks

    async def handle_MAIL(
        self,
        server: AiosmtpdSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.mail_reply is not None:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: AiosmtpdSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.rcpt_replies.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: AiosmtpdSMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply is not None:
            return self.data_reply
        transport = server.transport
        auth = session.auth_data
        login = auth.login if isinstance(auth, LoginPassword) else None
        self.messages.append(
            ReceivedMessage(
                mail_from=str(envelope.mail_from),
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                mail_options=tuple(envelope.mail_options),
                tls=transport is not None and transport.get_extra_info("ssl_object") is not None,
                login=login.decode() if login is not None else None,
            )
        )
        self._arrived.set()
        return "250 2.0.0 OK queued as test"


class RecordingSMTP(AiosmtpdSMTP):
    """aiosmtpd's protocol, also logging commands and plaintext bytes per connection."""

    def __init__(self, handler: SMTPDRecorder, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._recorder = handler
        self._log: SessionLog | None = None
        # Wrap aiosmtpd's dispatch table (built in __init__) so each command is logged
        # before it runs; functools.wraps keeps the HELP syntax attributes.
        for name, method in list(self._smtp_methods.items()):
            self._smtp_methods[name] = self._logging(name, method)

    def _logging(
        self, name: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        @functools.wraps(method)
        async def logged(arg: str | None) -> None:
            if self._log is not None:
                mechanism = (arg or "").split(" ")[0].upper() if name == "AUTH" else ""
                self._log.commands.append(f"AUTH {mechanism}" if name == "AUTH" else name)
            if name == self._recorder.pause_before:
                self._recorder.paused.set()
                await self._recorder.resume.wait()
            await method(arg)

        return logged

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._log is None:  # called again with the TLS transport after STARTTLS
            self._log = SessionLog(peer=transport.get_extra_info("peername"))
            self._recorder.sessions.append(self._log)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._log is not None:
            self._log.raw += data
        super().data_received(data)


@dataclass
class SMTPDServer:
    """A running recording aiosmtpd; ``recorder`` holds what it saw."""

    host: str
    port: int
    tls: TLSMode
    recorder: SMTPDRecorder
    ca_file: str | None
    users: Mapping[str, str]
    _server: asyncio.AbstractServer
    _protocols: list[RecordingSMTP]

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Accepted messages, in arrival order."""
        return self.recorder.messages

    @property
    def commands(self) -> list[str]:
        """Command verbs of all sessions, in order."""
        return self.recorder.commands

    async def stop(self) -> None:
        """Stop listening and drop every open connection."""
        self._server.close()
        for protocol in self._protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        await self._server.wait_closed()
        # Let the connections' handler tasks see their cancellation and finish.
        for _ in range(3):
            await asyncio.sleep(0)


async def start_smtpd(
    *,
    tls: TLSMode = "none",
    tls_files: SMTPTLSFiles | None = None,
    users: Mapping[str, str] | None = None,
    auth_require_tls: bool = True,
    rcpt_replies: Mapping[str, str] | None = None,
    mail_reply: str | None = None,
    data_reply: str | None = None,
    pause_before: str | None = None,
    smtputf8: bool = True,
    host: str = LOOPBACK,
) -> SMTPDServer:
    """Start a recording aiosmtpd in the running event loop on a free port."""
    if tls != "none" and tls_files is None:
        raise ValueError("TLS needs tls_files (the smtp_tls_files fixture)")
    loop = asyncio.get_running_loop()
    recorder = SMTPDRecorder(
        rcpt_replies=rcpt_replies,
        mail_reply=mail_reply,
        data_reply=data_reply,
        pause_before=pause_before,
    )
    accounts = dict(users or {})
    context = tls_files.server_context() if tls_files is not None and tls != "none" else None
    protocols: list[RecordingSMTP] = []
    options: dict[str, Any] = {
        "hostname": SMTPD_HOSTNAME,
        "enable_SMTPUTF8": smtputf8,
        # aiosmtpd only knows about TLS it negotiated itself (STARTTLS): with implicit TLS
        # it would hide AUTH although the whole connection is encrypted.
        "auth_require_tls": auth_require_tls and tls != "implicit",
        "loop": loop,
    }
    if accounts:
        options["authenticator"] = _authenticator(accounts)
    if tls == "starttls":
        options["tls_context"] = context

    def factory() -> RecordingSMTP:
        protocol = RecordingSMTP(recorder, **options)
        protocols.append(protocol)
        return protocol

    server = await loop.create_server(
        factory, host=host, port=0, ssl=context if tls == "implicit" else None
    )
    port = server.sockets[0].getsockname()[1]
    return SMTPDServer(
        host=host,
        port=port,
        tls=tls,
        recorder=recorder,
        ca_file=tls_files.ca_file if tls_files is not None else None,
        users=accounts,
        _server=server,
        _protocols=protocols,
    )


@contextlib.asynccontextmanager
async def running_smtpd(**options: Any) -> AsyncIterator[SMTPDServer]:
    """``async with running_smtpd(...) as server``: :func:`start_smtpd`, then stop."""
    server = await start_smtpd(**options)
    try:
        yield server
    finally:
        await server.stop()


def _authenticator(
    users: Mapping[str, str],
) -> Callable[[AiosmtpdSMTP, Session, Envelope, str, Any], AuthResult]:
    def authenticate(
        server: AiosmtpdSMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            login = data.login.decode("utf-8", "replace")
            if users.get(login) == data.password.decode("utf-8", "replace"):
                return AuthResult(success=True, auth_data=data)
        return AuthResult(success=False, handled=False)

    return authenticate


# -- Postfix smtp-sink -----------------------------------------------------------------


@dataclass(frozen=True)
class SinkMessage:
    """One transaction dumped by smtp-sink (``-d``); smtp-sink writes LF line ends."""

    mail_args: str  # e.g. "<a@example.com> SIZE=123"
    rcpt_args: tuple[str, ...]  # e.g. ("<b@example.com>",)
    content: bytes  # the message as received, dot-stuffing removed, LF line ends


@dataclass
class SmtpSink:
    """A running smtp-sink process."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    args: tuple[str, ...]
    dump_dir: Path | None
    _workdir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def messages(self) -> list[SinkMessage]:
        """Dumped transactions (needs ``dump=True``), oldest first."""
        if self.dump_dir is None:
            raise RuntimeError("start smtp-sink with dump=True to keep messages")
        files = sorted(self.dump_dir.glob("msg.*"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [_parse_sink_dump(path.read_bytes()) for path in files]

    def stop(self) -> None:
        """SIGTERM its process group (it was started as its leader), then SIGKILL."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=SMTP_SINK_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self._workdir, ignore_errors=True)


def _parse_sink_dump(blob: bytes) -> SinkMessage:
    lines = blob.split(b"\n")
    mail_args = ""
    rcpt_args: list[str] = []
    index = 0
    while index < len(lines) and not lines[index].startswith(b"Received:"):
        name, _, value = lines[index].partition(b": ")
        if name == b"X-Mail-Args":
            mail_args = value.decode()
        elif name == b"X-Rcpt-Args":
            rcpt_args.append(value.decode())
        index += 1
    index += 1  # the Received: line, then its continuation lines
    while index < len(lines) and lines[index].startswith(b"\t"):
        index += 1
    # smtp-sink appends one empty line after the message.
    content = b"\n".join(lines[index:])
    content = content.removesuffix(b"\n")
    return SinkMessage(mail_args=mail_args, rcpt_args=tuple(rcpt_args), content=content)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def start_smtp_sink(
    *,
    soft_reject: Sequence[str] = (),
    hard_reject: Sequence[str] = (),
    disconnect: Sequence[str] = (),
    reply_421: Sequence[str] = (),
    delay: Mapping[str, int] | None = None,
    dump: bool = False,
    extra_args: Sequence[str] = (),
    host: str = LOOPBACK,
    hostname: str = "smtp-sink.mailroom.test",
) -> SmtpSink:
    """Start smtp-sink on a free port with the given faults; wait until it listens.

    Command names are smtp-sink's: CONNECT, HELO, EHLO, MAIL, RCPT, DATA, ".", RSET,
    NOOP, QUIT. ``delay={"MAIL": 5}`` waits 5 s before replying to MAIL.

    :raises RuntimeError: smtp-sink is not installed or does not start.
    """
    if not os.access(SMTP_SINK, os.X_OK):
        raise RuntimeError(
            f"{SMTP_SINK} is missing: install the Debian package postfix "
            "(preseed postfix/main_mailer_type 'No configuration')"
        )
    workdir = Path(tempfile.mkdtemp(prefix="mailroom-smtp-sink-"))
    args: list[str] = [SMTP_SINK, "-h", hostname]
    if os.geteuid() == 0:
        # smtp-sink refuses to run as root; it drops to this user after binding.
        nobody = pwd.getpwnam("nobody")
        args += ["-u", "nobody"]
        os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
    for flag, commands in (
        ("-r", soft_reject),
        ("-f", hard_reject),
        ("-q", disconnect),
        ("-Q", reply_421),
    ):
        if commands:
            args += [flag, ",".join(commands)]
    for command, seconds in (delay or {}).items():
        args += ["-W", f"{command}:{int(seconds)}"]
    dump_dir: Path | None = None
    if dump:
        dump_dir = workdir / "dump"
        args += ["-d", f"{dump_dir}/msg."]
    args += list(extra_args)

    failures: list[str] = []
    for _ in range(SMTP_SINK_PORT_ATTEMPTS):
        port = _free_port(host)
        argv = (*args, f"{host}:{port}", str(SMTP_SINK_BACKLOG))
        stderr_path = workdir / f"stderr.{port}"
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own process group, stopped by pid
            )
        sink = SmtpSink(host, port, process, argv, dump_dir, workdir)
        if _wait_listening(process, host, port):
            return sink
        sink_error = stderr_path.read_text(errors="replace").strip()
        failures.append(f"port {port}: exit {process.poll()}: {sink_error}")
        if process.poll() is None:
            sink.stop()
            raise RuntimeError(f"smtp-sink did not listen within {SMTP_SINK_READY_TIMEOUT} s")
    shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError("smtp-sink failed to start: " + "; ".join(failures))


def _wait_listening(process: subprocess.Popen[bytes], host: str, port: int) -> bool:
    """Poll until the port accepts connections (True) or the process exits (False)."""
    deadline = time.monotonic() + SMTP_SINK_READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.01)
    return False


@contextlib.contextmanager
def running_smtp_sink(**options: Any) -> Iterator[SmtpSink]:
    """``with running_smtp_sink(...) as sink``: :func:`start_smtp_sink`, then stop."""
    sink = start_smtp_sink(**options)
    try:
        yield sink
    finally:
        sink.stop()


# -- pytest fixtures -------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    # aiosmtpd 1.4 itself sets the deprecated Session.login_data after every AUTH.
    config.addinivalue_line(
        "filterwarnings", "ignore:Session.login_data is deprecated:DeprecationWarning"
    )


@pytest.fixture(scope="session")
def smtp_tls_files(tmp_path_factory: pytest.TempPathFactory) -> SMTPTLSFiles:
    """Test CA, server certificate, and an unrelated CA (for verification failures)."""
    return make_tls_files(tmp_path_factory.mktemp("smtp-tls"))


@pytest_asyncio.fixture
async def smtpd_factory(
    smtp_tls_files: SMTPTLSFiles,
) -> AsyncIterator[Callable[..., Awaitable[SMTPDServer]]]:
    """``await smtpd_factory(**options)`` starts a recording aiosmtpd (see module doc)."""
    servers: list[SMTPDServer] = []

    async def start(**options: Any) -> SMTPDServer:
        options.setdefault("tls_files", smtp_tls_files)
        server = await start_smtpd(**options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest_asyncio.fixture
async def smtpd(smtpd_factory: Callable[..., Awaitable[SMTPDServer]]) -> SMTPDServer:
    """Plain SMTP, no TLS, no AUTH."""
    return await smtpd_factory()


@pytest_asyncio.fixture
async def smtpd_starttls(smtpd_factory: Callable[..., Awaitable[SMTPDServer]]) -> SMTPDServer:
    """STARTTLS offered; AUTH (SMTPD_USERS) only after TLS."""
    return await smtpd_factory(tls="starttls", users=SMTPD_USERS)


@pytest_asyncio.fixture
async def smtpd_tls(smtpd_factory: Callable[..., Awaitable[SMTPDServer]]) -> SMTPDServer:
    """Implicit TLS with AUTH (SMTPD_USERS)."""
    return await smtpd_factory(tls="implicit", users=SMTPD_USERS)


@pytest_asyncio.fixture
async def smtpd_no_starttls(smtpd_factory: Callable[..., Awaitable[SMTPDServer]]) -> SMTPDServer:
    """No STARTTLS, AUTH (SMTPD_USERS) offered in clear: a stripped-STARTTLS view."""
    return await smtpd_factory(users=SMTPD_USERS, auth_require_tls=False)


@pytest.fixture
def smtp_sink_factory() -> Iterator[Callable[..., SmtpSink]]:
    """``smtp_sink_factory(**faults)`` starts smtp-sink (see :func:`start_smtp_sink`)."""
    sinks: list[SmtpSink] = []

    def start(**options: Any) -> SmtpSink:
        sink = start_smtp_sink(**options)
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        sink.stop()
