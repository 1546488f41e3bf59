"""Validated inputs for accounts: the request bodies of create and update.

They are the API's request schemas too (the API layer imports them), so every rule here
shows in the OpenAPI document: lengths, ranges and patterns as ``Meta``; cross-field rules
in ``__post_init__`` (msgspec reports those as validation errors at decode time).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from service.domain.enums import Security

# No C0/C1 control characters (CR, LF, NUL, TAB...), DEL, or Unicode line separators:
# anything that could split a protocol line or a log line.
# Python's `$` also matches before a final "\n"; `(?!\n)` closes that gap, and the pattern
# stays a valid ECMAScript regex for the OpenAPI document.
END = r"$(?!\n)"
NO_CONTROLS = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*" + END
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}\.?\Z){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")

MAX_NAME = 200
MAX_CREDENTIAL = 255
MAX_PASSWORD = 1024
MAX_DELETE_AFTER_DAYS = 3650
MAX_POLL_MINUTES = 7 * 24 * 60
MIN_MESSAGE_CAP = 1024
MAX_MESSAGE_CAP = 1 << 31  # the highest MAILROOM_MAX_MESSAGE_BYTES accepted

Port = Annotated[int, Meta(ge=1, le=65535, description="TCP port; default follows `security`")]
Host = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9.:-]+" + END,
        description="DNS host name or IP address literal",
        examples=["pop.example.com"],
    ),
]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME, pattern=NO_CONTROLS)]
DisplayName = Annotated[str, Meta(max_length=MAX_NAME, pattern=NO_CONTROLS)]
Email = Annotated[
    str,
    Meta(
        min_length=3,
        max_length=254,
        pattern=r"^[^\s@\x00-\x1f\x7f-\x9f]+@[A-Za-z0-9.-]+" + END,
        description="The account's address (plain addr-spec)",
        examples=["alice@example.com"],
    ),
]
Username = Annotated[str, Meta(min_length=1, max_length=MAX_CREDENTIAL, pattern=NO_CONTROLS)]
Password = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_PASSWORD,
        pattern=NO_CONTROLS,
        description="Write-only: never returned, stored encrypted",
    ),
]
AuthKind = Literal["password", "oauth2"]
TokenURL = Annotated[
    str,
    Meta(
        min_length=9,
        max_length=2048,
        pattern=r"^https://[^\s]+" + END,
        description="OAuth2 token endpoint (https) for the refresh-token grant",
        examples=["https://oauth2.googleapis.com/token"],
    ),
]
OAuthText = Annotated[str, Meta(min_length=1, max_length=MAX_PASSWORD, pattern=NO_CONTROLS)]
OAuthSecret = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=8192,
        pattern=NO_CONTROLS,
        description="Write-only: never returned, stored encrypted",
    ),
]
_OAUTH_FIELDS = (
    "token_url", "client_id", "client_secret", "refresh_token", "scope", "access_token"
)  # fmt: skip
DeleteAfterDays = Annotated[int, Meta(ge=1, le=MAX_DELETE_AFTER_DAYS)]
MessageCap = Annotated[
    int,
    Meta(
        ge=MIN_MESSAGE_CAP,
        le=MAX_MESSAGE_CAP,
        description="Bigger messages are skipped; at most the service's own limit"
        " (`MAILROOM_MAX_MESSAGE_BYTES`, 422 above it)",
    ),
]
PollMinutes = Annotated[int, Meta(ge=1, le=MAX_POLL_MINUTES)]
PresetName = Annotated[
    str,
    Meta(
        pattern=r"^[a-z0-9_]{1,40}" + END,
        description="A provider preset (`GET /v1/presets`): fills the hosts, ports and"
        " security the body leaves out",
        examples=["gmail"],
    ),
]


def check_auth(side: object, *, password_required: bool) -> None:
    """Cross-field rules of ``auth`` (create bodies): a password, or an OAuth2 grant."""
    auth = getattr(side, "auth")  # noqa: B009
    given = [f for f in _OAUTH_FIELDS if getattr(side, f) is not None]
    if auth == "password":
        if given:
            raise ValueError(f"`{given[0]}` needs `auth: oauth2`")
        if password_required and getattr(side, "password") is None:  # noqa: B009
            raise ValueError("`password` is required (or `auth: oauth2` with its tokens)")
        return
    if getattr(side, "password") is not None:  # noqa: B009
        raise ValueError("`auth: oauth2` takes no `password`")
    if getattr(side, "username") is None:  # noqa: B009
        raise ValueError("`auth: oauth2` needs `username`")
    check_grant(side)


def check_grant(side: object) -> None:
    """An OAuth2 grant: a refresh token with its endpoint and client, or an access token."""
    refresh, access = getattr(side, "refresh_token"), getattr(side, "access_token")  # noqa: B009
    if refresh is not None and access is not None:
        raise ValueError(
            "give `refresh_token` (Mailroom refreshes) or `access_token` (you refresh), not both"
        )
    if refresh is None and access is None:
        raise ValueError("`auth: oauth2` needs `refresh_token` or `access_token`")
    if refresh is not None:
        for name in ("token_url", "client_id"):
            if getattr(side, name) is None:
                raise ValueError(f"`refresh_token` needs `{name}`")


def check_host(host: str) -> None:
    """A DNS name (RFC 1123 labels) or an IP literal; raises ValueError otherwise."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not _HOSTNAME_RE.fullmatch(host) or host.replace(".", "").isdigit():
        raise ValueError(f"`{host}` is not a valid host name or IP address")


