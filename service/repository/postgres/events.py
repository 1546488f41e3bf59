"""The event store on PostgreSQL: events in the caller's transaction, the pull feed, retention.

Sequences are not commit-ordered (a transaction may take position 7 and commit after the
one that took 8), so each event also stores its transaction id (``pg_current_xact_id()``)
and the feed reads in (xid, position) order, serving only events whose xid is below
``pg_snapshot_xmin(pg_current_snapshot())``: every transaction below it has ended, and any
transaction still to commit has an xid at or above it, so an event that becomes visible
later always sorts after the cursor. The cost: the feed waits for the oldest transaction
running anywhere in the cluster (normally milliseconds).

The wake-up (``Topic.EVENTS``) is a ``pg_notify`` sent inside the transaction, so
PostgreSQL delivers it at commit, to every replica including this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from service.domain.event_emission import (
    REPORTED,
    account_pauses,
    messages_received,
    outgoing_outcome,
    retrieval_ended,
)
from service.domain.event_payloads import RecipientDetail
from service.domain.events import Event, EventType, NewEvent
from service.domain.ids import new_id
from service.domain.outbox import DeliveryOutcome
from service.domain.retrievals import MessageSummary, RetrievalError, RetrievalProgress
from service.repository.events import (
    PENDING,
    Subscription,
    decode_cursor,
    decode_data,
    encode_cursor,
    encode_data,
    matching,
)
from service.repository.notify import Topic
from service.repository.postgres.database import PgDatabase, Record, rowcount
from service.repository.postgres.notify import CHANNEL_PREFIX

# The origin of a wake-up sent in a transaction: no process has it, so every process
# (this one too) is woken.
COMMIT_ORIGIN = "commit"
_COLUMNS = "position, xid::text AS xid, id, type, tenant, account_id, created_at, data"


async def insert_events(conn: asyncpg.Connection, events: Sequence[NewEvent]) -> None:
    """Insert ``events`` (and their webhook deliveries) in the transaction open on ``conn``;
    the wake-up is delivered when it commits."""
    if not events:
        return
    await conn.execute(
        "INSERT INTO events (id, type, tenant, account_id, created_at, data)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
        " $5::timestamptz[], $6::text[])",
        [event.id for event in events],
        [event.type.value for event in events],
        [event.tenant for event in events],
        [event.account_id for event in events],
        [event.created_at for event in events],
        [encode_data(event.data) for event in events],
    )
    tenants = sorted({event.tenant for event in events})
    rows = await conn.fetch(
        "SELECT id, tenant, events_json, account_ids_json FROM webhooks"
        " WHERE enabled AND tenant = ANY($1::text[])",
        tenants,
    )
    if rows:
        subs = [Subscription(row[0], row[1], row[2], row[3]) for row in rows]
        deliveries: list[tuple[str, str, str, datetime]] = []
        for event in events:
            deliveries += [
                (new_id("whd"), webhook_id, event.id, event.created_at)
                for webhook_id in matching(subs, event)
            ]
        await add_deliveries(conn, deliveries)
    await conn.execute(
        "SELECT pg_notify($1, $2 || t) FROM unnest($3::text[]) AS t",
        CHANNEL_PREFIX + Topic.EVENTS,
        COMMIT_ORIGIN + "|",
        tenants,
    )


async def add_deliveries(
    conn: asyncpg.Connection, deliveries: Sequence[tuple[str, str, str, datetime]]
) -> None:
    """Queue deliveries (id, webhook id, event id, due at) in the open transaction."""
    if not deliveries:
        return
    await conn.execute(
        "INSERT INTO webhook_deliveries (id, webhook_id, event_id, status, next_attempt_at,"
        " created_at, updated_at)"
        " SELECT d.id, d.webhook_id, d.event_id, $4, d.due, d.due, d.due"
        " FROM unnest($1::text[], $2::text[], $3::text[], $5::timestamptz[])"
        " AS d (id, webhook_id, event_id, due)"
        " ON CONFLICT (webhook_id, event_id) DO NOTHING",
        [d[0] for d in deliveries],
        [d[1] for d in deliveries],
        [d[2] for d in deliveries],
        PENDING,
        [d[3] for d in deliveries],
    )


def _event(row: Record) -> Event:
    return Event(
        id=row["id"],
        type=row["type"],
        tenant=row["tenant"],
        account_id=row["account_id"],
        created_at=row["created_at"],
        data=decode_data(row["data"]),
        cursor=encode_cursor(int(row["xid"]), row["position"]),
    )


class PgEventRepository:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def insert(self, events: Sequence[NewEvent]) -> None:
        async with self._db.transaction() as conn:
            await insert_events(conn, events)

    async def feed(
        self,
        tenant: str,
        *,
        after: str | None,
        types: Sequence[str] | None,
        account_id: str | None,
        limit: int,
    ) -> list[Event]:
        xid, position = decode_cursor(after) if after else (0, 0)
        sql = (
            f"SELECT {_COLUMNS} FROM events WHERE tenant = $1"
            " AND (xid, position) > ($2::text::xid8, $3::bigint)"
            " AND xid < pg_snapshot_xmin(pg_current_snapshot())"
        )
        args: list[Any] = [tenant, str(xid), position]
        if types:
            args.append(list(types))
            sql += f" AND type = ANY(${len(args)}::text[])"
        else:
            args.append(EventType.WEBHOOK_TEST.value)
            sql += f" AND type <> ${len(args)}"
        if account_id is not None:
            args.append(account_id)
            sql += f" AND account_id = ${len(args)}"
        args.append(limit)
        sql += f" ORDER BY xid, position LIMIT ${len(args)}"
        return [_event(row) for row in await self._db.fetch_all(sql, *args)]

    async def get(self, event_id: str) -> Event | None:
        row = await self._db.fetch_one(f"SELECT {_COLUMNS} FROM events WHERE id = $1", event_id)
        return None if row is None else _event(row)

    async def prune(self, before: datetime) -> int:
        async with self._db.transaction() as conn:
            await conn.execute(
                "DELETE FROM webhook_deliveries WHERE created_at < $1 AND status <> $2",
                before,
                PENDING,
            )
            await conn.execute("DELETE FROM webhook_attempts WHERE at < $1", before)
            status = await conn.execute(
                "DELETE FROM events WHERE created_at < $1 AND NOT EXISTS (SELECT 1 FROM"
                " webhook_deliveries d WHERE d.event_id = events.id AND d.status = $2)",
                before,
                PENDING,
            )
            return rowcount(status)


# -- the events each change writes (called by the repositories, in their transaction) --


async def emit_messages_received(
    conn: asyncpg.Connection,
    account_id: str,
    retrieval_id: str,
    summaries: Sequence[MessageSummary],
) -> None:
    """One ``message.received`` per stored message, in the storing transaction."""
    if not summaries:
        return
    tenant = await conn.fetchval("SELECT tenant FROM accounts WHERE id = $1", account_id)
    if tenant is None:
        return
    await insert_events(conn, messages_received(tenant, retrieval_id, summaries))


async def emit_retrieval_ended(
    conn: asyncpg.Connection,
    retrieval_id: str,
    status: str,
    at: datetime,
    progress: RetrievalProgress,
    error: RetrievalError | None,
) -> None:
    """``retrieval.succeeded`` or ``retrieval.failed`` for a retrieval that ended so."""
    row = await conn.fetchrow(
        "SELECT r.account_id, a.tenant FROM retrievals r JOIN accounts a"
        " ON a.id = r.account_id WHERE r.id = $1",
        retrieval_id,
    )
    if row is None:
        return
    event = retrieval_ended(row[1], row[0], retrieval_id, status, at, progress, error)
    if event is not None:
        await insert_events(conn, [event])


async def emit_outgoing_outcomes(
    conn: asyncpg.Connection, outcomes: Sequence[DeliveryOutcome]
) -> None:
    """``outgoing.sent``/``deferred``/``failed`` for the attempts just recorded, with
    each recipient's state after them."""
    ids = [o.outgoing_id for o in outcomes if o.attempt is not None and o.status in REPORTED]
    await emit_outgoing_states(conn, ids)


