"""OAuth2 for POP3 and SMTP: sealed grants, the refresh-token grant, SASL initial responses.

An account side (incoming or outgoing) with ``auth: "oauth2"`` keeps its grant sealed in
the same column as a password would be (``service.crypto``, bound to its own field name):
JSON with ``token_url``, ``client_id``, ``client_secret``, ``refresh_token``, ``scope`` and
the current ``access_token``. Either Mailroom refreshes (a refresh token is stored) or the
caller does (only an access token, replaced by a PATCH).

Refresh (RFC 6749 section 6) happens before the access token expires (``REFRESH_MARGIN_S``)
or when none is held: one POST to ``token_url`` at an address the outbound guard admits,
with the certificate verified. The new grant (with the rotated refresh token, when the
provider rotates) is stored before the access token is used, so a crash right after never
leaves the only valid refresh token in memory. A refusal from the provider (a 4xx with an
OAuth ``error``) pauses the account with ``oauth_refresh_failed`` and the provider's text;
a PATCH of the credentials resumes it. A provider that cannot be reached is transient.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import msgspec

from service.codes import ErrorCode
from service.crypto import CredentialCipher, CredentialError
from service.domain.accounts import Account, SMTPPause
from service.domain.time import utcnow
from service.errors import Unavailable
from service.logs import log_event
from service.netguard import ConnectionGuard, NetGuardError
from service.repository.accounts import AccountRepository
from service.services.autoconfig import _dechunk
from service.tls import client_context

logger = logging.getLogger("mailroom.oauth")

Side = Literal["in", "out"]
# Field names bound into each sealed grant (associated data), not secrets.
GRANT_FIELDS: dict[Side, str] = {"in": "incoming.oauth2", "out": "outgoing.oauth2"}
#: Refresh when the access token has less than this left.
REFRESH_MARGIN_S = 300.0
#: Lifetime assumed when a token response gives no ``expires_in``.
DEFAULT_LIFETIME_S = 3600.0
MAX_RESPONSE_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 15.0
#: Provider error text kept in a pause (the rest is cut).
MAX_DETAIL = 300


class Grant(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The sealed secrets of one OAuth2 side (never logged, never in a response)."""

    token_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    refresh_token: str | None = None
    scope: str | None = None
    access_token: str | None = None

    def __repr__(self) -> str:
        return "Grant(<redacted>)"


def seal_grant(cipher: CredentialCipher, grant: Grant, account_id: str, side: Side) -> str:
    return cipher.encrypt(
        msgspec.json.encode(grant).decode(), account_id=account_id, field=GRANT_FIELDS[side]
    )


def open_grant(cipher: CredentialCipher, sealed: str, account_id: str, side: Side) -> Grant:
    plain = cipher.decrypt(sealed, account_id=account_id, field=GRANT_FIELDS[side])
    return msgspec.json.decode(plain, type=Grant)


