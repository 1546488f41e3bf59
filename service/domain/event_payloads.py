"""The ``data`` object of each event type: one Struct per type, the single source of both
what the store writes and what the OpenAPI document (``webhooks`` section) describes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from service.domain.events import EventType


class MessageReceived(msgspec.Struct, frozen=True, kw_only=True):
    """``message.received``: one message stored by a retrieval."""

    message_id: str  # the stored message's id (GET /v1/accounts/{id}/messages/{message_id})
    retrieval_id: str
    uidl: str
    internet_message_id: str | None  # the Message-ID header
    from_: str | None = msgspec.field(name="from")
    subject: str | None
    date: datetime | None
    size: int
    has_attachments: bool
    thread_id: str | None = None  # its conversation (GET .../messages?thread_id=)


class RetrievalEnded(msgspec.Struct, frozen=True, kw_only=True):
    """``retrieval.succeeded`` and ``retrieval.failed`` (with ``error_code``)."""

    retrieval_id: str
    status: str
    finished_at: datetime
    messages_on_server: int | None
    messages_downloaded: int
    bytes_downloaded: int
    messages_deleted: int
    messages_skipped: int
    error_code: str | None = None
    error_detail: str | None = None


class RecipientDetail(msgspec.Struct, frozen=True, kw_only=True):
    """One envelope recipient and what the server said about it."""

    address: str
    kind: str
    status: str
    smtp_code: int | None = None
    smtp_message: str | None = None


class OutgoingOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """``outgoing.sent``, ``outgoing.deferred`` (with ``next_attempt_at``) and
    ``outgoing.failed`` (with ``error_code``): the message after a delivery attempt."""

    outgoing_id: str
    internet_message_id: str  # the Message-ID header fixed at acceptance
    status: str
    attempt_count: int
    next_attempt_at: datetime | None = None
    sent_at: datetime | None = None
    error_code: str | None = None
    error_detail: str | None = None
    recipients: list[RecipientDetail]
    metadata: dict[str, str] = {}  # as given when sent
    tags: list[str] = []  # as given when sent


class BouncedRecipient(msgspec.Struct, frozen=True, kw_only=True):
    """A recipient a delivery status notification reported as failed."""

    address: str
    status: str  # "bounced"
    smtp_code: int | None = None
    dsn_status: str | None = None  # the RFC 3464 Status, e.g. 5.1.1
    diagnostic: str | None = None
    remote_mta: str | None = None  # the server that refused, when the DSN names it


class OutgoingBounced(msgspec.Struct, frozen=True, kw_only=True):
    """``outgoing.bounced``: a stored DSN reported recipients of a sent message failed."""

    outgoing_id: str
    internet_message_id: str | None = None
    bounce_message_id: str | None = None  # the stored DSN message
    recipients: list[BouncedRecipient] = []


class AccountPause(msgspec.Struct, frozen=True, kw_only=True):
    """``account.paused`` and ``account.resumed``: delivery (``outgoing``) or retrieval
    (``incoming``) stopped for a reason only a person can fix, and its end."""

    direction: str  # "outgoing" or "incoming"
    code: str  # why it was paused (e.g. auth_failed)
    detail: str | None = None
    paused_at: datetime | None = None


class WebhookDisabled(msgspec.Struct, frozen=True, kw_only=True):
    """``webhook.disabled``: an endpoint answered 410 or failed for a whole day."""

    webhook_id: str
    url: str
    reason: str  # "gone" (410) or "failing"


class WebhookTest(msgspec.Struct, frozen=True, kw_only=True):
    """``webhook.test``: sent by POST /v1/webhooks/{id}/test to that endpoint only."""

    webhook_id: str
    message: str


#: The payload Struct of each event type.
PAYLOADS: dict[EventType, type[msgspec.Struct]] = {
    EventType.MESSAGE_RECEIVED: MessageReceived,
    EventType.RETRIEVAL_SUCCEEDED: RetrievalEnded,
    EventType.RETRIEVAL_FAILED: RetrievalEnded,
    EventType.OUTGOING_SENT: OutgoingOutcome,
    EventType.OUTGOING_DEFERRED: OutgoingOutcome,
    EventType.OUTGOING_FAILED: OutgoingOutcome,
    EventType.OUTGOING_BOUNCED: OutgoingBounced,
    EventType.ACCOUNT_PAUSED: AccountPause,
    EventType.ACCOUNT_RESUMED: AccountPause,
    EventType.WEBHOOK_DISABLED: WebhookDisabled,
    EventType.WEBHOOK_TEST: WebhookTest,
}


def payload(value: msgspec.Struct) -> dict[str, Any]:
    """The ``data`` dict of a payload Struct (times as ISO 8601 text, nulls kept)."""
    data: dict[str, Any] = msgspec.to_builtins(value)
    return data
