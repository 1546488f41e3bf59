"""SMTP sessions over aiosmtplib: TLS policy, authentication, per-recipient delivery.

One :class:`SMTPSession` is one connection, reused for many messages::

    async with SMTPSession(server) as session:
        result = await session.send(mail_from, recipients, message_bytes, smtputf8=False)

The session drives aiosmtplib command by command instead of calling ``sendmail``, so that

- the TLS policy is enforced step by step (STARTTLS is never opportunistic; no AUTH is
  sent on a connection the account does not allow it on),
- every stage has its RFC 5321 timeout (up to 13 minutes for the reply to the final dot),
- addresses go on the wire exactly as validated (``sendmail`` re-parses them with
  ``email.utils.parseaddr``), and
- every recipient's reply is kept, and every failure becomes an
  :class:`~service.smtp.errors.SMTPDeliveryError` with a stable code and a retry verdict.

The connection is dialled here (``connect_address`` when given, else ``host`` resolved)
and handed to aiosmtplib as a connected socket, while TLS verifies ``host``.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import re
import socket
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Self, TypeVar

import aiosmtplib
from aiosmtplib import SMTPResponse

from service.domain.enums import Security
from service.sasl import oauthbearer_response
from service.smtp.config import SMTPServer
from service.smtp.errors import (
    SMTPAllRecipientsRefused,
    SMTPAuthError,
    SMTPConnectionFailed,
    SMTPDeliveryError,
    SMTPErrorCode,
    SMTPExtensionMissing,
    SMTPProtocolError,
    SMTPReplyError,
    SMTPSecurityError,
    SMTPStage,
    SMTPTimedOut,
    stage_words,
)
from service.smtp.verify import VerifyStep, VerifyStepName
from service.tls import client_context

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# Envelope addresses come validated from service.mail; this only guards the command line.
_UNSAFE_IN_PATH = re.compile(r"[\s<>\x00-\x1f\x7f]")

REPLY_SERVICE_CLOSING = 421
REPLY_OK = 250
REPLY_WILL_FORWARD = 251
REPLY_START_INPUT = 354
REPLY_MECHANISM_UNKNOWN = 504
# Longest reply line (RFC 5321 section 4.5.3.1.5 says 512 octets; servers send more text)
# and longest multi-line reply accepted while commands are pipelined.
MAX_REPLY_LINE_OCTETS = 8192
MAX_REPLY_OCTETS = 65536

# AUTH mechanisms aiosmtplib implements (its method is auth_<name without dashes>).
_AUTH_PREFERENCE_TLS = ("plain", "login", "cram-md5")
_AUTH_PREFERENCE_CLEAR = ("cram-md5", "plain", "login")
# With an OAuth2 access token (the standard one first).
_AUTH_PREFERENCE_OAUTH2 = ("oauthbearer", "xoauth2")


class RcptStatus(StrEnum):
    """What the server said to one RCPT."""

    ACCEPTED = "accepted"  # 250/251
    DEFERRED = "deferred"  # 4xx: retry this recipient later
    REJECTED = "rejected"  # 5xx: permanent for this recipient


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """One recipient's reply to RCPT."""

    address: str
    status: RcptStatus
    smtp_code: int
    smtp_message: str


@dataclass(frozen=True, slots=True)
class SendResult:
    """A message the server accepted (250 to the final dot) for at least one recipient.

    ``recipients`` has one outcome per envelope recipient, in the order given; the
    accepted ones are delivered to the server, the others are not. ``smtp_code`` and
    ``smtp_message`` are the reply to the final dot (often with the server's queue id).
    """

    recipients: tuple[RecipientOutcome, ...]
    smtp_code: int
    smtp_message: str

    def _with(self, status: RcptStatus) -> tuple[str, ...]:
        return tuple(r.address for r in self.recipients if r.status is status)

    @property
    def accepted(self) -> tuple[str, ...]:
        """Recipients the message was delivered to."""
        return self._with(RcptStatus.ACCEPTED)

    @property
    def deferred(self) -> tuple[str, ...]:
        """Recipients refused with 4xx: send to these again later."""
        return self._with(RcptStatus.DEFERRED)

    @property
    def rejected(self) -> tuple[str, ...]:
        """Recipients refused with 5xx: never retry."""
        return self._with(RcptStatus.REJECTED)


_STEP_OF_STAGE = {
    SMTPStage.CONNECT: VerifyStepName.CONNECT,
    SMTPStage.GREETING: VerifyStepName.CONNECT,
    SMTPStage.EHLO: VerifyStepName.CONNECT,
    SMTPStage.TLS: VerifyStepName.TLS,
    SMTPStage.STARTTLS: VerifyStepName.TLS,
    SMTPStage.AUTH: VerifyStepName.AUTH,
}


