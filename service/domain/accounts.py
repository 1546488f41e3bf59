"""The Account aggregate: a mail identity with its POP3 and SMTP servers and policies."""

from __future__ import annotations

from datetime import datetime

import msgspec

from service.domain.enums import Security

POP3_PORTS = {Security.TLS: 995, Security.STARTTLS: 110, Security.NONE: 110}
SMTP_PORTS = {Security.TLS: 465, Security.STARTTLS: 587, Security.NONE: 25}


class IncomingServer(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int
    security: Security
    username: str
    # The sealed secret: the password, or with ``auth`` "oauth2" the sealed OAuth2 grant.
    password_encrypted: str
    auth: str = "password"  # "password" or "oauth2"
    token_expires_at: datetime | None = None  # oauth2: when the current access token ends


class OutgoingServer(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int
    security: Security
    username: str | None = None
    password_encrypted: str | None = None
    allow_insecure_auth: bool = False
    auth: str = "password"  # "password" or "oauth2" (then password_encrypted is the grant)
    token_expires_at: datetime | None = None


class RetrievalPolicy(msgspec.Struct, frozen=True, kw_only=True):
    leave_on_server: bool = True
    delete_after_days: int | None = None
    max_message_bytes: int | None = None
    poll_interval_minutes: int | None = None


class SMTPPause(msgspec.Struct, frozen=True, kw_only=True):
    """Why delivery for an account stopped: a failure only new settings can fix.

    Stored with the account, so it holds across restarts; a PATCH of the outgoing settings
    clears it.
    """

    code: str  # an ErrorCode: auth_failed, tls_required, tls_certificate_invalid, ...
    detail: str
    since: datetime


class Account(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant: str
    name: str
    email: str
    display_name: str | None
    incoming: IncomingServer
    outgoing: OutgoingServer
    retrieval: RetrievalPolicy
    # Set when delivery found the outgoing settings wrong (refused credentials, TLS that
    # cannot be had as asked, EHLO refused...): nothing is sent until they are updated.
    smtp_pause: SMTPPause | None = None
    created_at: datetime
    updated_at: datetime
    # The POP3 server's LOGIN-DELAY, learned at the last retrieval: a floor for polling.
    login_delay_s: int | None = None