async def emit_outgoing_states(conn: asyncpg.Connection, ids: Sequence[str]) -> None:
    """``outgoing.sent``/``deferred``/``failed`` for these messages as they stand now in
    the open transaction (after an attempt, or expired), recipients included."""
    if not ids:
        return
    rows = await conn.fetch(
        "SELECT o.id, o.account_id, a.tenant, o.message_id, o.status, o.attempt_count,"
        " o.next_attempt_at, o.sent_at, o.last_error_code, o.last_error_detail, o.updated_at,"
        " o.metadata, o.tags"
        " FROM outbox o JOIN accounts a ON a.id = o.account_id WHERE o.id = ANY($1::text[])",
        ids,
    )
    recipients: dict[str, list[RecipientDetail]] = {}
    for r in await conn.fetch(
        "SELECT outgoing_id, address, kind, status, smtp_code, smtp_message"
        " FROM outbox_recipients WHERE outgoing_id = ANY($1::text[])"
        " ORDER BY outgoing_id, position",
        ids,
    ):
        recipients.setdefault(r[0], []).append(
            RecipientDetail(address=r[1], kind=r[2], status=r[3], smtp_code=r[4], smtp_message=r[5])
        )
    order = {outgoing_id: n for n, outgoing_id in enumerate(ids)}
    events = [
        outgoing_outcome(
            tenant=row[2],
            account_id=row[1],
            outgoing_id=row[0],
            message_id=row[3],
            status=row[4],
            attempt_count=row[5],
            next_attempt_at=row[6],
            sent_at=row[7],
            error_code=row[8],
            error_detail=row[9],
            at=row[10],
            recipients=recipients.get(row[0], []),
            metadata=msgspec.json.decode(row[11], type=dict[str, str]) if row[11] else {},
            tags=msgspec.json.decode(row[12], type=list[str]) if row[12] else [],
        )
        for row in sorted(rows, key=lambda row: order[row[0]])
    ]
    await insert_events(conn, [e for e in events if e is not None])