def prepare_data(message: bytes) -> tuple[bytes, int]:
    """What to write after the 354 reply, and the RFC 1870 SIZE of the message.

    Every CR, LF or CRLF becomes CRLF (a bare CR or LF never reaches the server, so no
    ``<LF>.<LF>``-style end-of-data can be smuggled), the message ends with CRLF, every
    line starting with "." gets a second one (RFC 5321 section 4.5.2), then ".<CRLF>".
    """
    text = _LINE_BREAK.sub(b"\r\n", message)
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    size = len(text)
    stuffed = text.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n", size


MAX_CACHED_TLS_CONTEXTS = 32
_tls_contexts: dict[tuple[str | None, int, int, int], ssl.SSLContext] = {}


async def _client_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying client context, shared by all sessions with the same CA file.

    Building one loads the system CA store (tens of milliseconds), so it is done once, in
    a thread; the file's identity, mtime and size are part of the key, so a replaced CA
    file is picked up by the next session.
    """
    if ca_file is None:
        key: tuple[str | None, int, int, int] = (None, 0, 0, 0)
    else:
        stat = os.stat(ca_file)
        key = (ca_file, stat.st_ino, stat.st_mtime_ns, stat.st_size)
    context = _tls_contexts.get(key)
    if context is None:
        context = await asyncio.to_thread(client_context, ca_file)
        if len(_tls_contexts) >= MAX_CACHED_TLS_CONTEXTS:
            _tls_contexts.pop(next(iter(_tls_contexts)))  # the oldest entry
        _tls_contexts[key] = context
    return context


def _reply_line(response: SMTPResponse) -> str:
    return f"{response.code} {response.message.splitlines()[0] if response.message else ''}"


_E = TypeVar("_E", bound=BaseException)


def _find_cause(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of type ``kind`` in ``exc``'s cause/context chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class SMTPSession:
    """One SMTP connection to ``server``, authenticated per its policy, reusable.

    Use as an async context manager, or call :meth:`open` and :meth:`close`. ``send`` may
    be called any number of times while :attr:`usable`; calls are serialized. Once a
    failure has dropped the connection (timeouts, drops, 421), ``usable`` is False and a
    new session is needed.
    """

    def __init__(self, server: SMTPServer) -> None:
        self.server = server
        self._smtp: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()
        self._steps: list[VerifyStep] = []
        self._encrypted = False
        self._peer = ""
        self._messages_sent = 0
        self._stage = SMTPStage.CONNECT  # the step in progress, or the last one done

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect, secure and authenticate as the server's policy says.

        :raises SMTPDeliveryError: the step that failed; :attr:`steps` tells the story.
        """
        if self._smtp is not None:
            raise RuntimeError("session is already open")
        self._steps = []
        self._encrypted = False
        try:
            await self._open()
        except SMTPDeliveryError as exc:
            self.abort()
            self._record_failure(exc)
            raise
        except BaseException:
            self.abort()
            raise

    async def close(self) -> None:
        """Say QUIT (briefly) and close the connection; safe to call more than once."""
        smtp = self._smtp
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=self.server.timeouts.quit)
        except (aiosmtplib.SMTPException, OSError):
            pass  # the transaction is over: a failed goodbye changes nothing
        finally:
            self.abort()

    @property
    def usable(self) -> bool:
        """Whether the connection is open and ready for the next message."""
        return self._smtp is not None and self._smtp.is_connected

    @property
    def encrypted(self) -> bool:
        """Whether the connection is protected by TLS (implicit or STARTTLS)."""
        return self._encrypted

    @property
    def stage(self) -> SMTPStage:
        """The step in progress (or the last one done): where a caller's deadline struck."""
        return self._stage

    @property
    def messages_sent(self) -> int:
        """Messages accepted by the server on this connection."""
        return self._messages_sent

    @property
    def extensions(self) -> Mapping[str, str]:
        """The server's EHLO extensions (lowercase names), as last announced."""
        return dict(self._smtp.esmtp_extensions) if self._smtp is not None else {}

    @property
    def steps(self) -> tuple[VerifyStep, ...]:
        """What :meth:`open` did: connect, tls, auth, each ok or the failure."""
        return tuple(self._steps)

    # -- opening ----------------------------------------------------------------------

    async def _open(self) -> None:
        server = self.server
        timeouts = server.timeouts
        implicit_tls = server.security is Security.TLS
        context = await self._tls_context() if server.security is not Security.NONE else None

        sock = await self._dial()
        smtp = aiosmtplib.SMTP(
            hostname=server.host,  # the name TLS verifies, whatever address was dialled
            local_hostname=server.local_hostname,
            timeout=timeouts.command,
            use_tls=implicit_tls,
            start_tls=False,  # STARTTLS is done below, so its absence is an error
            tls_context=context if implicit_tls else None,
        )
        self._smtp = smtp
        self._stage = SMTPStage.GREETING
        try:
            greeting = await smtp.connect(sock=sock, timeout=timeouts.greeting)
        except (aiosmtplib.SMTPException, OSError) as exc:
            sock.close()  # aiosmtplib owns it only once the transport exists
            # TLS errors are recognised by type whatever the stage given here.
            raise self._translate(exc, SMTPStage.GREETING) from exc
        except BaseException:
            sock.close()
            raise
        await self._ehlo(SMTPStage.EHLO)
        self._steps.append(
            VerifyStep(VerifyStepName.CONNECT, True, None, f"{self._peer}: {_reply_line(greeting)}")
        )
        if implicit_tls:
            self._encrypted = True
            self._steps.append(VerifyStep(VerifyStepName.TLS, True, None, self._tls_detail()))
        elif server.security is Security.STARTTLS:
            assert context is not None
            await self._starttls(context)
        if server.has_credentials:
            await self._authenticate()

    async def _tls_context(self) -> ssl.SSLContext:
        try:
            return await _client_context(self.server.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise SMTPSecurityError(
                SMTPErrorCode.TLS_FAILED,
                f"the CA file {self.server.ca_file!r} for the SMTP server cannot be loaded: {exc}",
                stage=SMTPStage.TLS,
            ) from exc

    async def _dial(self) -> socket.socket:
        """A connected non-blocking socket to ``connect_address`` or ``host``."""
        server = self.server
        loop = asyncio.get_running_loop()
        target = f"{server.connect_address or server.host}:{server.port}"
        self._stage = SMTPStage.CONNECT
        try:
            async with asyncio.timeout(server.timeouts.connect):
                candidates: list[tuple[int, tuple[Any, ...]]]
                if server.connect_address is not None:
                    ip = ipaddress.ip_address(server.connect_address)
                    ip_family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
                    candidates = [(ip_family, (server.connect_address, server.port))]
                else:
                    infos = await loop.getaddrinfo(
                        server.host, server.port, type=socket.SOCK_STREAM
                    )
                    candidates = [(info[0], info[4]) for info in infos]
                errors: list[OSError] = []
                for family, address in candidates:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    try:
                        sock.setblocking(False)
                        await loop.sock_connect(sock, address)
                    except OSError as exc:
                        sock.close()
                        errors.append(exc)
                        continue
                    except BaseException:
                        sock.close()
                        raise
                    self._peer = f"{address[0]}:{address[1]}"
                    return sock
                raise errors[-1] if errors else OSError(f"{server.host} has no address")
        except TimeoutError as exc:
            raise SMTPTimedOut(
                SMTPErrorCode.TIMEOUT,
                f"no connection to the SMTP server at {target} within"
                f" {server.timeouts.connect:g} s",
                stage=SMTPStage.CONNECT,
            ) from exc
        except OSError as exc:
            raise SMTPConnectionFailed(
                SMTPErrorCode.CONNECT_FAILED,
                f"cannot connect to the SMTP server at {target}: {exc.strerror or exc}",
                stage=SMTPStage.CONNECT,
            ) from exc

    async def _ehlo(self, stage: SMTPStage) -> None:
        self._stage = stage
        smtp = self._require(stage)
        try:
            await smtp.ehlo(timeout=self.server.timeouts.command)
        except aiosmtplib.SMTPHeloError as exc:
            if exc.code >= 500 and smtp.is_connected:
                # A pre-ESMTP server: HELO works, and offers no extensions, so whatever
                # the policy needs (STARTTLS, AUTH) is then found missing.
                try:
                    await smtp.helo(timeout=self.server.timeouts.command)
                except (aiosmtplib.SMTPException, OSError) as helo_exc:
                    self.abort()
                    raise self._translate(helo_exc, stage) from helo_exc
                return
            self.abort()
            raise self._translate(exc, stage) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.abort()
            raise self._translate(exc, stage) from exc

    async def _starttls(self, context: ssl.SSLContext) -> None:
        self._stage = SMTPStage.STARTTLS
        smtp = self._require(SMTPStage.STARTTLS)
        if not smtp.supports_extension("starttls"):
            raise SMTPSecurityError(
                SMTPErrorCode.TLS_REQUIRED,
                "the SMTP server does not offer STARTTLS, which the account requires; "
                "nothing was sent in clear",
                stage=SMTPStage.STARTTLS,
            )
        try:
            await smtp.starttls(
                server_hostname=self.server.host,
                tls_context=context,
                timeout=self.server.timeouts.command,
            )
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code < 0:
                raise self._translate(exc, SMTPStage.STARTTLS) from exc
            raise SMTPSecurityError(
                SMTPErrorCode.TLS_REQUIRED,
                "the SMTP server refused STARTTLS, which the account requires",
                stage=SMTPStage.STARTTLS,
                smtp_code=exc.code,
                smtp_message=exc.message,
            ) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise self._translate(exc, SMTPStage.STARTTLS) from exc
        self._encrypted = True
        # RFC 3207 section 4.2: forget what was learnt in clear and ask again.
        await self._ehlo(SMTPStage.STARTTLS)
        self._steps.append(VerifyStep(VerifyStepName.TLS, True, None, self._tls_detail()))

    def _tls_detail(self) -> str:
        smtp = self._require(SMTPStage.TLS)
        ssl_object = smtp.get_transport_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            return f"certificate verified for {self.server.host}"
        cipher = ssl_object.cipher()
        name = cipher[0] if cipher else "unknown cipher"
        return f"{ssl_object.version()} {name}, certificate verified for {self.server.host}"

    async def _authenticate(self) -> None:
        server = self.server
        self._stage = SMTPStage.AUTH
        smtp = self._require(SMTPStage.AUTH)
        assert server.username is not None and server.password is not None
        if not self._encrypted and not server.allow_insecure_auth:
            raise SMTPSecurityError(
                SMTPErrorCode.INSECURE_AUTH_REFUSED,
                "the connection to the SMTP server is not encrypted and the account does not"
                " allow sending its password in clear; no AUTH was sent",
                stage=SMTPStage.AUTH,
            )
        offered = " ".join(smtp.server_auth_methods) or "none"
        # Over TLS, PLAIN is the most widely working; in clear (only when explicitly
        # allowed), CRAM-MD5 at least keeps the password itself off the wire.
        preference: tuple[str, ...] = (
            _AUTH_PREFERENCE_TLS if self._encrypted else _AUTH_PREFERENCE_CLEAR
        )
        if server.oauth2:
            preference = _AUTH_PREFERENCE_OAUTH2
        mechanisms = [m for m in preference if m in smtp.server_auth_methods]
        if not smtp.supports_extension("auth") or not mechanisms:
            hint = "" if self._encrypted else " (many servers offer AUTH only over TLS)"
            raise SMTPAuthError(
                SMTPErrorCode.AUTH_NOT_SUPPORTED,
                f"the SMTP server offers no AUTH mechanism Mailroom can use: {offered}{hint}",
                stage=SMTPStage.AUTH,
            )
        refusal: aiosmtplib.SMTPAuthenticationError | None = None
        for mechanism in mechanisms:
            method = (
                self._auth_oauthbearer
                if mechanism == "oauthbearer"
                else getattr(smtp, "auth_" + mechanism.replace("-", ""))
            )
            try:
                await method(server.username, server.password, timeout=server.timeouts.command)
            except aiosmtplib.SMTPAuthenticationError as exc:
                refusal = exc
                if exc.code == REPLY_MECHANISM_UNKNOWN and smtp.is_connected:
                    continue  # advertised but not really supported: try the next one
                break  # a verdict on the credentials: do not offer them again
            except (aiosmtplib.SMTPException, OSError) as exc:
                self.abort()
                raise self._translate(exc, SMTPStage.AUTH) from exc
            else:
                self._steps.append(
                    VerifyStep(VerifyStepName.AUTH, True, None, f"{mechanism.upper()} accepted")
                )
                return
        assert refusal is not None
        if not 400 <= refusal.code < 600:
            self.abort()  # e.g. 250 to AUTH: whatever this server is, it is not SMTP AUTH
            raise SMTPProtocolError(
                SMTPErrorCode.PROTOCOL_ERROR,
                "unexpected reply to AUTH",
                stage=SMTPStage.AUTH,
                smtp_code=refusal.code,
                smtp_message=refusal.message,
                transient=True,
            ) from refusal
        if refusal.code == REPLY_SERVICE_CLOSING or not smtp.is_connected:
            self.abort()
            raise self._reply_error(
                SMTPStage.AUTH,
                SMTPResponse(refusal.code, refusal.message),
                "the server closed the session",
            ) from refusal
        raise SMTPAuthError(
            SMTPErrorCode.AUTH_FAILED,
            "the SMTP server refused the credentials",
            stage=SMTPStage.AUTH,
            smtp_code=refusal.code,
            smtp_message=refusal.message,
        ) from refusal

    async def _auth_oauthbearer(
        self,
        username: str,
        token: str,
        *,
        timeout: float,  # noqa: ASYNC109 - the signature of aiosmtplib's auth_* methods
    ) -> SMTPResponse:
        """AUTH OAUTHBEARER (RFC 7628) with the initial response; an error challenge
        (334 with a JSON status) is answered with the dummy ``^A`` the RFC asks for."""
        smtp = self._require(SMTPStage.AUTH)
        raw = oauthbearer_response(username, token, self.server.host, self.server.port)
        encoded = base64.b64encode(raw)
        response = await smtp.execute_command(b"AUTH", b"OAUTHBEARER", encoded, timeout=timeout)
        if response.code == 334:
            response = await smtp.execute_command(base64.b64encode(b"\x01"), timeout=timeout)
        if response.code != 235:
            raise aiosmtplib.SMTPAuthenticationError(response.code, response.message)
        return response

    def _record_failure(self, exc: SMTPDeliveryError) -> None:
        step = _STEP_OF_STAGE.get(exc.stage, VerifyStepName.CONNECT)
        if step is not VerifyStepName.CONNECT and not any(
            s.step is VerifyStepName.CONNECT for s in self._steps
        ):
            # Implicit TLS fails before any greeting, but the TCP connection was made.
            self._steps.append(
                VerifyStep(VerifyStepName.CONNECT, True, None, f"{self._peer}: connected")
            )
        self._steps.append(VerifyStep(step, False, str(exc.code), str(exc)))

    # -- sending ----------------------------------------------------------------------

    async def send(
        self,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        smtputf8: bool = False,
    ) -> SendResult:
        """Send ``message`` (RFC 5322 bytes) in one mail transaction.

        Addresses must already be validated (``service.mail``); ``smtputf8`` asks for the
        SMTPUTF8 extension (also implied by a non-ASCII address). Line ends are normalized
        to CRLF and the data is dot-stuffed here.

        :returns: the per-recipient outcomes and the reply to the final dot, when at
            least one recipient was accepted and the server accepted the message.
        :raises SMTPAllRecipientsRefused: no recipient accepted; nothing was sent.
        :raises SMTPReplyError: MAIL, DATA or the final dot got 4xx/5xx; ``recipients``
            carries the RCPT outcomes.
        :raises SMTPDeliveryError: connection, timeout or protocol failures (the
            session is then no longer :attr:`usable`).
        :raises ValueError: an empty recipient list or an address unsafe on a command line.
        """
        if not recipients:
            raise ValueError("at least one recipient is required")
        for address in (mail_from, *recipients):
            if not address or _UNSAFE_IN_PATH.search(address):
                raise ValueError(f"address {address!r} is not safe on an SMTP command line")
        async with self._lock:
            return await self._send(mail_from, recipients, message, smtputf8=smtputf8)

    async def _send(
        self, mail_from: str, recipients: Sequence[str], message: bytes, *, smtputf8: bool
    ) -> SendResult:
        smtp = self._require()
        timeouts = self.server.timeouts
        needs_utf8 = smtputf8 or not all(a.isascii() for a in (mail_from, *recipients))
        payload, size = prepare_data(message)
        options = self._mail_options(smtp, size, needs_utf8, eight_bit=not message.isascii())
        encoding = "utf-8" if needs_utf8 else "ascii"

        mail = b" ".join((b"MAIL", b"FROM:<" + mail_from.encode(encoding) + b">", *options))
        rcpts = [b"RCPT TO:<" + address.encode(encoding) + b">" for address in recipients]
        if smtp.supports_extension("pipelining"):
            # RFC 2920: MAIL and every RCPT in one write, then their replies in order.
            replies = await self._pipelined(
                [(SMTPStage.MAIL, mail, timeouts.mail)]
                + [(SMTPStage.RCPT, rcpt, timeouts.rcpt) for rcpt in rcpts]
            )
        else:
            replies = [await self._command(SMTPStage.MAIL, mail, limit=timeouts.mail)]
            if replies[0].code == REPLY_OK:
                for rcpt in rcpts:
                    replies.append(await self._command(SMTPStage.RCPT, rcpt, limit=timeouts.rcpt))
                    if replies[-1].code == REPLY_SERVICE_CLOSING:
                        break
        reply = replies[0]
        if reply.code != REPLY_OK:
            raise self._reply_error(SMTPStage.MAIL, reply, "the server refused the sender")

        outcomes: list[RecipientOutcome] = []
        for address, reply in zip(recipients, replies[1:], strict=False):
            if reply.code == REPLY_SERVICE_CLOSING:
                raise self._reply_error(
                    SMTPStage.RCPT, reply, "the server closed the session", outcomes
                )
            outcomes.append(self._recipient_outcome(address, reply))
        if not any(o.status is RcptStatus.ACCEPTED for o in outcomes):
            await self._reset_quietly()
            deferred = any(o.status is RcptStatus.DEFERRED for o in outcomes)
            last = outcomes[-1]
            raise SMTPAllRecipientsRefused(
                SMTPErrorCode.DEFERRED if deferred else SMTPErrorCode.REJECTED,
                f"the server refused all {len(outcomes)} recipients",
                stage=SMTPStage.RCPT,
                smtp_code=last.smtp_code,
                smtp_message=last.smtp_message,
                transient=deferred,
                recipients=outcomes,
            )

        reply = await self._command(SMTPStage.DATA, b"DATA", limit=timeouts.data_initiation)
        if reply.code != REPLY_START_INPUT:
            error = self._reply_error(SMTPStage.DATA, reply, "the server refused DATA", outcomes)
            await self._reset_quietly()
            raise error

        reply = await self._transmit(payload)
        if reply.code != REPLY_OK:
            raise self._reply_error(
                SMTPStage.MESSAGE, reply, "the server refused the message", outcomes
            )
        self._messages_sent += 1
        return SendResult(tuple(outcomes), reply.code, reply.message)

    def _mail_options(
        self, smtp: aiosmtplib.SMTP, size: int, needs_utf8: bool, *, eight_bit: bool
    ) -> list[bytes]:
        options: list[bytes] = []
        if smtp.supports_extension("size"):
            options.append(b"SIZE=%d" % size)
        if needs_utf8:
            if not smtp.supports_extension("smtputf8"):
                raise SMTPExtensionMissing(
                    SMTPErrorCode.SMTPUTF8_NOT_SUPPORTED,
                    "the message needs SMTPUTF8 (a non-ASCII address) and the server lacks it",
                    stage=SMTPStage.MAIL,
                )
            options.append(b"SMTPUTF8")
        if eight_bit or needs_utf8:
            if smtp.supports_extension("8bitmime"):
                options.append(b"BODY=8BITMIME")
            elif eight_bit:
                raise SMTPExtensionMissing(
                    SMTPErrorCode.EXTENSION_NOT_SUPPORTED,
                    "the message has 8-bit data and the server lacks 8BITMIME",
                    stage=SMTPStage.MAIL,
                )
        return options

    def _recipient_outcome(self, address: str, reply: SMTPResponse) -> RecipientOutcome:
        if reply.code in (REPLY_OK, REPLY_WILL_FORWARD):
            status = RcptStatus.ACCEPTED
        elif 400 <= reply.code < 500:
            status = RcptStatus.DEFERRED
        elif 500 <= reply.code < 600:
            status = RcptStatus.REJECTED
        else:
            self.abort()  # out of step with the server: the connection cannot be trusted
            raise SMTPProtocolError(
                SMTPErrorCode.PROTOCOL_ERROR,
                f"unexpected reply to RCPT for {address}",
                stage=SMTPStage.RCPT,
                smtp_code=reply.code,
                smtp_message=reply.message,
                transient=True,
            )
        return RecipientOutcome(address, status, reply.code, reply.message)

    async def _transmit(self, payload: bytes) -> SMTPResponse:
        """Write the prepared message and read the reply to the final dot."""
        self._stage = SMTPStage.MESSAGE
        smtp = self._require(SMTPStage.MESSAGE)
        protocol = smtp.protocol
        timeouts = self.server.timeouts
        if protocol is None:
            self.abort()
            raise SMTPConnectionFailed(
                SMTPErrorCode.CONNECTION_LOST, "the connection is closed", stage=SMTPStage.MESSAGE
            )
        try:
            protocol.write(payload)
            # asyncio buffers the whole message, so the RFC's per-block wait (3 min) and
            # its wait for the final reply (10 min) are one wait here: both minimums hold.
            reply = await protocol.read_response(
                timeout=timeouts.data_block + timeouts.data_termination
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.abort()
            raise self._translate(exc, SMTPStage.MESSAGE) from exc
        except asyncio.CancelledError:
            # The message may have been delivered; a retry resends the same Message-ID.
            self.abort()
            raise
        if reply.code == REPLY_SERVICE_CLOSING:
            self.abort()
        return reply

    # -- upkeep -----------------------------------------------------------------------

    async def reset(self) -> None:
        """RSET: abandon any transaction in progress.

        :raises SMTPDeliveryError: the session is not usable afterwards.
        """
        async with self._lock:
            reply = await self._command(SMTPStage.RSET, b"RSET", limit=self.server.timeouts.command)
            if reply.code != REPLY_OK:
                self.abort()
                raise self._reply_error(SMTPStage.RSET, reply, "the server refused RSET")

    async def check_envelope(self, mail_from: str, recipient: str) -> SMTPResponse:
        """MAIL FROM and RCPT TO, then RSET: would the server take this envelope? (no DATA)

        Used by verify: a refused EHLO name, sender or recipient shows here, not on the
        first real send.

        :returns: the reply to RCPT (2xx).
        :raises SMTPReplyError: MAIL or RCPT refused (the server's reply attached).
        :raises SMTPDeliveryError: connection, timeout or protocol failures.
        :raises ValueError: an address unsafe on an SMTP command line.
        """
        for address in (mail_from, recipient):
            if not address or _UNSAFE_IN_PATH.search(address):
                raise ValueError(f"address {address!r} is not safe on an SMTP command line")
        async with self._lock:
            smtp = self._require()
            timeouts = self.server.timeouts
            needs_utf8 = not (mail_from.isascii() and recipient.isascii())
            options = self._mail_options(smtp, 0, needs_utf8, eight_bit=False)
            options = [o for o in options if not o.startswith(b"SIZE=")]  # no message yet
            encoding = "utf-8" if needs_utf8 else "ascii"
            reply = await self._command(
                SMTPStage.MAIL,
                b"MAIL",
                b"FROM:<" + mail_from.encode(encoding) + b">",
                *options,
                limit=timeouts.mail,
            )
            if reply.code != REPLY_OK:
                error = self._reply_error(SMTPStage.MAIL, reply, "the server refused the sender")
                await self._reset_quietly()
                raise error
            reply = await self._command(
                SMTPStage.RCPT,
                b"RCPT",
                b"TO:<" + recipient.encode(encoding) + b">",
                limit=timeouts.rcpt,
            )
            await self._reset_quietly()
            if reply.code not in (REPLY_OK, REPLY_WILL_FORWARD):
                raise self._reply_error(SMTPStage.RCPT, reply, "the server refused the recipient")
            return reply

    async def check(self) -> bool:
        """NOOP: whether the connection still works (use before reusing an idle session).

        Never raises for SMTP reasons; a failed check closes the connection.
        """
        if not self.usable:
            return False
        async with self._lock:
            try:
                reply = await self._command(
                    SMTPStage.NOOP, b"NOOP", limit=self.server.timeouts.command
                )
            except SMTPDeliveryError:
                return False
            if reply.code != REPLY_OK:
                self.abort()
                return False
            return True

    async def _reset_quietly(self) -> None:
        """RSET after a refused transaction; on failure the session is simply closed."""
        try:
            reply = await self._command(SMTPStage.RSET, b"RSET", limit=self.server.timeouts.command)
        except SMTPDeliveryError:
            return
        if reply.code != REPLY_OK:
            self.abort()

    # -- plumbing ---------------------------------------------------------------------

    def _require(self, stage: SMTPStage = SMTPStage.MAIL) -> aiosmtplib.SMTP:
        smtp = self._smtp
        if smtp is None or not smtp.is_connected:
            self.abort()
            raise SMTPConnectionFailed(
                SMTPErrorCode.CONNECTION_LOST,
                "the session is not connected",
                stage=stage,
            )
        return smtp

    def abort(self) -> None:
        """Drop the connection without QUIT (a transaction cut short cannot go on)."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    async def _command(self, stage: SMTPStage, *args: bytes, limit: float) -> SMTPResponse:
        self._stage = stage
        smtp = self._require(stage)
        try:
            reply = await smtp.execute_command(*args, timeout=limit)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.abort()
            raise self._translate(exc, stage) from exc
        except asyncio.CancelledError:
            self.abort()  # a reply is still owed: the connection is out of step for good
            raise
        if reply.code == REPLY_SERVICE_CLOSING:
            self.abort()  # RFC 5321 section 3.8: the server closes after 421
        return reply

    async def _pipelined(
        self, commands: Sequence[tuple[SMTPStage, bytes, float]]
    ) -> list[SMTPResponse]:
        """Write ``commands`` at once, then read one reply per command, in order.

        aiosmtplib reads one reply per command written and drops what arrives while no
        command waits, so the replies are read here: the transport's protocol is swapped
        for a :class:`_ReplyCollector` for the exchange and given back afterwards. A 421
        ends the exchange (the server closes); the list is then shorter than ``commands``.
        """
        self._stage = commands[0][0]
        smtp = self._require(self._stage)
        protocol = smtp.protocol
        transport = protocol.transport if protocol is not None else None
        if protocol is None or transport is None or transport.is_closing():
            self.abort()
            raise SMTPConnectionFailed(
                SMTPErrorCode.CONNECTION_LOST, "the connection is closed", stage=self._stage
            )
        collector = _ReplyCollector(protocol)
        transport.set_protocol(collector)
        replies: list[SMTPResponse] = []
        try:
            protocol.write(b"".join(line + b"\r\n" for _, line, _ in commands))
            for stage, _, limit in commands:
                self._stage = stage
                reply = await collector.next_reply(limit)
                replies.append(reply)
                if reply.code == REPLY_SERVICE_CLOSING:
                    self.abort()  # RFC 5321 section 3.8: the server closes after 421
                    break
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.abort()
            raise self._translate(exc, self._stage) from exc
        except asyncio.CancelledError:
            self.abort()  # replies are still owed: the connection is out of step for good
            raise
        finally:
            if not transport.is_closing():
                transport.set_protocol(protocol)
        if collector.pending and self._smtp is not None:
            self.abort()  # more replies than commands: out of step with the server
            raise SMTPProtocolError(
                SMTPErrorCode.PROTOCOL_ERROR,
                "the server sent replies to commands it was not given",
                stage=self._stage,
                transient=True,
            )
        return replies

    def _reply_error(
        self,
        stage: SMTPStage,
        reply: SMTPResponse,
        detail: str,
        recipients: Sequence[RecipientOutcome] = (),
    ) -> SMTPDeliveryError:
        if 400 <= reply.code < 500:
            return SMTPReplyError(
                SMTPErrorCode.DEFERRED,
                detail,
                stage=stage,
                smtp_code=reply.code,
                smtp_message=reply.message,
                recipients=recipients,
            )
        if 500 <= reply.code < 600:
            return SMTPReplyError(
                SMTPErrorCode.REJECTED,
                detail,
                stage=stage,
                smtp_code=reply.code,
                smtp_message=reply.message,
                # Refused at EHLO and HELO: the server will not talk to this client, whatever
                # the message; the account's settings (or the EHLO name) must change.
                account_level=stage is SMTPStage.EHLO,
                recipients=recipients,
            )
        self.abort()  # a reply that makes no sense here: out of step with the server
        return SMTPProtocolError(
            SMTPErrorCode.PROTOCOL_ERROR,
            f"unexpected reply at {stage}",
            stage=stage,
            smtp_code=reply.code,
            smtp_message=reply.message,
            transient=True,
        )

    def _translate(self, exc: BaseException, stage: SMTPStage) -> SMTPDeliveryError:
        """Map an aiosmtplib/socket/ssl exception to this package's errors."""
        host = self.server.host
        cert_error = _find_cause(exc, ssl.SSLCertVerificationError)
        if cert_error is not None:
            return SMTPSecurityError(
                SMTPErrorCode.TLS_CERTIFICATE_INVALID,
                f"the certificate of the SMTP server {host} is not trusted: "
                f"{cert_error.verify_message or cert_error.reason}",
                stage=stage if stage is SMTPStage.STARTTLS else SMTPStage.TLS,
            )
        ssl_error = _find_cause(exc, ssl.SSLError)
        if ssl_error is not None:
            return SMTPSecurityError(
                SMTPErrorCode.TLS_FAILED,
                f"the TLS handshake with the SMTP server {host} failed:"
                f" {ssl_error.reason or ssl_error}",
                stage=stage if stage is SMTPStage.STARTTLS else SMTPStage.TLS,
                transient=True,  # also a connection reset mid-handshake
            )
        if isinstance(exc, TimeoutError):  # aiosmtplib's timeouts are TimeoutErrors
            return SMTPTimedOut(
                SMTPErrorCode.TIMEOUT,
                f"the SMTP server {host} did not answer {stage_words(stage)} in time",
                stage=stage,
            )
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            if exc.code < 0:
                return SMTPProtocolError(
                    SMTPErrorCode.PROTOCOL_ERROR,
                    f"the SMTP server {host} sent a malformed reply to {stage_words(stage)}:"
                    f" {exc.message}",
                    stage=stage,
                    transient=True,
                )
            refused = (
                "the server greeted with an error"
                if stage is SMTPStage.GREETING
                else f"the server refused {stage.value.upper()}"
            )
            return self._reply_error(stage, SMTPResponse(exc.code, exc.message), refused)
        if isinstance(exc, aiosmtplib.SMTPConnectError) and stage in (
            SMTPStage.TLS,
            SMTPStage.GREETING,
        ):
            return SMTPConnectionFailed(
                SMTPErrorCode.CONNECT_FAILED,
                f"the SMTP server {host} closed the connection before its greeting",
                stage=SMTPStage.GREETING,
            )
        if isinstance(exc, ConnectionError | aiosmtplib.SMTPServerDisconnected | OSError):
            return SMTPConnectionFailed(
                SMTPErrorCode.CONNECTION_LOST,
                f"the SMTP server {host} closed the connection during {stage_words(stage)}",
                stage=stage,
            )
        return SMTPProtocolError(
            SMTPErrorCode.PROTOCOL_ERROR,
            f"the session with the SMTP server {host} failed at {stage_words(stage)}: {exc}",
            stage=stage,
            transient=True,
        )


class _ReplyCollector(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol while pipelined commands' replies are read.

    Keeps every byte the server sends and splits it into replies (RFC 5321 section 4.2:
    ``code-text`` continuation lines, then ``code text``). The connection's end is passed
    on to the protocol it stands in for, so the client sees it too.
    """

    def __init__(self, inner: asyncio.BaseProtocol) -> None:
        self._inner = inner
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._replies: deque[SMTPResponse] = deque()
        self._failure: aiosmtplib.SMTPException | None = None
        self._arrived = asyncio.Event()

    @property
    def pending(self) -> bool:
        """Whether bytes or replies came beyond those read."""
        return bool(self._replies or self._buffer or self._lines)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) != -1:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._line(line)
        if len(self._buffer) > MAX_REPLY_LINE_OCTETS:
            self._fail(aiosmtplib.SMTPResponseException(-1, "reply line too long"))
        self._arrived.set()

    def _line(self, line: bytes) -> None:
        if len(line) > MAX_REPLY_LINE_OCTETS or not line[:3].isdigit():
            self._fail(aiosmtplib.SMTPResponseException(-1, "malformed SMTP reply line"))
            return
        self._lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
        if sum(map(len, self._lines)) > MAX_REPLY_OCTETS:
            self._fail(aiosmtplib.SMTPResponseException(-1, "reply too long"))
        elif line[3:4] != b"-":
            self._replies.append(SMTPResponse(int(line[:3]), "\n".join(self._lines)))
            self._lines = []

    def _fail(self, exc: aiosmtplib.SMTPException) -> None:
        if self._failure is None:
            self._failure = exc
        self._arrived.set()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("unexpected EOF received"))
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("connection lost"))
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    async def next_reply(self, limit: float) -> SMTPResponse:
        """The next whole reply; waits at most ``limit`` seconds for it.

        :raises aiosmtplib.SMTPException: the connection ended, a malformed reply, or
            ``SMTPReadTimeoutError`` when the reply did not come in time.
        """
        try:
            async with asyncio.timeout(limit):
                while not self._replies:
                    if self._failure is not None:
                        raise self._failure
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError as exc:
            raise aiosmtplib.SMTPReadTimeoutError("timed out waiting for a reply") from exc
        return self._replies.popleft()