class IncomingInput(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The POP3 server (create). ``host`` may be left to a ``preset``; ``security`` left
    out is the preset's, else ``tls``."""

    username: Username
    password: Password | None = None
    host: Host | None = None
    protocol: Literal["pop3"] = "pop3"
    port: Port | None = None
    security: Security | None = None
    auth: AuthKind = "password"
    token_url: TokenURL | None = None
    client_id: OAuthText | None = None
    client_secret: OAuthSecret | None = None
    refresh_token: OAuthSecret | None = None
    scope: OAuthText | None = None
    access_token: OAuthSecret | None = None

    def __post_init__(self) -> None:
        if self.host is not None:
            check_host(self.host)
        check_auth(self, password_required=True)


class OutgoingInput(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The SMTP server (create). Authentication is optional. ``host`` may be left to a
    ``preset``; ``security`` left out is the preset's, else ``tls``."""

    host: Host | None = None
    port: Port | None = None
    security: Security | None = None
    username: Username | None = None
    password: Password | None = None
    allow_insecure_auth: bool = False
    auth: AuthKind = "password"
    token_url: TokenURL | None = None
    client_id: OAuthText | None = None
    client_secret: OAuthSecret | None = None
    refresh_token: OAuthSecret | None = None
    scope: OAuthText | None = None
    access_token: OAuthSecret | None = None

    def __post_init__(self) -> None:
        if self.host is not None:
            check_host(self.host)
        check_auth(self, password_required=False)
        if self.auth == "password" and (self.username is None) != (self.password is None):
            raise ValueError("give both `username` and `password` for SMTP auth, or neither")


class RetrievalInput(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What retrieval does with the server's copy, and when it runs by itself."""

    leave_on_server: bool = True
    delete_after_days: DeleteAfterDays | None = None
    max_message_bytes: MessageCap | None = None
    poll_interval_minutes: PollMinutes | None = None

    def __post_init__(self) -> None:
        if self.delete_after_days is not None and not self.leave_on_server:
            raise ValueError(
                "`delete_after_days` needs `leave_on_server: true`"
                " (with false every message is deleted once stored)"
            )


class AccountInput(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of CreateAccount (and of VerifySettings)."""

    name: Name
    email: Email
    incoming: IncomingInput
    outgoing: OutgoingInput
    display_name: DisplayName | None = None
    retrieval: RetrievalInput = msgspec.field(default_factory=RetrievalInput)
    preset: PresetName | None = None


class IncomingPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: Host | UnsetType = UNSET
    port: Port | UnsetType = UNSET
    security: Security | UnsetType = UNSET
    username: Username | UnsetType = UNSET
    password: Password | UnsetType = UNSET
    auth: AuthKind | UnsetType = UNSET
    token_url: TokenURL | UnsetType = UNSET
    client_id: OAuthText | UnsetType = UNSET
    client_secret: OAuthSecret | UnsetType | None = UNSET
    refresh_token: OAuthSecret | UnsetType = UNSET
    scope: OAuthText | UnsetType | None = UNSET
    access_token: OAuthSecret | UnsetType = UNSET

    def __post_init__(self) -> None:
        if not isinstance(self.host, UnsetType):
            check_host(self.host)


class OutgoingPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``username``/``password`` null removes SMTP auth (both together)."""

    host: Host | UnsetType = UNSET
    port: Port | UnsetType = UNSET
    security: Security | UnsetType = UNSET
    username: Username | UnsetType | None = UNSET
    password: Password | UnsetType | None = UNSET
    allow_insecure_auth: bool | UnsetType = UNSET
    auth: AuthKind | UnsetType = UNSET
    token_url: TokenURL | UnsetType = UNSET
    client_id: OAuthText | UnsetType = UNSET
    client_secret: OAuthSecret | UnsetType | None = UNSET
    refresh_token: OAuthSecret | UnsetType = UNSET
    scope: OAuthText | UnsetType | None = UNSET
    access_token: OAuthSecret | UnsetType = UNSET

    def __post_init__(self) -> None:
        if not isinstance(self.host, UnsetType):
            check_host(self.host)


class RetrievalPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    leave_on_server: bool | UnsetType = UNSET
    delete_after_days: DeleteAfterDays | UnsetType | None = UNSET
    max_message_bytes: MessageCap | UnsetType | None = UNSET
    poll_interval_minutes: PollMinutes | UnsetType | None = UNSET


class AccountPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of UpdateAccount: only the fields given change; nested objects merge."""

    name: Name | UnsetType = UNSET
    email: Email | UnsetType = UNSET
    display_name: DisplayName | UnsetType | None = UNSET
    incoming: IncomingPatch | UnsetType = UNSET
    outgoing: OutgoingPatch | UnsetType = UNSET
    retrieval: RetrievalPatch | UnsetType = UNSET
