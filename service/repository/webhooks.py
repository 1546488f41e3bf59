"""Webhook endpoints, their deliveries and attempts (SQLite).

Deliveries are queued by ``insert_events`` in the transaction of the change (one per
matching enabled endpoint), claimed per endpoint under a lease, and written back with each
attempt; an endpoint disabled on the way records ``webhook.disabled`` in that transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import msgspec

from service.domain.events import NewEvent
from service.domain.time import from_text, opt_from_text, opt_to_text, to_text
from service.domain.webhooks import (
    AttemptOutcome,
    ClaimedDelivery,
    DeliveryResult,
    DeliveryStatus,
    Webhook,
    WebhookAttempt,
)
from service.repository.database import Database
from service.repository.events import add_deliveries, decode_data, insert_events
from service.repository.pages import Page, page_of

_COLUMNS = (
    "id, tenant, url, description, events_json, account_ids_json, enabled, secret,"
    " previous_secret, previous_secret_until, disabled_reason, failing_since, created_at,"
    " updated_at"
)
_ATTEMPT_COLUMNS = (
    "seq, delivery_id, event_id, event_type, attempt, at, outcome, duration_ms,"
    " response_status, response_body, error"
)
_list = msgspec.json.Decoder(list[str])


def body_of(event_id: str, row: Any) -> dict[str, Any]:
    """The event as an endpoint receives it (the feed's item without its cursor)."""
    return {
        "id": event_id,
        "type": row["type"],
        "created_at": row["event_created_at"],
        "tenant": row["tenant"],
        "account_id": row["account_id"],
        "data": decode_data(row["data"]),
    }


def delivery_status(outcome: AttemptOutcome) -> DeliveryStatus:
    return {
        AttemptOutcome.DELIVERED: DeliveryStatus.DELIVERED,
        AttemptOutcome.RETRYING: DeliveryStatus.PENDING,
        AttemptOutcome.FAILED: DeliveryStatus.FAILED,
    }[outcome]


class WebhookRepository(Protocol):
    async def add(self, webhook: Webhook) -> None: ...
    async def get(self, tenant: str, webhook_id: str) -> Webhook | None: ...
    async def page(self, tenant: str, *, after: str | None, limit: int) -> Page[Webhook]: ...
    async def replace(self, webhook: Webhook) -> None:
        """Store every field (no-op if it was deleted meanwhile)."""
        ...

    async def delete(self, tenant: str, webhook_id: str) -> bool: ...
    async def enabled(self) -> list[Webhook]:
        """Every enabled endpoint, of every tenant (for the dispatcher)."""
        ...

    async def claim(
        self,
        webhook_id: str,
        owner: str,
        now: datetime,
        lease_until: datetime,
        limit: int,
        *,
        exclude: Collection[str] = (),
    ) -> list[ClaimedDelivery]:
        """Take up to ``limit`` due deliveries of the endpoint that no live claim holds
        and that are not in ``exclude`` (the caller's own deliveries in flight)."""
        ...

    async def record(
        self,
        results: Sequence[DeliveryResult],
        *,
        failing: Mapping[str, datetime | None],
        disable: Mapping[str, str],
        events: Sequence[NewEvent],
        at: datetime,
    ) -> None:
        """Write attempts and the deliveries' new states; set (a time) or clear (None) the
        endpoints' ``failing_since``; disable endpoints (id -> reason), recording
        ``events`` in the same transaction."""
        ...

    async def release(self, owner: str) -> None:
        """Give back every claim of ``owner`` (at shutdown; on SQLite at start, all)."""
        ...

    async def queue_test(self, webhook_id: str, event: NewEvent) -> None:
        """Store ``event`` and queue it for this endpoint only."""
        ...

    async def attempts(
        self, webhook_id: str, *, after: str | None, limit: int
    ) -> Page[WebhookAttempt]:
        """The endpoint's attempts, newest first."""
        ...

    async def pending_count(self, webhook_id: str) -> int: ...


def _webhook(row: sqlite3.Row) -> Webhook:
    return Webhook(
        id=row["id"],
        tenant=row["tenant"],
        url=row["url"],
        description=row["description"],
        events=_list.decode(row["events_json"]),
        account_ids=_list.decode(row["account_ids_json"]) if row["account_ids_json"] else None,
        enabled=bool(row["enabled"]),
        secret_encrypted=row["secret"],
        previous_secret_encrypted=row["previous_secret"],
        previous_secret_until=opt_from_text(row["previous_secret_until"]),
        disabled_reason=row["disabled_reason"],
        failing_since=opt_from_text(row["failing_since"]),
        created_at=from_text(row["created_at"]),
        updated_at=from_text(row["updated_at"]),
    )


def _params(w: Webhook) -> tuple[Any, ...]:
    return (
        w.id,
        w.tenant,
        w.url,
        w.description,
        msgspec.json.encode(w.events).decode(),
        None if w.account_ids is None else msgspec.json.encode(w.account_ids).decode(),
        1 if w.enabled else 0,
        w.secret_encrypted,
        w.previous_secret_encrypted,
        opt_to_text(w.previous_secret_until),
        w.disabled_reason,
        opt_to_text(w.failing_since),
        to_text(w.created_at),
        to_text(w.updated_at),
    )


def _attempt(row: sqlite3.Row) -> WebhookAttempt:
    return WebhookAttempt(
        seq=row["seq"],
        delivery_id=row["delivery_id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        attempt=row["attempt"],
        at=from_text(row["at"]),
        outcome=row["outcome"],
        duration_ms=row["duration_ms"],
        response_status=row["response_status"],
        response_body=row["response_body"],
        error=row["error"],
    )


class SQLiteWebhookRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(self, webhook: Webhook) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                f"INSERT INTO webhooks ({_COLUMNS}) VALUES ({', '.join('?' * 14)})",
                _params(webhook),
            )

    async def get(self, tenant: str, webhook_id: str) -> Webhook | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM webhooks WHERE id = ? AND tenant = ?", (webhook_id, tenant)
        )
        return None if row is None else _webhook(row)

    async def page(self, tenant: str, *, after: str | None, limit: int) -> Page[Webhook]:
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM webhooks WHERE tenant = ? AND id > ? ORDER BY id LIMIT ?",
            (tenant, after or "", limit + 1),
        )
        return page_of([_webhook(r) for r in rows], limit, key=lambda w: w.id)

    async def replace(self, webhook: Webhook) -> None:
        names = [n.strip() for n in _COLUMNS.split(",")]
        values = _params(webhook)
        async with self._db.transaction() as conn:
            await conn.execute(
                f"UPDATE webhooks SET {', '.join(f'{n} = ?' for n in names[2:])}"
                " WHERE id = ? AND tenant = ?",
                (*values[2:], webhook.id, webhook.tenant),
            )

    async def delete(self, tenant: str, webhook_id: str) -> bool:
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "DELETE FROM webhooks WHERE id = ? AND tenant = ?", (webhook_id, tenant)
            )
            return cursor.rowcount > 0

    async def enabled(self) -> list[Webhook]:
        rows = await self._db.fetch_all(f"SELECT {_COLUMNS} FROM webhooks WHERE enabled = 1")
        return [_webhook(r) for r in rows]

    async def claim(
        self,
        webhook_id: str,
        owner: str,
        now: datetime,
        lease_until: datetime,
        limit: int,
        *,
        exclude: Collection[str] = (),
    ) -> list[ClaimedDelivery]:
        """One process owns a SQLite file, so a claim is a read: the caller excludes the
        deliveries it holds in flight (``exclude``), and nothing is written (an attempt
        is written back by ``record``; a crash leaves nothing to release)."""
        at = to_text(now)
        held = list(exclude)
        rows = await self._db.fetch_all(
            "SELECT d.id, d.event_id, d.attempt_count, d.created_at, e.type, e.tenant,"
            " e.account_id, e.created_at AS event_created_at, e.data"
            " FROM webhook_deliveries d LEFT JOIN events e ON e.id = d.event_id"
            " WHERE d.webhook_id = ? AND d.status = ? AND d.next_attempt_at <= ?"
            f" AND d.id NOT IN ({', '.join('?' * len(held))})"
            " ORDER BY d.next_attempt_at, d.id LIMIT ?",
            (webhook_id, DeliveryStatus.PENDING.value, at, *held, limit),
        )
        return [
            ClaimedDelivery(
                id=row["id"],
                webhook_id=webhook_id,
                event_id=row["event_id"],
                event_type=row["type"] or "",
                attempt_count=row["attempt_count"],
                created_at=from_text(row["created_at"]),
                body=body_of(row["event_id"], row) if row["type"] is not None else {},
            )
            for row in rows
        ]

    async def record(
        self,
        results: Sequence[DeliveryResult],
        *,
        failing: Mapping[str, datetime | None],
        disable: Mapping[str, str],
        events: Sequence[NewEvent],
        at: datetime,
    ) -> None:
        async with self._db.transaction() as conn:
            await conn.executemany(
                "UPDATE webhook_deliveries SET status = ?, attempt_count = ?,"
                " next_attempt_at = coalesce(?, next_attempt_at), updated_at = ?,"
                " claimed_by = NULL, lease_until = NULL WHERE id = ?",
                [
                    (
                        delivery_status(r.outcome).value,
                        r.attempt,
                        opt_to_text(r.next_attempt_at),
                        to_text(r.at),
                        r.delivery_id,
                    )
                    for r in results
                ],
            )
            await conn.executemany(
                "INSERT INTO webhook_attempts (webhook_id, delivery_id, event_id, event_type,"
                " attempt, at, outcome, duration_ms, response_status, response_body, error)"
                " SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11"
                " WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = ?1)",
                [
                    (
                        r.webhook_id,
                        r.delivery_id,
                        r.event_id,
                        r.event_type,
                        r.attempt,
                        to_text(r.at),
                        r.outcome.value,
                        r.duration_ms,
                        r.response_status,
                        r.response_body,
                        r.error,
                    )
                    for r in results
                ],
            )
            for webhook_id, since in failing.items():
                await conn.execute(
                    "UPDATE webhooks SET failing_since = CASE WHEN ? IS NULL THEN NULL"
                    " ELSE coalesce(failing_since, ?) END WHERE id = ?",
                    (opt_to_text(since), opt_to_text(since), webhook_id),
                )
            for webhook_id, reason in disable.items():
                await conn.execute(
                    "UPDATE webhooks SET enabled = 0, disabled_reason = ?, updated_at = ?"
                    " WHERE id = ?",
                    (reason, to_text(at), webhook_id),
                )
            await insert_events(conn, events)

    async def release(self, owner: str) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE webhook_deliveries SET claimed_by = NULL, lease_until = NULL"
                " WHERE claimed_by IS NOT NULL AND (? = '*' OR claimed_by = ?)",
                (owner, owner),
            )

    async def queue_test(self, webhook_id: str, event: NewEvent) -> None:
        async with self._db.transaction() as conn:
            await insert_events(conn, [event])
            await add_deliveries(
                conn, [(f"whd_{event.id[4:]}", webhook_id, event.id, to_text(event.created_at))]
            )

    async def attempts(
        self, webhook_id: str, *, after: str | None, limit: int
    ) -> Page[WebhookAttempt]:
        before = int(after) if after and after.isdigit() else None
        rows = await self._db.fetch_all(
            f"SELECT {_ATTEMPT_COLUMNS} FROM webhook_attempts WHERE webhook_id = ?"
            " AND (? IS NULL OR seq < ?) ORDER BY seq DESC LIMIT ?",
            (webhook_id, before, before, limit + 1),
        )
        return page_of([_attempt(r) for r in rows], limit, key=lambda a: str(a.seq))

    async def pending_count(self, webhook_id: str) -> int:
        row = await self._db.fetch_one(
            "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = ? AND status = ?",
            (webhook_id, DeliveryStatus.PENDING.value),
        )
        return int(row[0]) if row else 0
