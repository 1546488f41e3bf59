""" "Test Account Settings": connect, TLS and authenticate to the POP3 and SMTP servers.

Each server gets a list of steps in order; the first failed step ends that server's
check. Nothing is retrieved, sent or deleted (POP3 ends with QUIT after STAT; SMTP tries
MAIL FROM and RCPT TO with the account's own address, then RSET and QUIT, no DATA).
Passwords never appear in a step's detail.

Both servers are checked at once, each within ``timeout_s`` (``MAILROOM_VERIFY_TIMEOUT``):
a step cut short by it fails with ``timeout``. A greeting or a TLS handshake gets only a
share of that budget, so a TLS mode that does not fit the port is diagnosed in time (a
probe connection asks the port which mode it speaks, see :mod:`service.services.probe`)
rather than after the 5-minute SMTP greeting timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
from enum import StrEnum

import msgspec

from service.codes import ErrorCode
from service.domain.accounts import Account
from service.domain.enums import Security
from service.pop3.errors import (
    AuthFailed,
    POP3ConnectionLost,
    POP3Error,
    POP3TimeoutError,
    TLSCertificateInvalid,
    TLSHandshakeError,
    TLSRequired,
)
from service.services.accounts import AccountService
from service.services.connect import ConnectFailure, MailConnector
from service.services.oauth import OAuthRefreshFailed, Side
from service.services.probe import (
    MailProtocol,
    implicit_tls_hint,
    plain_greeting,
    plaintext_hint,
    speaks_tls,
)
from service.smtp.config import QUIT_TIMEOUT, SMTPServer, SMTPTimeouts
from service.smtp.verify import verify as verify_smtp

DEFAULT_VERIFY_TIMEOUT_S = 30.0
# Shares of the budget: connecting, a greeting or a TLS handshake may take a third of it,
# the probe that explains a TLS-mode mix-up a sixth, so both end well within the budget.
STEP_SHARE = 1 / 3
PROBE_SHARE = 1 / 6
# The SMTP check always gets a moment, even if resolving the host used up the budget.
MIN_REMAINING_S = 0.1


class VerifyStepName(StrEnum):
    """The steps a verify reports, in order (``mailbox`` is POP3's, ``envelope`` SMTP's)."""

    TOKEN = "token"  # OAuth2 only: an access token held or refreshed  # noqa: S105
    CONNECT = "connect"  # TCP, greeting (and EHLO for SMTP)
    TLS = "tls"  # implicit TLS or STARTTLS, certificate verified
    AUTH = "auth"  # credentials accepted
    MAILBOX = "mailbox"  # POP3 STAT
    ENVELOPE = "envelope"  # SMTP MAIL FROM + RCPT TO accepted, then RSET (no DATA)


class VerifyStep(msgspec.Struct, frozen=True):
    step: VerifyStepName
    ok: bool
    code: ErrorCode | None
    detail: str


class ServerCheck(msgspec.Struct, frozen=True):
    ok: bool
    steps: list[VerifyStep]


class VerifyResult(msgspec.Struct, frozen=True):
    ok: bool
    incoming: ServerCheck
    outgoing: ServerCheck


def _step(step: VerifyStepName, ok: bool, code: str | None, detail: str) -> VerifyStep:
    """A step whose ``code`` came from a lower layer as a string (a catalogue member)."""
    return VerifyStep(step, ok, None if code is None else ErrorCode(code), detail)


def _check(steps: list[VerifyStep]) -> ServerCheck:
    return ServerCheck(ok=bool(steps) and all(s.ok for s in steps), steps=steps)


def _cut_short(step: VerifyStepName, budget_s: float) -> VerifyStep:
    return VerifyStep(
        step,
        False,
        ErrorCode.TIMEOUT,
        f"the {step} step did not finish within the verify time limit of {budget_s:g} s",
    )


class AccountVerifier:
    """Runs the settings test of an account against its POP3 and SMTP servers."""

    def __init__(
        self,
        accounts: AccountService,
        connector: MailConnector,
        *,
        timeout_s: float = DEFAULT_VERIFY_TIMEOUT_S,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError("the verify timeout must be positive")
        self._accounts = accounts
        self._connector = connector
        self._timeout_s = timeout_s
        self._step_s = timeout_s * STEP_SHARE
        self._probe_s = timeout_s * PROBE_SHARE

    async def verify(self, tenant: str, account_id: str) -> VerifyResult:
        """Check both servers of the account, concurrently, within the verify budget."""
        return await self.check(await self._accounts.get(tenant, account_id))

    async def check(self, account: Account) -> VerifyResult:
        """Check both servers of ``account`` (stored, or a draft that is never stored)."""
        incoming, outgoing = await asyncio.gather(self._pop3(account), self._smtp(account))
        return VerifyResult(ok=incoming.ok and outgoing.ok, incoming=incoming, outgoing=outgoing)

    # -- POP3 ---------------------------------------------------------------------------

    async def _pop3(self, account: Account) -> ServerCheck:
        steps: list[VerifyStep] = []
        try:
            async with asyncio.timeout(self._timeout_s) as deadline:
                await self._pop3_steps(account, steps)
        except TimeoutError:
            if not deadline.expired():
                raise
            planned = [VerifyStepName.CONNECT]
            if account.incoming.auth == "oauth2":
                planned.insert(0, VerifyStepName.TOKEN)
            if account.incoming.security is not Security.NONE:
                planned.append(VerifyStepName.TLS)
            planned += [VerifyStepName.AUTH, VerifyStepName.MAILBOX]
            done = {s.step for s in steps}
            pending = [name for name in planned if name not in done]
            # Nothing pending: only the goodbye (QUIT) was cut short, which changes nothing.
            if pending and (not steps or steps[-1].ok):
                steps.append(_cut_short(pending[0], self._timeout_s))
        return _check(steps)

    async def _token_step(
        self, account: Account, side: Side, steps: list[VerifyStep]
    ) -> str | None:
        """OAuth2: an access token (refreshed when due), with its step; None: failed."""
        try:
            token, detail = await self._accounts.token_for_verify(account, side)
        except OAuthRefreshFailed as exc:
            steps.append(VerifyStep(VerifyStepName.TOKEN, False, exc.code, exc.detail))
            return None
        steps.append(VerifyStep(VerifyStepName.TOKEN, True, None, detail))
        return token

    async def _pop3_steps(self, account: Account, steps: list[VerifyStep]) -> None:
        credentials = self._accounts.credentials(account)
        incoming = account.incoming
        oauth2 = incoming.auth == "oauth2"
        secret = credentials.incoming_password
        if oauth2:
            token = await self._token_step(account, "in", steps)
            if token is None:
                return
            secret = token
        try:
            async with self._connector.pop3(account, timeout_s=self._step_s) as client:
                self._pop3_connected(account, steps)
                if incoming.security is not Security.NONE:
                    steps.append(
                        VerifyStep(
                            VerifyStepName.TLS, True, None, "TLS established, certificate valid"
                        )
                    )
                await client.login(incoming.username, secret, oauth2=oauth2)
                steps.append(VerifyStep(VerifyStepName.AUTH, True, None, "credentials accepted"))
                status = await client.stat()
                steps.append(
                    VerifyStep(
                        VerifyStepName.MAILBOX,
                        True,
                        None,
                        f"{status.messages} message(s), {status.size} bytes on the server",
                    )
                )
        except ConnectFailure as exc:
            steps.append(_step(VerifyStepName.CONNECT, False, exc.code, exc.detail))
        except (TLSRequired, TLSCertificateInvalid) as exc:
            self._pop3_connected(account, steps)
            steps.append(VerifyStep(VerifyStepName.TLS, False, exc.code, exc.detail))
        except POP3Error as exc:
            await self._pop3_failure(account, steps, exc)

    @staticmethod
    def _pop3_connected(account: Account, steps: list[VerifyStep]) -> None:
        if not any(s.step is VerifyStepName.CONNECT for s in steps):
            where = f"{account.incoming.host}:{account.incoming.port}"
            steps.append(VerifyStep(VerifyStepName.CONNECT, True, None, f"connected to {where}"))

    async def _pop3_failure(
        self, account: Account, steps: list[VerifyStep], exc: POP3Error
    ) -> None:
        """Record the step ``exc`` ended, explaining a TLS mode that does not fit the port."""
        incoming = account.incoming
        if isinstance(exc, AuthFailed):
            steps.append(VerifyStep(VerifyStepName.AUTH, False, exc.code, exc.detail))
            return
        if any(s.step is VerifyStepName.CONNECT for s in steps):  # greeted: auth or STAT
            done = {s.step for s in steps if s.ok}
            step = VerifyStepName.MAILBOX if VerifyStepName.AUTH in done else VerifyStepName.AUTH
            steps.append(_step(step, False, exc.code, exc.detail))
            return
        if isinstance(exc, POP3TimeoutError) and incoming.security is not Security.TLS:
            # No greeting: a port that waits for a TLS handshake never sends one.
            if await self._implicit_tls_port(incoming.host, incoming.port):
                steps.append(
                    VerifyStep(
                        VerifyStepName.CONNECT,
                        False,
                        ErrorCode.TLS_FAILED,
                        implicit_tls_hint(incoming.port, self._step_s),
                    )
                )
                return
        elif isinstance(exc, TLSHandshakeError | POP3ConnectionLost) and (
            incoming.security is Security.TLS
        ):
            # The TCP connection was made; the handshake failed. A plain-text greeting on
            # the port says why.
            code, detail = exc.code, exc.detail
            if await self._plaintext_port(incoming.host, incoming.port, MailProtocol.POP3):
                code, detail = ErrorCode.TLS_FAILED, plaintext_hint(incoming.port)
            elif isinstance(exc, POP3ConnectionLost):
                steps.append(VerifyStep(VerifyStepName.CONNECT, False, exc.code, exc.detail))
                return
            self._pop3_connected(account, steps)
            steps.append(VerifyStep(VerifyStepName.TLS, False, code, detail))
            return
        elif isinstance(exc, TLSHandshakeError):  # during STLS
            self._pop3_connected(account, steps)
            steps.append(VerifyStep(VerifyStepName.TLS, False, exc.code, exc.detail))
            return
        steps.append(_step(VerifyStepName.CONNECT, False, exc.code, exc.detail))

    # -- SMTP ---------------------------------------------------------------------------

    async def _smtp(self, account: Account) -> ServerCheck:
        loop = asyncio.get_running_loop()
        end = loop.time() + self._timeout_s
        credentials = self._accounts.credentials(account)
        secret = credentials.outgoing_password
        oauth2 = account.outgoing.auth == "oauth2"
        token_steps: list[VerifyStep] = []
        if oauth2:
            try:
                async with asyncio.timeout_at(end):
                    secret = await self._token_step(account, "out", token_steps)
            except TimeoutError:
                return _check([_cut_short(VerifyStepName.TOKEN, self._timeout_s)])
            if secret is None:
                return _check(token_steps)
        try:
            async with asyncio.timeout_at(end):
                server = await self._connector.smtp_server(account, secret, oauth2=oauth2)
        except ConnectFailure as exc:
            return _check([_step(VerifyStepName.CONNECT, False, exc.code, exc.detail)])
        except TimeoutError:
            return _check([_cut_short(VerifyStepName.CONNECT, self._timeout_s)])
        server = dataclasses.replace(server, timeouts=self._smtp_timeouts())
        found = await verify_smtp(
            server,
            envelope=(account.email, account.email),
            timeout_s=max(end - loop.time(), MIN_REMAINING_S),
            time_limit_s=self._timeout_s,
        )
        steps = token_steps + [
            _step(VerifyStepName(s.step.value), s.ok, s.code, s.detail) for s in found
        ]
        if steps and not steps[-1].ok:
            try:
                async with asyncio.timeout_at(end):
                    steps[-1] = await self._explain_smtp(steps[-1], server)
            except TimeoutError:
                pass  # no time left to explain: the failure stands as it is
        return _check(steps)

    async def _explain_smtp(self, failed: VerifyStep, server: SMTPServer) -> VerifyStep:
        """``failed`` with a hint when the TLS mode does not fit the port."""
        address = server.connect_address or server.host
        if (
            server.security is not Security.TLS
            and failed.step is VerifyStepName.CONNECT
            and failed.code == ErrorCode.TIMEOUT
            and await speaks_tls(address, server.port, server.host, self._probe_s)
        ):
            return VerifyStep(
                failed.step,
                False,
                ErrorCode.TLS_FAILED,
                implicit_tls_hint(server.port, self._step_s),
            )
        if (
            server.security is Security.TLS
            and failed.step in (VerifyStepName.CONNECT, VerifyStepName.TLS)
            and failed.code in (ErrorCode.TLS_FAILED, ErrorCode.CONNECTION_LOST)
            and await plain_greeting(address, server.port, MailProtocol.SMTP, self._probe_s)
        ):
            return VerifyStep(failed.step, False, ErrorCode.TLS_FAILED, plaintext_hint(server.port))
        return failed

    def _smtp_timeouts(self) -> SMTPTimeouts:
        # Connecting and the greeting (which also bounds an implicit TLS handshake) get a
        # step's share; the other commands are bounded by the whole budget.
        return SMTPTimeouts(
            connect=self._step_s,
            greeting=self._step_s,
            command=self._timeout_s,
            mail=self._timeout_s,
            rcpt=self._timeout_s,
            quit=min(QUIT_TIMEOUT, self._probe_s),
        )

    # -- probes -------------------------------------------------------------------------

    async def _implicit_tls_port(self, host: str, port: int) -> bool:
        """Whether ``host:port`` completes a TLS handshake (a greeting that never came)."""
        try:
            address = await self._connector.address(host, port)
        except ConnectFailure:
            return False
        return await speaks_tls(address, port, host, self._probe_s)

    async def _plaintext_port(self, host: str, port: int, protocol: MailProtocol) -> bool:
        """Whether ``host:port`` greets in plain text (a TLS handshake that failed)."""
        try:
            address = await self._connector.address(host, port)
        except ConnectFailure:
            return False
        return await plain_greeting(address, port, protocol, self._probe_s) is not None