async def smtp_pauses(
    conn: asyncpg.Connection, where: str, *args: Any
) -> list[tuple[str, str, str, str | None, datetime | None]]:
    """(account id, tenant, code, detail, since) of the paused accounts ``where`` selects."""
    rows = await conn.fetch(
        "SELECT id, tenant, smtp_pause_code, smtp_pause_detail, smtp_paused_at FROM accounts"
        f" WHERE smtp_pause_code IS NOT NULL AND ({where})",
        *args,
    )
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


async def emit_account_pauses(
    conn: asyncpg.Connection,
    pauses: Sequence[tuple[str, str, str, str | None, datetime | None]],
    *,
    resumed: bool,
    at: datetime,
) -> None:
    """``account.paused`` (or ``account.resumed``) for delivery pauses set (or ended)."""
    await insert_events(conn, account_pauses(pauses, resumed=resumed, at=at))


async def emit_retrievals_ended(conn: asyncpg.Connection, ids: Sequence[str]) -> None:
    """``retrieval.failed``/``succeeded`` for retrievals ended in bulk (interrupted ones),
    read back in the open transaction."""
    if not ids:
        return
    rows = await conn.fetch(
        "SELECT r.id, r.account_id, a.tenant, r.status, r.finished_at, r.messages_on_server,"
        " r.messages_downloaded, r.bytes_downloaded, r.messages_deleted, r.messages_skipped,"
        " r.error_code, r.error_detail FROM retrievals r JOIN accounts a ON a.id = r.account_id"
        " WHERE r.id = ANY($1::text[]) ORDER BY r.id",
        list(ids),
    )
    events = [
        retrieval_ended(
            row[2],
            row[1],
            row[0],
            row[3],
            row[4],
            RetrievalProgress(
                messages_on_server=row[5],
                messages_downloaded=row[6],
                bytes_downloaded=row[7],
                messages_deleted=row[8],
                messages_skipped=row[9],
            ),
            RetrievalError(row[10], row[11]) if row[10] else None,
        )
        for row in rows
    ]
    await insert_events(conn, [e for e in events if e is not None])
