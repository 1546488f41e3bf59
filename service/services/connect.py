"""Opening connections to an account's mail servers, through the outbound guard.

Every connection dials an address the guard has resolved and checked (so a DNS answer
that changes between check and connect cannot reach a forbidden network), while TLS
still verifies the account's host name.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import idna

from service.config import MIN_RATE_WINDOW_S
from service.domain.accounts import Account
from service.errors import FieldError, Invalid
from service.netguard import ConnectionGuard, HostNotAllowed, NetGuardError
from service.pop3.client import POP3Client
from service.smtp.config import SMTPServer
from service.tls import client_context

# A host name that says nothing about who is connecting: never used as the EHLO name.
_UNQUALIFIED = frozenset({"localhost", "localhost.localdomain", "localdomain"})


def ehlo_name(configured: str | None, fqdn: str, email: str) -> str:
    """The name Mailroom gives in EHLO for an account.

    Submission servers often refuse a name that is not fully qualified
    (``reject_non_fqdn_helo_hostname``), so: the configured name, else this host's FQDN
    when it has a dot, else the domain of the account's address (in its ASCII form).
    """
    if configured:
        return configured
    if "." in fqdn.strip(".") and fqdn.lower() not in _UNQUALIFIED and _printable(fqdn):
        return fqdn
    domain = email.rpartition("@")[2]
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return domain if domain.isascii() and _printable(domain) else "localhost"


def _printable(name: str) -> bool:
    return bool(name) and all(c.isascii() and c.isprintable() and not c.isspace() for c in name)


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
        ehlo_name: str | None = None,
    ) -> None:
        self._guard = guard
        self._ehlo_name = ehlo_name
        self._fqdn: str | None = None  # looked up once, on first use
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
    async def pop3(
        self,
        account: Account,
        *,
        timeout_s: float | None = None,
        session_timeout: float | None = None,
        min_rate: int = 0,
        rate_window: float = MIN_RATE_WINDOW_S,
    ) -> AsyncIterator[POP3Client]:
        """A connected POP3 client (greeting read); QUIT is the caller's to send.

        ``timeout_s`` shortens each network step (verify answers within its own budget).
        ``session_timeout``, ``min_rate`` and ``rate_window`` bound the whole session
        (a retrieval's deadline and minimum transfer rate; see ``POP3Client``).
        """
        incoming = account.incoming
        address = await self.address(incoming.host, incoming.port)
        timeout = self._pop3_timeout_s
        if timeout_s is not None:
            timeout = min(timeout, timeout_s)
        client = POP3Client(
            incoming.host,
            incoming.port,
            incoming.security,
            ssl_context=self._ssl_context,
            connect_address=address,
            timeout=timeout,
            session_timeout=session_timeout,
            min_rate=min_rate,
            rate_window=rate_window,
        )
        async with client:
            yield client

    async def smtp_server(
        self, account: Account, password: str | None, *, oauth2: bool = False
    ) -> SMTPServer:
        """The SMTP settings of ``account`` with a checked address to dial."""
        outgoing = account.outgoing
        address = await self.address(outgoing.host, outgoing.port)
        if self._fqdn is None and not self._ehlo_name:
            try:
                self._fqdn = await asyncio.to_thread(socket.getfqdn)
            except OSError:
                self._fqdn = ""
        return SMTPServer(
            host=outgoing.host,
            port=outgoing.port,
            security=outgoing.security,
            username=outgoing.username,
            password=password,
            allow_insecure_auth=outgoing.allow_insecure_auth,
            ca_file=self._ca_file,
            connect_address=address,
            local_hostname=ehlo_name(self._ehlo_name, self._fqdn or "", account.email),
            oauth2=oauth2,
        )
