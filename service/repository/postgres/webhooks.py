"""Webhook endpoints, their deliveries and attempts on PostgreSQL (as on SQLite).

A delivery is claimed by one replica: ``FOR UPDATE SKIP LOCKED`` picks rows no other
claim is taking right now, and the lease (``lease_until``) keeps them from the others
until the attempt is written back (or the lease runs out: the replica died).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec

from service.domain.events import NewEvent
from service.domain.time import to_text
from service.domain.webhooks import (
    ClaimedDelivery,
    DeliveryResult,
    DeliveryStatus,
    Webhook,
    WebhookAttempt,
)
from service.repository.pages import Page, page_of
from service.repository.postgres.database import PgDatabase, Record, rowcount
from service.repository.postgres.events import add_deliveries, insert_events
from service.repository.webhooks import _ATTEMPT_COLUMNS, _COLUMNS, body_of, delivery_status

_NAMES = [n.strip() for n in _COLUMNS.split(",")]
_list = msgspec.json.Decoder(list[str])


def _webhook(row: Record) -> Webhook:
    return Webhook(
        id=row["id"],
        tenant=row["tenant"],
        url=row["url"],
        description=row["description"],
        events=_list.decode(row["events_json"]),
        account_ids=_list.decode(row["account_ids_json"]) if row["account_ids_json"] else None,
        enabled=row["enabled"],
        secret_encrypted=row["secret"],
        previous_secret_encrypted=row["previous_secret"],
        previous_secret_until=row["previous_secret_until"],
        disabled_reason=row["disabled_reason"],
        failing_since=row["failing_since"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _params(w: Webhook) -> tuple[Any, ...]:
    return (
        w.id,
        w.tenant,
        w.url,
        w.description,
        msgspec.json.encode(w.events).decode(),
        None if w.account_ids is None else msgspec.json.encode(w.account_ids).decode(),
        w.enabled,
        w.secret_encrypted,
        w.previous_secret_encrypted,
        w.previous_secret_until,
        w.disabled_reason,
        w.failing_since,
        w.created_at,
        w.updated_at,
    )


def _attempt(row: Record) -> WebhookAttempt:
    return WebhookAttempt(
        seq=row["seq"],
        delivery_id=row["delivery_id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        attempt=row["attempt"],
        at=row["at"],
        outcome=row["outcome"],
        duration_ms=row["duration_ms"],
        response_status=row["response_status"],
        response_body=row["response_body"],
        error=row["error"],
    )


class PgWebhookRepository:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def add(self, webhook: Webhook) -> None:
        marks = ", ".join(f"${i}" for i in range(1, len(_NAMES) + 1))
        async with self._db.transaction() as conn:
            await conn.execute(
                f"INSERT INTO webhooks ({_COLUMNS}) VALUES ({marks})", *_params(webhook)
            )

    async def get(self, tenant: str, webhook_id: str) -> Webhook | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM webhooks WHERE id = $1 AND tenant = $2", webhook_id, tenant
        )
        return None if row is None else _webhook(row)

    async def page(self, tenant: str, *, after: str | None, limit: int) -> Page[Webhook]:
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM webhooks WHERE tenant = $1 AND id > $2 ORDER BY id LIMIT $3",
            tenant,
            after or "",
            limit + 1,
        )
        return page_of([_webhook(r) for r in rows], limit, key=lambda w: w.id)

    async def replace(self, webhook: Webhook) -> None:
        names = _NAMES[2:]
        sets = ", ".join(f"{n} = ${i}" for i, n in enumerate(names, start=1))
        values = _params(webhook)[2:]
        async with self._db.transaction() as conn:
            await conn.execute(
                f"UPDATE webhooks SET {sets} WHERE id = ${len(names) + 1}"
                f" AND tenant = ${len(names) + 2}",
                *values,
                webhook.id,
                webhook.tenant,
            )

    async def delete(self, tenant: str, webhook_id: str) -> bool:
        async with self._db.transaction() as conn:
            status = await conn.execute(
                "DELETE FROM webhooks WHERE id = $1 AND tenant = $2", webhook_id, tenant
            )
            return rowcount(status) > 0

    async def enabled(self) -> list[Webhook]:
        rows = await self._db.fetch_all(f"SELECT {_COLUMNS} FROM webhooks WHERE enabled")
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
        """Claimed under a lease: the rows in flight here hold live leases, so
        ``exclude`` adds nothing on PostgreSQL."""
        rows = await self._db.fetch_all(
            "WITH claimed AS (UPDATE webhook_deliveries SET claimed_by = $1, lease_until = $2"
            " WHERE id IN (SELECT id FROM webhook_deliveries WHERE webhook_id = $3"
            " AND status = $4 AND next_attempt_at <= $5"
            " AND (lease_until IS NULL OR lease_until < $5)"
            " ORDER BY next_attempt_at, id LIMIT $6 FOR UPDATE SKIP LOCKED)"
            " RETURNING id, event_id, attempt_count, created_at, next_attempt_at)"
            " SELECT c.id, c.event_id, c.attempt_count, c.created_at, e.type, e.tenant,"
            " e.account_id, e.created_at AS event_created_at, e.data FROM claimed c"
            " LEFT JOIN events e ON e.id = c.event_id ORDER BY c.next_attempt_at, c.id",
            owner,
            lease_until,
            webhook_id,
            DeliveryStatus.PENDING.value,
            now,
            limit,
        )
        return [
            ClaimedDelivery(
                id=row["id"],
                webhook_id=webhook_id,
                event_id=row["event_id"],
                event_type=row["type"] or "",
                attempt_count=row["attempt_count"],
                created_at=row["created_at"],
                body=body_of(row["event_id"], _Row(row)) if row["type"] is not None else {},
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
                "UPDATE webhook_deliveries SET status = $1, attempt_count = $2,"
                " next_attempt_at = coalesce($3, next_attempt_at), updated_at = $4,"
                " claimed_by = NULL, lease_until = NULL WHERE id = $5",
                [
                    (
                        delivery_status(r.outcome).value,
                        r.attempt,
                        r.next_attempt_at,
                        r.at,
                        r.delivery_id,
                    )
                    for r in results
                ],
            )
            await conn.executemany(
                "INSERT INTO webhook_attempts (webhook_id, delivery_id, event_id, event_type,"
                " attempt, at, outcome, duration_ms, response_status, response_body, error)"
                " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11"
                " WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = $1)",
                [
                    (
                        r.webhook_id,
                        r.delivery_id,
                        r.event_id,
                        r.event_type,
                        r.attempt,
                        r.at,
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
                    "UPDATE webhooks SET failing_since = CASE WHEN $1::timestamptz IS NULL"
                    " THEN NULL ELSE coalesce(failing_since, $1) END WHERE id = $2",
                    since,
                    webhook_id,
                )
            for webhook_id, reason in disable.items():
                await conn.execute(
                    "UPDATE webhooks SET enabled = false, disabled_reason = $1, updated_at = $2"
                    " WHERE id = $3",
                    reason,
                    at,
                    webhook_id,
                )
            await insert_events(conn, events)

    async def release(self, owner: str) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE webhook_deliveries SET claimed_by = NULL, lease_until = NULL"
                " WHERE claimed_by = $1",
                owner,
            )

    async def queue_test(self, webhook_id: str, event: NewEvent) -> None:
        async with self._db.transaction() as conn:
            await insert_events(conn, [event])
            await add_deliveries(
                conn, [(f"whd_{event.id[4:]}", webhook_id, event.id, event.created_at)]
            )

    async def attempts(
        self, webhook_id: str, *, after: str | None, limit: int
    ) -> Page[WebhookAttempt]:
        before = int(after) if after and after.isdigit() else None
        rows = await self._db.fetch_all(
            f"SELECT {_ATTEMPT_COLUMNS} FROM webhook_attempts WHERE webhook_id = $1"
            " AND ($2::bigint IS NULL OR seq < $2) ORDER BY seq DESC LIMIT $3",
            webhook_id,
            before,
            limit + 1,
        )
        return page_of([_attempt(r) for r in rows], limit, key=lambda a: str(a.seq))

    async def pending_count(self, webhook_id: str) -> int:
        return int(
            await self._db.fetch_value(
                "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1 AND status = $2",
                webhook_id,
                DeliveryStatus.PENDING.value,
            )
        )


class _Row:
    """A PostgreSQL row whose event time reads as ISO 8601 text (as SQLite stores it)."""

    def __init__(self, row: Record) -> None:
        self._row = row

    def __getitem__(self, key: str) -> Any:
        value = self._row[key]
        if key == "event_created_at" and isinstance(value, datetime):
            return to_text(value)
        return value
