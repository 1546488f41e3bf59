"""Webhook endpoints, their queued deliveries and every attempt made."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import msgspec


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # waiting for its (next) attempt
    DELIVERED = "delivered"  # the endpoint answered 2xx
    FAILED = "failed"  # given up: a permanent answer, too old, or the endpoint disabled


class AttemptOutcome(StrEnum):
    DELIVERED = "delivered"
    RETRYING = "retrying"  # failed; tried again later
    FAILED = "failed"  # failed; not tried again


class DisabledReason(StrEnum):
    BY_CALLER = "by_caller"  # PATCH enabled=false
    GONE = "gone"  # the endpoint answered 410
    FAILING = "failing"  # nothing delivered for the whole retry window


class Webhook(msgspec.Struct, frozen=True, kw_only=True):
    """An endpoint of a tenant (secrets as stored: encrypted)."""

    id: str
    tenant: str
    url: str
    description: str | None
    events: list[str]  # event types, or ["*"]
    account_ids: list[str] | None  # None: every account of the tenant
    enabled: bool
    secret_encrypted: str
    previous_secret_encrypted: str | None
    previous_secret_until: datetime | None
    disabled_reason: str | None
    failing_since: datetime | None
    created_at: datetime
    updated_at: datetime


class ClaimedDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery taken for an attempt, with the event it carries."""

    id: str
    webhook_id: str
    event_id: str
    event_type: str
    attempt_count: int  # attempts made before this one
    created_at: datetime
    body: dict[str, Any]  # the event as the endpoint receives it


class DeliveryResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one attempt, written back with the delivery's new state."""

    delivery_id: str
    webhook_id: str
    event_id: str
    event_type: str
    attempt: int
    at: datetime
    outcome: AttemptOutcome
    duration_ms: int
    response_status: int | None
    response_body: str | None
    error: str | None
    next_attempt_at: datetime | None  # when RETRYING
    # When every retry failed until the event's window ran out: the event's creation time.
    exhausted_since: datetime | None = None


class WebhookAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """One logged attempt (GET /v1/webhooks/{id}/deliveries)."""

    seq: int
    delivery_id: str
    event_id: str
    event_type: str
    attempt: int
    at: datetime
    outcome: str
    duration_ms: int
    response_status: int | None
    response_body: str | None
    error: str | None
