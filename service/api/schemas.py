"""Response Structs (requests are the validated inputs in ``service.domain``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Generic, Literal, TypeVar

import msgspec

from service.codes import ErrorCode
from service.domain.accounts import Account
from service.domain.enums import Security
from service.domain.outbox import OutgoingMessage
from service.domain.retrievals import MessageSummary, Retrieval
from service.mail.parse import ParsedMessage

T = TypeVar("T")


class ListResponse(msgspec.Struct, Generic[T], frozen=True):
    """A page of a list: ``next_cursor`` continues it, null on the last page."""

    items: list[T]
    next_cursor: str | None


class IncomingOut(msgspec.Struct, frozen=True, omit_defaults=True):
    """``auth`` and ``token_expires_at`` are shown for OAuth2 only."""

    protocol: Literal["pop3"]
    host: str
    port: int
    security: Security
    username: str
    password_set: bool
    # OAuth2 (the grant's secrets are write-only): when the access token held ends.
    auth: Literal["password", "oauth2"] = "password"
    token_expires_at: datetime | None = None


class OutgoingOut(msgspec.Struct, frozen=True, omit_defaults=True):
    """``auth`` and ``token_expires_at`` are shown for OAuth2 only."""

    host: str
    port: int
    security: Security
    username: str | None
    password_set: bool
    allow_insecure_auth: bool
    auth: Literal["password", "oauth2"] = "password"
    token_expires_at: datetime | None = None


class RetrievalOut(msgspec.Struct, frozen=True):
    leave_on_server: bool
    delete_after_days: int | None
    max_message_bytes: int | None
    poll_interval_minutes: int | None


class SMTPPauseOut(msgspec.Struct, frozen=True):
    """Why delivery for the account is paused: the SMTP server showed the outgoing settings
    are wrong (``code``: `auth_failed`, `tls_required`, `tls_certificate_invalid`,
    `insecure_auth_refused`, `auth_not_supported`, `rejected` for a refused EHLO/HELO, ...;
    `oauth_refresh_failed` when an OAuth2 provider refused a refresh, which stops retrievals
    too and which a PATCH of the credentials of either side ends).
    Nothing is sent and waiting messages have no `next_attempt_at` until a PATCH of
    `outgoing` (even `{}`) resumes delivery at once."""

    code: ErrorCode
    detail: str
    since: datetime


class AccountOut(msgspec.Struct, frozen=True):
    """An account as callers see it: passwords are write-only, shown as ``password_set``."""

    id: str
    name: str
    email: str
    display_name: str | None
    incoming: IncomingOut
    outgoing: OutgoingOut
    retrieval: RetrievalOut
    # "ok", or the code of the pause (``smtp_pause`` has its detail and time).
    smtp_status: Annotated[
        str,
        msgspec.Meta(
            description="`ok` while delivery runs, else the `code` of `smtp_pause`",
            examples=["ok", "auth_failed"],
        ),
    ]
    smtp_pause: SMTPPauseOut | None
    # Kept for existing clients: ``smtp_pause.since`` when the pause is ``auth_failed``.
    smtp_auth_failed_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, a: Account) -> AccountOut:
        i, o, r = a.incoming, a.outgoing, a.retrieval
        return cls(
            id=a.id,
            name=a.name,
            email=a.email,
            display_name=a.display_name,
            incoming=IncomingOut(
                "pop3",
                i.host,
                i.port,
                i.security,
                i.username,
                i.auth == "password",
                "oauth2" if i.auth == "oauth2" else "password",
                i.token_expires_at,
            ),
            outgoing=OutgoingOut(
                o.host,
                o.port,
                o.security,
                o.username,
                o.password_encrypted is not None and o.auth == "password",
                o.allow_insecure_auth,
                "oauth2" if o.auth == "oauth2" else "password",
                o.token_expires_at,
            ),
            retrieval=RetrievalOut(
                r.leave_on_server,
                r.delete_after_days,
                r.max_message_bytes,
                r.poll_interval_minutes,
            ),
            smtp_status="ok" if a.smtp_pause is None else a.smtp_pause.code,
            smtp_pause=(
                None
                if a.smtp_pause is None
                else SMTPPauseOut(
                    ErrorCode(a.smtp_pause.code), a.smtp_pause.detail, a.smtp_pause.since
                )
            ),
            smtp_auth_failed_at=(
                a.smtp_pause.since
                if a.smtp_pause is not None and a.smtp_pause.code == ErrorCode.AUTH_FAILED
                else None
            ),
            created_at=a.created_at,
            updated_at=a.updated_at,
        )


class Health(msgspec.Struct, frozen=True):
    status: Literal["ok"]
    version: str


class Readiness(msgspec.Struct, frozen=True, omit_defaults=True):
    """``code`` says why it is not ready: ``storage_full`` (the disk is full; writes are
    tried again on each probe), ``storage_unavailable`` (the database cannot be reached)
    or ``unavailable`` (the store cannot be opened or is not migrated yet)."""

    status: Literal["ready", "not_ready"]
    schema_version: int
    expected_schema_version: int
    code: ErrorCode | None = None


class HeaderOut(msgspec.Struct, frozen=True):
    name: str
    value: str


class BodyOut(msgspec.Struct, frozen=True):
    content: str
    charset: str


class AttachmentOut(msgspec.Struct, frozen=True):
    index: int
    filename: str | None
    content_type: str
    size: int
    content_id: str | None
    disposition: str | None


class MessageDetail(MessageSummary, frozen=True, kw_only=True):
    """A stored message parsed: its summary plus decoded headers, bodies and attachments."""

    headers: list[HeaderOut]
    text: BodyOut | None
    html: BodyOut | None
    attachments: list[AttachmentOut]
    defects: list[str]

    @classmethod
    def of(cls, s: MessageSummary, p: ParsedMessage) -> MessageDetail:
        summary = {f: getattr(s, f) for f in s.__struct_fields__}
        summary["has_attachments"] = s.has_attachments or bool(p.attachments)
        return cls(
            **summary,
            headers=[HeaderOut(name, value) for name, value in p.headers],
            text=BodyOut(p.text.content, p.text.charset) if p.text else None,
            html=BodyOut(p.html.content, p.html.charset) if p.html else None,
            attachments=[
                AttachmentOut(
                    a.index, a.filename, a.content_type, a.size, a.content_id, a.disposition
                )
                for a in p.attachments
            ],
            defects=list(p.defects),
        )


# One concrete class per listed resource: the OpenAPI document names its schema after the
# class (``AccountList``), where a generic alias would leak its module path.
class AccountList(ListResponse[AccountOut], frozen=True):
    """A page of accounts."""

    items: list[AccountOut]


class RetrievalList(ListResponse[Retrieval], frozen=True):
    """A page of retrievals, newest first."""

    items: list[Retrieval]


class MessageSummaryList(ListResponse[MessageSummary], frozen=True):
    """A page of stored messages, newest first (a thread: oldest first, sent copies too)."""

    items: list[MessageSummary]


class OutgoingMessageList(ListResponse[OutgoingMessage], frozen=True):
    """A page of outgoing messages, newest first."""

    items: list[OutgoingMessage]