class OAuthRefreshFailed(Exception):
    """No access token: the provider refused the refresh (``transient`` False) or could
    not be reached (True)."""

    def __init__(self, detail: str, *, transient: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.transient = transient
        self.code = ErrorCode.OAUTH_REFRESH_FAILED


@dataclass(frozen=True)
class TokenResponse:
    access_token: str
    expires_at: datetime
    refresh_token: str | None


class OAuthTokens:
    """Current access tokens for accounts, refreshed and stored as needed."""

    def __init__(
        self,
        repository: AccountRepository,
        cipher: CredentialCipher,
        guard: ConnectionGuard,
        *,
        ca_file: str | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
        margin_s: float = REFRESH_MARGIN_S,
    ) -> None:
        self._repo = repository
        self._cipher = cipher
        self._guard = guard
        self._ssl = client_context(ca_file)
        self._timeout_s = timeout_s
        self._margin = timedelta(seconds=margin_s)
        self._locks: dict[tuple[str, Side], asyncio.Lock] = {}

    async def access_token(self, account: Account, side: Side, *, pause: bool = True) -> str:
        """The access token to authenticate ``side`` of ``account`` with.

        :raises OAuthRefreshFailed: (after pausing the account when the provider refused).
        :raises Unavailable: the sealed grant cannot be decrypted.

        ``pause=False``: the caller pauses the account itself (delivery, which also holds
        the account's waiting messages).
        """
        token, _ = await self.token(account, side, pause=pause)
        return token

    async def token(
        self, account: Account, side: Side, *, pause: bool = True
    ) -> tuple[str, TokenResponse | None]:
        """``access_token`` with the refresh it took (None: the token held was used).

        An account not stored (POST /v1/verify) is refreshed but nothing is stored.
        """
        server = account.incoming if side == "in" else account.outgoing
        sealed = server.password_encrypted
        assert sealed is not None
        grant = self._open(sealed, account.id, side)
        if grant.refresh_token is None:  # caller-managed
            return grant.access_token or "", None
        if grant.access_token and not self._expiring(server.token_expires_at):
            return grant.access_token, None
        lock = self._locks.setdefault((account.id, side), asyncio.Lock())
        async with lock:
            # Another task may have refreshed meanwhile: read the stored grant again.
            fresh = await self._repo.get_any(account.id)
            if fresh is not None:
                server = fresh.incoming if side == "in" else fresh.outgoing
                if server.auth == "oauth2" and server.password_encrypted is not None:
                    sealed = server.password_encrypted
                    grant = self._open(sealed, account.id, side)
                    if grant.access_token and not self._expiring(server.token_expires_at):
                        return grant.access_token, None
                    if grant.refresh_token is None:
                        return grant.access_token or "", None
            try:
                answer = await self.refresh(grant)
            except OAuthRefreshFailed as exc:
                if fresh is not None and not exc.transient:
                    # Another process (a replica) may have refreshed meanwhile, which a
                    # rotating provider answers with invalid_grant for the old token.
                    theirs = await self._stored_elsewhere(account.id, side, sealed)
                    if theirs is not None:
                        return theirs, None
                if pause and not exc.transient:
                    await self._pause(fresh, exc.detail)
                raise
            if fresh is None:  # a draft: nothing to store
                return answer.access_token, answer
            renewed = msgspec.structs.replace(
                grant,
                access_token=answer.access_token,
                refresh_token=answer.refresh_token or grant.refresh_token,
            )
            stored = await self._repo.store_grant(
                account.id,
                side,
                seal_grant(self._cipher, renewed, account.id, side),
                answer.expires_at,
                was=sealed,
            )
            log_event(
                logger,
                "oauth2 token refreshed",
                account_id=account.id,
                side=side,
                rotated=answer.refresh_token is not None,
                stored=stored,
                expires_at=answer.expires_at.isoformat(),
            )
            if not stored:
                # A PATCH replaced the grant meanwhile: use what the caller gave now.
                raise OAuthRefreshFailed(
                    "the credentials changed during the refresh; try again", transient=True
                )
            return answer.access_token, answer

    async def _stored_elsewhere(self, account_id: str, side: Side, sealed: str) -> str | None:
        """The access token another refresh stored since ``sealed`` was read, if any."""
        again = await self._repo.get_any(account_id)
        if again is None:
            return None
        server = again.incoming if side == "in" else again.outgoing
        if server.auth != "oauth2" or server.password_encrypted in (None, sealed):
            return None
        assert server.password_encrypted is not None
        grant = self._open(server.password_encrypted, account_id, side)
        if grant.access_token and not self._expiring(server.token_expires_at):
            return grant.access_token
        return None

    def _expiring(self, expires_at: datetime | None) -> bool:
        return expires_at is None or expires_at - self._margin <= utcnow()

    def _open(self, sealed: str, account_id: str, side: Side) -> Grant:
        try:
            return open_grant(self._cipher, sealed, account_id, side)
        except (CredentialError, msgspec.DecodeError) as exc:
            raise Unavailable(
                f"stored OAuth2 credentials of account {account_id} cannot be decrypted:"
                " is MAILROOM_SECRET_KEY (or the key file) the one they were stored with?",
                code=ErrorCode.CREDENTIALS_UNREADABLE,
            ) from exc

    async def _pause(self, account: Account | None, detail: str) -> None:
        if account is None:
            return
        pause = SMTPPause(code=ErrorCode.OAUTH_REFRESH_FAILED, detail=detail, since=utcnow())
        paused = await self._repo.pause_smtp(account.id, pause, settings_of=account.updated_at)
        if paused:
            log_event(
                logger,
                "account paused",
                level=logging.WARNING,
                tenant=account.tenant,
                account_id=account.id,
                code=pause.code,
                detail=detail,
            )

    async def refresh(self, grant: Grant) -> TokenResponse:
        """The refresh-token grant (RFC 6749 section 6) against ``grant.token_url``."""
        assert grant.token_url is not None and grant.refresh_token is not None
        form = {"grant_type": "refresh_token", "refresh_token": grant.refresh_token}
        if grant.client_id is not None:
            form["client_id"] = grant.client_id
        if grant.client_secret is not None:
            form["client_secret"] = grant.client_secret
        if grant.scope is not None:
            form["scope"] = grant.scope
        status, body = await self._post(grant.token_url, urllib.parse.urlencode(form))
        try:
            answer = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            answer = None
        if not isinstance(answer, dict):
            raise OAuthRefreshFailed(
                f"the token endpoint answered HTTP {status} without a JSON object",
                transient=status >= 500 or status == 429,
            )
        if status != 200 or "error" in answer:
            error = str(answer.get("error", f"HTTP {status}"))
            text = answer.get("error_description")
            detail = f"the token endpoint refused the refresh: {error}"
            if text:
                detail += f" ({str(text)[:MAX_DETAIL]})"
            raise OAuthRefreshFailed(detail, transient=status >= 500 or status == 429)
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise OAuthRefreshFailed(
                "the token endpoint's answer has no access_token", transient=False
            )
        lifetime = answer.get("expires_in", DEFAULT_LIFETIME_S)
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool):
            lifetime = DEFAULT_LIFETIME_S
        rotated = answer.get("refresh_token")
        return TokenResponse(
            access_token=token,
            expires_at=utcnow() + timedelta(seconds=max(0.0, float(lifetime))),
            refresh_token=rotated if isinstance(rotated, str) and rotated else None,
        )

    async def _post(self, url: str, form: str) -> tuple[int, bytes]:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        if parts.scheme != "https" or not host:
            raise OAuthRefreshFailed(f"the token URL is not an https URL: {url}", transient=False)
        port = parts.port or 443
        try:
            async with asyncio.timeout(self._timeout_s):
                addresses = await self._guard.resolve(host, port)
                return await self._exchange(host, port, addresses[0], parts, form)
        except NetGuardError as exc:
            raise OAuthRefreshFailed(
                f"token endpoint {host}: {exc}", transient=exc.transient
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            raise OAuthRefreshFailed(
                f"token endpoint {host}: certificate not valid: {exc.verify_message}",
                transient=False,
            ) from exc
        except TimeoutError:
            raise OAuthRefreshFailed(
                f"token endpoint {host} did not answer within {self._timeout_s:g} s",
                transient=True,
            ) from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise OAuthRefreshFailed(
                f"token endpoint {host}: {exc or type(exc).__name__}", transient=True
            ) from exc

    async def _exchange(
        self, host: str, port: int, address: str, parts: urllib.parse.SplitResult, form: str
    ) -> tuple[int, bytes]:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        reader, writer = await asyncio.open_connection(
            address, port, ssl=self._ssl, server_hostname=host, limit=MAX_RESPONSE_BYTES
        )
        try:
            host_header = host if parts.port is None else f"{host}:{port}"
            payload = form.encode("ascii")
            writer.write(
                (
                    f"POST {target} HTTP/1.1\r\nHost: {host_header}\r\n"
                    "Content-Type: application/x-www-form-urlencoded\r\n"
                    f"Content-Length: {len(payload)}\r\nAccept: application/json\r\n"
                    "User-Agent: Mailroom-oauth2\r\nConnection: close\r\n\r\n"
                ).encode("ascii")
                + payload
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            body = b""
            while len(body) <= MAX_RESPONSE_BYTES:
                more = await reader.read(MAX_RESPONSE_BYTES + 1 - len(body))
                if not more:
                    break
                body += more
        finally:
            writer.transport.abort()
        lines = head.decode("latin-1").split("\r\n")
        status_parts = lines[0].split(" ", 2)
        if len(status_parts) < 2 or not status_parts[1].isdigit():
            raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
        if len(body) > MAX_RESPONSE_BYTES:
            raise ValueError("the token endpoint's answer is too large")
        if any(
            line.lower().startswith("transfer-encoding:") and "chunked" in line.lower()
            for line in lines[1:]
        ):
            body = _dechunk(body)
        return int(status_parts[1]), body
