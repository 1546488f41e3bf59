"""Account use cases: create, read, update, delete; credentials encrypted on the way in."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from msgspec import UnsetType

from service.codes import ErrorCode
from service.crypto import CredentialCipher, CredentialError
from service.domain.accounts import (
    POP3_PORTS,
    SMTP_PORTS,
    Account,
    IncomingServer,
    OutgoingServer,
    RetrievalPolicy,
)
from service.domain.enums import Security
from service.domain.ids import new_id
from service.domain.inputs import (
    AccountInput,
    AccountPatch,
    IncomingInput,
    IncomingPatch,
    OutgoingInput,
    OutgoingPatch,
    check_grant,
)
from service.domain.time import utcnow
from service.errors import FieldError, Invalid, NotFound, Unavailable
from service.logs import log_event
from service.repository.accounts import AccountRepository
from service.repository.notify import Notifier, Topic
from service.repository.pages import Page
from service.services.oauth import Grant, OAuthTokens, Side, open_grant, seal_grant
from service.services.presets import PresetCatalog

logger = logging.getLogger("mailroom.accounts")

# Field names bound into each ciphertext (associated data), not secrets.
IN_PASSWORD = "incoming.password"  # noqa: S105
OUT_PASSWORD = "outgoing.password"  # noqa: S105

# Checks an account's hosts before they are saved (the outbound connection guard);
# raises Invalid with code ``host_not_allowed``.
HostCheck = Callable[[Account], Awaitable[None]]


async def _no_host_check(account: Account) -> None:
    return None


class Credentials(msgspec.Struct, frozen=True):
    """Decrypted secrets of one account; only ever held in memory while connecting."""

    incoming_password: str  # with oauth2: the current access token
    outgoing_password: str | None
    incoming_oauth2: bool = False
    outgoing_oauth2: bool = False

    def __repr__(self) -> str:  # never print a password, even in a traceback
        return "Credentials(<redacted>)"


class AccountService:
    def __init__(
        self,
        repository: AccountRepository,
        cipher: CredentialCipher,
        *,
        max_message_bytes: int,
        host_check: HostCheck = _no_host_check,
        notifier: Notifier | None = None,
        presets: PresetCatalog | None = None,
        oauth: OAuthTokens | None = None,
    ) -> None:
        """``notifier``: told when an account's outgoing settings change (delivery waiting
        on them resumes at once, in whichever process delivers)."""
        self._repo = repository
        self._notifier = notifier
        self._cipher = cipher
        self._max_message_bytes = max_message_bytes
        self._host_check = host_check
        self._presets = presets if presets is not None else PresetCatalog()
        self._oauth = oauth

    async def create(self, tenant: str, data: AccountInput) -> Account:
        account = await self.draft(tenant, data)
        await self._repo.add(account)
        return account

    async def draft(self, tenant: str, data: AccountInput) -> Account:
        """The account ``data`` describes, checked (preset filled, hosts allowed) and its
        passwords sealed, but not stored: what create stores and POST /v1/verify tests."""
        account_id = new_id("acc")
        now = utcnow()
        self._check_cap(data.retrieval.max_message_bytes)
        data = self._presets.fill(data)
        inc, out = data.incoming, data.outgoing
        in_security = inc.security or Security.TLS
        out_security = out.security or Security.TLS
        assert inc.host is not None and out.host is not None  # fill() makes sure
        account = Account(
            id=account_id,
            tenant=tenant,
            name=data.name,
            email=data.email,
            display_name=data.display_name,
            incoming=IncomingServer(
                host=inc.host,
                port=inc.port or POP3_PORTS[in_security],
                security=in_security,
                username=inc.username,
                password_encrypted=(
                    self._seal_grant(_grant_of(inc), account_id, "in")
                    if inc.auth == "oauth2"
                    else self._seal(inc.password or "", account_id, IN_PASSWORD)
                ),
                auth=inc.auth,
            ),
            outgoing=OutgoingServer(
                host=out.host,
                port=out.port or SMTP_PORTS[out_security],
                security=out_security,
                username=out.username,
                password_encrypted=(
                    self._seal_grant(_grant_of(out), account_id, "out")
                    if out.auth == "oauth2"
                    else None
                    if out.password is None
                    else self._seal(out.password, account_id, OUT_PASSWORD)
                ),
                allow_insecure_auth=out.allow_insecure_auth,
                auth=out.auth,
            ),
            retrieval=RetrievalPolicy(
                leave_on_server=data.retrieval.leave_on_server,
                delete_after_days=data.retrieval.delete_after_days,
                max_message_bytes=data.retrieval.max_message_bytes,
                poll_interval_minutes=data.retrieval.poll_interval_minutes,
            ),
            created_at=now,
            updated_at=now,
        )
        await self._host_check(account)
        return account

    async def get(self, tenant: str, account_id: str) -> Account:
        account = await self._repo.get(tenant, account_id)
        if account is None:
            raise NotFound(f"no account {account_id!r}")
        return account

    async def page(self, tenant: str, *, after: str | None, limit: int) -> Page[Account]:
        return await self._repo.page(tenant, after=after, limit=limit)

    async def update(self, tenant: str, account_id: str, patch: AccountPatch) -> Account:
        current = await self.get(tenant, account_id)
        changes: dict[str, object] = {}
        for field in ("name", "email", "display_name"):
            value = getattr(patch, field)
            if not isinstance(value, UnsetType):
                changes[field] = value
        incoming = current.incoming
        if not isinstance(patch.incoming, UnsetType):
            p = patch.incoming
            incoming = msgspec.structs.replace(
                incoming,
                **_given(p, "host", "username"),
                **_security_and_port(incoming.security, incoming.port, p, POP3_PORTS),
            )
            incoming = self._patch_auth(account_id, incoming, p, "in")
        outgoing = current.outgoing
        smtp_pause = current.smtp_pause
        outgoing_changed = not isinstance(patch.outgoing, UnsetType)
        if (
            not isinstance(patch.incoming, UnsetType)
            and current.smtp_pause is not None
            and current.smtp_pause.code == ErrorCode.OAUTH_REFRESH_FAILED
        ):
            # New incoming credentials end a pause their refresh caused.
            outgoing_changed = True
            smtp_pause = None
        if not isinstance(patch.outgoing, UnsetType):
            outgoing = self._patch_outgoing(account_id, outgoing, patch.outgoing)
            # New outgoing settings (even `{}`: "try again") end a delivery pause.
            smtp_pause = None
        retrieval = current.retrieval
        if not isinstance(patch.retrieval, UnsetType):
            retrieval = msgspec.structs.replace(
                retrieval,
                **_given(
                    patch.retrieval,
                    "leave_on_server",
                    "delete_after_days",
                    "max_message_bytes",
                    "poll_interval_minutes",
                ),
            )
            self._check_cap(retrieval.max_message_bytes)
            if retrieval.delete_after_days is not None and not retrieval.leave_on_server:
                raise Invalid(
                    "`delete_after_days` needs `leave_on_server: true`",
                    errors=[FieldError("retrieval.delete_after_days", "needs leave_on_server")],
                )
        updated = msgspec.structs.replace(
            current,
            **changes,
            incoming=incoming,
            outgoing=outgoing,
            retrieval=retrieval,
            smtp_pause=smtp_pause,
            updated_at=utcnow(),
        )
        await self._host_check(updated)
        await self._repo.replace(updated, outgoing_changed=outgoing_changed)
        if outgoing_changed:
            if current.smtp_pause is not None:
                log_event(
                    logger,
                    "account resumed",
                    tenant=tenant,
                    account_id=account_id,
                    code=current.smtp_pause.code,
                    paused_since=current.smtp_pause.since.isoformat(),
                )
            if self._notifier is not None:
                # Delivery waiting on this account's settings (a pause, a backoff) resumes
                # at once.
                self._notifier.publish(Topic.OUTGOING, account_id)
        return updated

    def _patch_outgoing(
        self, account_id: str, current: OutgoingServer, p: OutgoingPatch
    ) -> OutgoingServer:
        out = msgspec.structs.replace(
            current,
            **_given(p, "host", "allow_insecure_auth"),
            **_security_and_port(current.security, current.port, p, SMTP_PORTS),
        )
        if not isinstance(p.username, UnsetType):
            out = msgspec.structs.replace(out, username=p.username)
        out = self._patch_auth(account_id, out, p, "out")
        if (out.username is None) != (out.password_encrypted is None):
            raise Invalid(
                "SMTP auth needs both `username` and `password`, or neither",
                errors=[FieldError("outgoing", "give both username and password, or neither")],
            )
        return out

    async def delete(self, tenant: str, account_id: str) -> None:
        if not await self._repo.delete(tenant, account_id):
            raise NotFound(f"no account {account_id!r}")

    async def secrets(
        self,
        account: Account,
        *,
        incoming: bool = True,
        outgoing: bool = True,
        pause: bool = True,
    ) -> Credentials:
        """What a connection authenticates with: the passwords, or for OAuth2 sides a
        current access token (refreshed and stored first when it is about to expire).

        ``incoming=False`` / ``outgoing=False``: that side is not needed (its OAuth2 token
        is not refreshed).

        :raises OAuthRefreshFailed: no access token could be had.
        """
        plain = self.credentials(account)
        in_oauth = account.incoming.auth == "oauth2"
        out_oauth = account.outgoing.auth == "oauth2"
        if not (in_oauth and incoming) and not (out_oauth and outgoing):
            return plain
        if self._oauth is None:
            raise Unavailable("OAuth2 is not set up in this process")
        in_token = plain.incoming_password
        if in_oauth and incoming:
            in_token = await self._oauth.access_token(account, "in", pause=pause)
        out_token = plain.outgoing_password
        if out_oauth and outgoing:
            out_token = await self._oauth.access_token(account, "out", pause=pause)
        return Credentials(
            incoming_password=in_token,
            outgoing_password=out_token,
            incoming_oauth2=in_oauth,
            outgoing_oauth2=out_oauth,
        )

    async def token_for_verify(self, account: Account, side: Side) -> tuple[str, str]:
        """An access token for ``side`` and what verify says of it."""
        if self._oauth is None:
            raise Unavailable("OAuth2 is not set up in this process")
        token, refreshed = await self._oauth.token(account, side)
        if refreshed is not None:
            detail = (
                f"access token refreshed, valid until {refreshed.expires_at:%Y-%m-%dT%H:%M:%SZ}"
            )
            if refreshed.refresh_token is not None:
                detail += "; the provider rotated the refresh token"
            return token, detail
        server = account.incoming if side == "in" else account.outgoing
        until = server.token_expires_at
        return token, "access token held" + (
            "" if until is None else f", valid until {until:%Y-%m-%dT%H:%M:%SZ}"
        )

    def credentials(self, account: Account) -> Credentials:
        """Decrypt the account's passwords for a connection (never for a response).

        OAuth2 sides have no password here: their sealed grant is ``secrets``' to open.
        """
        try:
            incoming = (
                ""
                if account.incoming.auth == "oauth2"
                else self._cipher.decrypt(
                    account.incoming.password_encrypted, account_id=account.id, field=IN_PASSWORD
                )
            )
            outgoing = (
                None
                if account.outgoing.password_encrypted is None or account.outgoing.auth == "oauth2"
                else self._cipher.decrypt(
                    account.outgoing.password_encrypted, account_id=account.id, field=OUT_PASSWORD
                )
            )
        except CredentialError as exc:
            raise Unavailable(
                f"stored credentials of account {account.id} cannot be decrypted:"
                " is MAILROOM_SECRET_KEY (or the key file) the one they were stored with?",
                code=ErrorCode.CREDENTIALS_UNREADABLE,
            ) from exc
        return Credentials(incoming_password=incoming, outgoing_password=outgoing)

    def _seal(self, secret: str, account_id: str, field: str) -> str:
        return self._cipher.encrypt(secret, account_id=account_id, field=field)

    def _seal_grant(self, grant: Grant, account_id: str, side: Side) -> str:
        return seal_grant(self._cipher, grant, account_id, side)

    def _patch_auth(self, account_id: str, server: _Server, p: _Patch, side: Side) -> _Server:
        """Apply a PATCH's ``auth``, ``password`` and OAuth2 fields to one side.

        OAuth2 fields given merge into the stored grant; a new ``refresh_token`` or
        ``access_token`` replaces the token held (an access token alone makes the grant
        caller-managed). Switching ``auth`` needs the new kind's secrets in the same PATCH.
        """
        field = IN_PASSWORD if side == "in" else OUT_PASSWORD
        auth = server.auth if isinstance(p.auth, UnsetType) else p.auth
        oauth_given = {
            name: getattr(p, name)
            for name in _GRANT_NAMES
            if not isinstance(getattr(p, name), UnsetType)
        }
        where = "incoming" if side == "in" else "outgoing"
        if auth == "password":
            if oauth_given:
                raise Invalid(
                    "OAuth2 fields need `auth: oauth2`",
                    errors=[FieldError(where, "OAuth2 fields need auth oauth2")],
                )
            if not isinstance(p.password, UnsetType):
                sealed = None if p.password is None else self._seal(p.password, account_id, field)
                return msgspec.structs.replace(
                    server, password_encrypted=sealed, auth=auth, token_expires_at=None
                )
            if server.auth != "password":
                raise Invalid(
                    "switching to `auth: password` needs `password`",
                    errors=[FieldError(f"{where}.password", "required with auth password")],
                )
            return server
        if not isinstance(p.password, UnsetType) and p.password is not None:
            raise Invalid(
                "`auth: oauth2` takes no `password`",
                errors=[FieldError(f"{where}.password", "not with auth oauth2")],
            )
        if server.auth == "oauth2" and server.password_encrypted is not None:
            try:
                grant = open_grant(self._cipher, server.password_encrypted, account_id, side)
            except (CredentialError, msgspec.DecodeError):
                grant = Grant()
        else:
            grant = Grant()
        if not oauth_given and server.auth == "oauth2":
            return server
        if "refresh_token" in oauth_given:
            oauth_given["access_token"] = None
        elif "access_token" in oauth_given:
            oauth_given["refresh_token"] = None
        grant = msgspec.structs.replace(grant, **oauth_given)
        try:
            check_grant(grant)
        except ValueError as exc:
            raise Invalid(str(exc), errors=[FieldError(where, str(exc))]) from None
        if server.username is None:
            raise Invalid(
                "`auth: oauth2` needs `username`",
                errors=[FieldError(f"{where}.username", "required with auth oauth2")],
            )
        return msgspec.structs.replace(
            server,
            password_encrypted=self._seal_grant(grant, account_id, side),
            auth="oauth2",
            token_expires_at=None,
        )

    def _check_cap(self, cap: int | None) -> None:
        if cap is not None and cap > self._max_message_bytes:
            raise Invalid(
                f"`max_message_bytes` is above this service's limit ({self._max_message_bytes})",
                errors=[
                    FieldError("retrieval.max_message_bytes", f"at most {self._max_message_bytes}")
                ],
            )


_GRANT_NAMES = ("token_url", "client_id", "client_secret", "refresh_token", "scope", "access_token")
_Server = TypeVar("_Server", IncomingServer, OutgoingServer)
_Patch = IncomingPatch | OutgoingPatch


def _grant_of(side: IncomingInput | OutgoingInput) -> Grant:
    return Grant(**{name: getattr(side, name) for name in _GRANT_NAMES})


def _given(patch: msgspec.Struct, *fields: str) -> dict[str, object]:
    """The named fields the patch sets (not UNSET)."""
    return {
        name: getattr(patch, name)
        for name in fields
        if not isinstance(getattr(patch, name), UnsetType)
    }


def _security_and_port(
    security: Security, port: int, patch: msgspec.Struct, defaults: dict[Security, int]
) -> dict[str, object]:
    """A new security mode moves the port along with it when the port was the default."""
    new_security = getattr(patch, "security")  # noqa: B009 - shared by two patch types
    new_port = getattr(patch, "port")  # noqa: B009
    changes: dict[str, object] = {}
    if not isinstance(new_security, UnsetType):
        changes["security"] = new_security
        if isinstance(new_port, UnsetType) and port == defaults[security]:
            changes["port"] = defaults[new_security]
    if not isinstance(new_port, UnsetType):
        changes["port"] = new_port
    return changes
