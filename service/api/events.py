"""The pull feed: the caller's events in commit order, with long-polling."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from service.api.dependencies import ID_MAX, Tenant
from service.api.problems import COMMON_ERRORS
from service.domain.events import Event, EventType
from service.errors import FieldError, Invalid
from service.repository.events import CURSOR_PATTERN
from service.services.events import MAX_WAIT_S, EventFeed

Feed = NamedDependency[EventFeed]
DEFAULT_LIMIT = 100
MAX_LIMIT = 500
_TYPES = frozenset(t.value for t in EventType)


class EventOut(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # unique: de-duplicate by it (the `webhook-id` of its webhook requests)
    type: str
    created_at: datetime
    tenant: str
    account_id: str | None
    data: dict[str, Any]  # per type: see the `webhooks` section of this document
    cursor: str  # the feed position just after this event

    @classmethod
    def of(cls, e: Event) -> EventOut:
        return cls(
            id=e.id,
            type=e.type,
            created_at=e.created_at,
            tenant=e.tenant,
            account_id=e.account_id,
            data=e.data,
            cursor=e.cursor,
        )


class EventPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[EventOut]
    # Where to continue: pass it as `after` next time (the `after` given when nothing is
    # new, null only when there has never been an event).
    next_cursor: str | None


class EventController(Controller):
    path = "/events"
    tags = ["Events"]

    @get(
        operation_id="ListEvents",
        summary="Read the event feed",
        description="The caller's events in commit order, after the cursor `after` (from the"
        " oldest kept without it). Store `next_cursor` and pass it back: nothing is missed and"
        " nothing is seen twice, across restarts of either side. With `wait`, an empty answer"
        " waits up to that many seconds (at most 30) for new events. Events are kept"
        " `MAILROOM_EVENT_RETENTION_DAYS` days.",
        responses=COMMON_ERRORS,
    )
    async def list_events(
        self,
        tenant: Tenant,
        feed: Feed,
        after: Annotated[
            str | None,
            QueryParameter(
                pattern=CURSOR_PATTERN,
                description="`next_cursor` of the previous answer (opaque)",
            ),
        ] = None,
        types: Annotated[
            str | None,
            QueryParameter(
                max_length=400,
                description="Comma-separated event types to return (default: all)",
            ),
        ] = None,
        account_id: Annotated[
            str | None,
            QueryParameter(max_length=ID_MAX, description="Only this account's events"),
        ] = None,
        limit: Annotated[
            int,
            QueryParameter(
                ge=1, le=MAX_LIMIT, description=f"At most this many (default {DEFAULT_LIMIT})"
            ),
        ] = DEFAULT_LIMIT,
        wait: Annotated[
            float,
            QueryParameter(
                ge=0,
                le=MAX_WAIT_S,
                description="Seconds to wait for an event when none is new (long-poll)",
                schema_extra={"minimum": 0},
            ),
        ] = 0,
    ) -> EventPage:
        wanted: list[str] | None = None
        if types:
            wanted = [t.strip() for t in types.split(",") if t.strip()]
            unknown = [t for t in wanted if t not in _TYPES]
            if unknown:
                detail = f"unknown event type {unknown[0]!r}"
                raise Invalid(detail, errors=[FieldError("types", detail)])
        events = await feed.read(
            tenant, after=after, types=wanted, account_id=account_id, limit=limit, wait_s=wait
        )
        return EventPage(
            items=[EventOut.of(e) for e in events],
            next_cursor=events[-1].cursor if events else after,
        )
