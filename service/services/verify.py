""" "Test Account Settings": connect, TLS and authenticate to the POP3 and SMTP servers.

Each server gets a list of steps in order; the first failed step ends that server's
check. Nothing is retrieved, sent or deleted (POP3 ends with QUIT after STAT, SMTP with
QUIT after AUTH). Passwords never appear in a step's detail.
"""

from __future__ import annotations

import asyncio

import msgspec

from service.domain.accounts import Account
from service.domain.enums import Security
from service.pop3.errors import (
    AuthFailed,
    POP3ConnectError,
    POP3Error,
    TLSCertificateInvalid,
    TLSHandshakeError,
    TLSRequired,
)
from service.services.accounts import AccountService
from service.services.connect import ConnectFailure, MailConnector
from service.smtp.session import verify as verify_smtp


class VerifyStep(msgspec.Struct, frozen=True):
    step: str  # connect | tls | auth | mailbox
    ok: bool
    code: str | None
    detail: str


class ServerCheck(msgspec.Struct, frozen=True):
    ok: bool
    steps: list[VerifyStep]


class VerifyResult(msgspec.Struct, frozen=True):
    ok: bool
    incoming: ServerCheck
    outgoing: ServerCheck


def _check(steps: list[VerifyStep]) -> ServerCheck:
    return ServerCheck(ok=bool(steps) and all(s.ok for s in steps), steps=steps)


class AccountVerifier:
    def __init__(self, accounts: AccountService, connector: MailConnector) -> None:
        self._accounts = accounts
        self._connector = connector

    async def verify(self, tenant: str, account_id: str) -> VerifyResult:
        account = await self._accounts.get(tenant, account_id)
        incoming, outgoing = await asyncio.gather(self._pop3(account), self._smtp(account))
        return VerifyResult(ok=incoming.ok and outgoing.ok, incoming=incoming, outgoing=outgoing)

    async def _pop3(self, account: Account) -> ServerCheck:
        credentials = self._accounts.credentials(account)
        steps: list[VerifyStep] = []
        where = f"{account.incoming.host}:{account.incoming.port}"
        try:
            async with self._connector.pop3(account) as client:
                steps.append(VerifyStep("connect", True, None, f"connected to {where}"))
                if account.incoming.security is not Security.NONE:
                    steps.append(
                        VerifyStep("tls", True, None, "TLS established, certificate valid")
                    )
                await client.login(account.incoming.username, credentials.incoming_password)
                steps.append(VerifyStep("auth", True, None, "credentials accepted"))
                status = await client.stat()
                steps.append(
                    VerifyStep(
                        "mailbox",
                        True,
                        None,
                        f"{status.messages} message(s), {status.size} bytes on the server",
                    )
                )
        except ConnectFailure as exc:
            steps.append(VerifyStep("connect", False, exc.code, exc.detail))
        except (TLSRequired, TLSCertificateInvalid, TLSHandshakeError) as exc:
            steps.append(VerifyStep("connect", True, None, f"connected to {where}"))
            steps.append(VerifyStep("tls", False, exc.code, exc.detail))
        except POP3ConnectError as exc:
            steps.append(VerifyStep("connect", False, exc.code, exc.detail))
        except AuthFailed as exc:
            steps.append(VerifyStep("auth", False, exc.code, exc.detail))
        except POP3Error as exc:
            step = "mailbox" if any(s.step == "auth" for s in steps) else "connect"
            steps.append(VerifyStep(step, False, exc.code, exc.detail))
        return _check(steps)

    async def _smtp(self, account: Account) -> ServerCheck:
        credentials = self._accounts.credentials(account)
        try:
            server = await self._connector.smtp_server(account, credentials.outgoing_password)
        except ConnectFailure as exc:
            return _check([VerifyStep("connect", False, exc.code, exc.detail)])
        return _check(
            [
                VerifyStep(step.step.value, step.ok, step.code, step.detail)
                for step in await verify_smtp(server)
            ]
        )
