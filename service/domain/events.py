"""Events: what changed, recorded in the same transaction as the change (transactional outbox).

A state change that callers may want pushed to them (a stored message, the end of a
retrieval, a delivery outcome, a bounce, an account paused or resumed) writes one
:class:`NewEvent` per fact into the ``events`` table inside the transaction that makes the
change, so an event exists exactly when its change committed. Webhook deliveries and the
pull feed (``GET /v1/events``) read from that table.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import msgspec

from service.domain.ids import new_id


class EventType(StrEnum):
    MESSAGE_RECEIVED = "message.received"
    RETRIEVAL_SUCCEEDED = "retrieval.succeeded"
    RETRIEVAL_FAILED = "retrieval.failed"
    OUTGOING_SENT = "outgoing.sent"
    OUTGOING_DEFERRED = "outgoing.deferred"
    OUTGOING_FAILED = "outgoing.failed"
    OUTGOING_BOUNCED = "outgoing.bounced"
    ACCOUNT_PAUSED = "account.paused"
    ACCOUNT_RESUMED = "account.resumed"
    WEBHOOK_DISABLED = "webhook.disabled"
    WEBHOOK_TEST = "webhook.test"


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event to insert with the change it reports. ``data`` is the type's payload
    (documented per type in the OpenAPI document); ``account_id`` is None for events that
    belong to no account (``webhook.disabled``)."""

    id: str
    type: EventType
    tenant: str
    account_id: str | None
    created_at: datetime
    data: dict[str, Any]


def new_event(
    type: EventType,
    *,
    tenant: str,
    account_id: str | None,
    created_at: datetime,
    data: dict[str, Any],
) -> NewEvent:
    """A :class:`NewEvent` with a fresh ``evt_`` id (unique; consumers de-duplicate by it)."""
    return NewEvent(
        id=new_id("evt"),
        type=type,
        tenant=tenant,
        account_id=account_id,
        created_at=created_at,
        data=data,
    )


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """A committed event as the feed and webhooks carry it; ``cursor`` is its feed
    position (opaque)."""

    id: str
    type: str
    tenant: str
    account_id: str | None
    created_at: datetime
    data: dict[str, Any]
    cursor: str
