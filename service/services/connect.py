"""Opening connections to an account's mail servers, through the outbound guard.

Every connection dials an address the guard has resolved and checked (so a DNS answer
that changes between check and connect cannot reach a forbidden network), while TLS
still verifies the account's host name.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from service.domain.accounts import Account
from service.errors import FieldError, Invalid
from service.netguard import ConnectionGuard, HostNotAllowed, NetGuardError
from service.pop3.client import POP3Client
from service.smtp.config import SMTPServer
from service.tls import client_context


class ConnectFailure(Exception):
    """No connection was attempted: the host is refused or does not resolve."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class MailConnector:
    """Builds POP3 clients and SMTP server settings for accounts."""

    def __init__(
        self,
        guard: ConnectionGuard,
        *,
        ca_file: str | None,
        pop3_timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self._guard = guard
        self._ca_file = ca_file
        # One verifying context for every POP3 connection: building one loads the CAs.
        self._ssl_context = client_context(ca_file)
        self._pop3_timeout_s = pop3_timeout_s
        self._connect_timeout_s = connect_timeout_s

    async def check_account(self, account: Account) -> None:
        """Refuse (422 ``host_not_allowed``) hosts that resolve into forbidden networks.

        A name that does not resolve now is accepted: DNS may be down, and every
        connection checks again before it dials.
        """
        problems: list[FieldError] = []
        for field, host, port in (
            ("incoming.host", account.incoming.host, account.incoming.port),
            ("outgoing.host", account.outgoing.host, account.outgoing.port),
        ):
            try:
                await self._guard.resolve(host, port)
            except HostNotAllowed as exc:
                problems.append(FieldError(field, str(exc)))
            except NetGuardError:
                continue
        if problems:
            raise Invalid(
                "; ".join(f"{p.field}: {p.message}" for p in problems),
                code="host_not_allowed",
                errors=problems,
            )

    async def address(self, host: str, port: int) -> str:
        """The checked address to dial for ``host`` (DNS bounded by the connect timeout)."""
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                addresses = await self._guard.resolve(host, port)
        except NetGuardError as exc:
            raise ConnectFailure(exc.code, str(exc)) from exc
        except TimeoutError:
            raise ConnectFailure("timeout", f"resolving {host} timed out") from None
        return addresses[0]

    @contextlib.asynccontextmanager
    async def pop3(self, account: Account) -> AsyncIterator[POP3Client]:
        """A connected POP3 client (greeting read); QUIT is the caller's to send."""
        incoming = account.incoming
        address = await self.address(incoming.host, incoming.port)
        client = POP3Client(
            incoming.host,
            incoming.port,
            incoming.security,
            ssl_context=self._ssl_context,
            connect_address=address,
            timeout=self._pop3_timeout_s,
        )
        async with client:
            yield client

    async def smtp_server(self, account: Account, password: str | None) -> SMTPServer:
        """The SMTP settings of ``account`` with a checked address to dial."""
        outgoing = account.outgoing
        address = await self.address(outgoing.host, outgoing.port)
        return SMTPServer(
            host=outgoing.host,
            port=outgoing.port,
            security=outgoing.security,
            username=outgoing.username,
            password=password,
            allow_insecure_auth=outgoing.allow_insecure_auth,
            ca_file=self._ca_file,
            connect_address=address,
        )
