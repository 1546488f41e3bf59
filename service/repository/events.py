"""The event store (SQLite): events written in the caller's transaction, the pull feed,
retention.

``insert_events(conn, events)`` is called inside the transaction that makes the change the
events report (transactional outbox): the events exist exactly when the change committed.
In the same statements it queues one webhook delivery per matching enabled endpoint, so a
delivery is never lost between the commit and the dispatcher. After the commit it wakes
webhook delivery and the feed's long-polls (``Topic.EVENTS``, key: the tenant).

Feed order: the single writer makes the autoincrement ``position`` commit-ordered, so a
cursor over it never misses an event and never repeats one.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

import aiosqlite
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
from service.domain.time import from_text, opt_from_text, to_text
from service.repository.database import Database, call_after_commit, run_in_thread

#: Rows per INSERT statement (SQLite binds at most 32766 parameters).
INSERT_CHUNK = 500
#: An event type every endpoint subscribed to ``*`` receives; ``webhook.test`` is only
#: ever sent by the test operation, to one endpoint.
NOT_FANNED_OUT = frozenset({EventType.WEBHOOK_TEST.value})
PENDING = "pending"

CURSOR_PREFIX = "e1."
CURSOR_PATTERN = r"^e1\.[0-9]{1,20}\.[0-9]{1,20}$(?!\n)"
_CURSOR_RE = re.compile(CURSOR_PATTERN)
MAX_CURSOR_PART = 2**63 - 1  # both parts are 64-bit signed integers in the stores

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(dict[str, Any])
_list_decoder = msgspec.json.Decoder(list[str] | None)

# Process-wide listeners for events committed on a SQLite store (one process per file),
# each with whether it wants only the tenants whose events queued webhook deliveries.
_listeners: list[tuple[Callable[[str], None], bool]] = []


class InvalidEventCursor(ValueError):
    """A feed cursor this service did not issue."""


def encode_cursor(xid: int, position: int) -> str:
    """The feed cursor after the event at (``xid``, ``position``); ``xid`` is 0 on SQLite."""
    return f"{CURSOR_PREFIX}{xid}.{position}"


def decode_cursor(cursor: str) -> tuple[int, int]:
    """(xid, position) of a cursor; :class:`InvalidEventCursor` for one not issued here."""
    if not _CURSOR_RE.match(cursor):
        raise InvalidEventCursor("cursor is not one this service issued")
    xid, position = (int(part) for part in cursor[len(CURSOR_PREFIX) :].split("."))
    if xid > MAX_CURSOR_PART or position > MAX_CURSOR_PART:  # no store counts that far
        raise InvalidEventCursor("cursor is not one this service issued")
    return xid, position


def subscribe_committed(
    callback: Callable[[str], None], *, deliveries_only: bool = False
) -> Callable[[], None]:
    """Call ``callback(tenant)`` after each commit of events on a SQLite store in this
    process (with ``deliveries_only``, only of events that queued webhook deliveries: the
    endpoints read inside the transaction are the committed truth on the single writer);
    returns the function that unsubscribes."""
    entry = (callback, deliveries_only)
    _listeners.append(entry)

    def unsubscribe() -> None:
        if entry in _listeners:
            _listeners.remove(entry)

    return unsubscribe


def _wake(tenants: frozenset[str], delivering: frozenset[str]) -> Callable[[], None]:
    def wake() -> None:
        for tenant in tenants:
            for callback, deliveries_only in list(_listeners):
                if tenant in delivering or not deliveries_only:
                    callback(tenant)

    return wake


def encode_data(data: dict[str, Any]) -> str:
    return _encoder.encode(data).decode()


def decode_data(text: str) -> dict[str, Any]:
    return _decoder.decode(text)


class Subscription(msgspec.Struct, frozen=True):
    """What an enabled endpoint receives (for the fan-out at insert time)."""

    webhook_id: str
    tenant: str
    events_json: str
    account_ids_json: str | None


def matching(subscriptions: Sequence[Subscription], event: NewEvent) -> list[str]:
    """The ids of the endpoints that receive ``event``."""
    if event.type.value in NOT_FANNED_OUT:
        return []
    found = []
    for sub in subscriptions:
        if sub.tenant != event.tenant:
            continue
        types = _list_decoder.decode(sub.events_json) or []
        if "*" not in types and event.type.value not in types:
            continue
        accounts = _list_decoder.decode(sub.account_ids_json) if sub.account_ids_json else None
        # Events of no account (webhook.disabled) belong to the whole tenant.
        if accounts is not None and event.account_id is not None:
            if event.account_id not in accounts:
                continue
        found.append(sub.webhook_id)
    return found


async def insert_events(conn: aiosqlite.Connection, events: Sequence[NewEvent]) -> None:
    """Insert ``events`` (and their webhook deliveries) in the transaction open on ``conn``
    (one round trip to its thread); wake webhook delivery and feed readers once it
    commits."""
    if not events:
        return
    delivering: frozenset[str] = await run_in_thread(conn, lambda raw: write_events(raw, events))
    call_after_commit(conn, committed(events, delivering))


def write_events(raw: sqlite3.Connection, events: Sequence[NewEvent]) -> frozenset[str]:
    """Insert ``events`` and queue their webhook deliveries with the ``sqlite3`` connection
    of an open transaction (on its thread); the tenants whose events queued deliveries."""
    if not events:
        return frozenset()
    for start in range(0, len(events), INSERT_CHUNK):
        chunk = events[start : start + INSERT_CHUNK]
        params: list[Any] = []
        for event in chunk:
            params += (
                event.id,
                event.type.value,
                event.tenant,
                event.account_id,
                to_text(event.created_at),
                encode_data(event.data),
            )
        raw.execute(
            "INSERT INTO events (id, type, tenant, account_id, created_at, data) VALUES "
            + ",".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk)),
            params,
        )
    tenants = {event.tenant for event in events}
    marks = ",".join("?" * len(tenants))
    rows = raw.execute(
        "SELECT id, tenant, events_json, account_ids_json FROM webhooks"
        f" WHERE enabled = 1 AND tenant IN ({marks})",
        tuple(tenants),
    ).fetchall()
    delivering: set[str] = set()
    if rows:
        subs = [Subscription(row[0], row[1], row[2], row[3]) for row in rows]
        deliveries: list[tuple[str, str, str, str]] = []
        for event in events:
            receivers = matching(subs, event)
            if receivers:
                delivering.add(event.tenant)
            deliveries += [
                (new_id("whd"), webhook_id, event.id, to_text(event.created_at))
                for webhook_id in receivers
            ]
        write_deliveries(raw, deliveries)
    return frozenset(delivering)


def committed(events: Sequence[NewEvent], delivering: frozenset[str]) -> Callable[[], None]:
    """What to call once ``events`` (written by ``write_events``, which said which tenants
    it queued deliveries for) committed: wakes feed readers and webhook delivery."""
    return _wake(frozenset(event.tenant for event in events), delivering)


async def add_deliveries(
    conn: aiosqlite.Connection, deliveries: Sequence[tuple[str, str, str, str]]
) -> None:
    """Queue deliveries (id, webhook id, event id, due at) in the open transaction."""
    if deliveries:
        await run_in_thread(conn, lambda raw: write_deliveries(raw, deliveries))


def write_deliveries(
    raw: sqlite3.Connection, deliveries: Sequence[tuple[str, str, str, str]]
) -> None:
    for start in range(0, len(deliveries), INSERT_CHUNK):
        chunk = deliveries[start : start + INSERT_CHUNK]
        params: list[Any] = []
        for delivery_id, webhook_id, event_id, due in chunk:
            params += (delivery_id, webhook_id, event_id, PENDING, due, due, due)
        raw.execute(
            "INSERT OR IGNORE INTO webhook_deliveries (id, webhook_id, event_id, status,"
            " next_attempt_at, created_at, updated_at) VALUES "
            + ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk)),
            params,
        )


class EventRepository(Protocol):
    async def insert(self, events: Sequence[NewEvent]) -> None:
        """Insert events in a transaction of their own (events that report no other
        change: ``webhook.disabled``, ``webhook.test``)."""
        ...

    async def feed(
        self,
        tenant: str,
        *,
        after: str | None,
        types: Sequence[str] | None,
        account_id: str | None,
        limit: int,
    ) -> list[Event]:
        """The tenant's events after the cursor ``after`` in commit order (at most
        ``limit``). :raises InvalidEventCursor: for a cursor not issued here."""
        ...

    async def get(self, event_id: str) -> Event | None: ...

    async def prune(self, before: datetime) -> int:
        """Delete events created before ``before`` (none a pending delivery still needs),
        and finished deliveries and attempts as old; how many events."""
        ...


def _event(row: sqlite3.Row) -> Event:
    return Event(
        id=row["id"],
        type=row["type"],
        tenant=row["tenant"],
        account_id=row["account_id"],
        created_at=from_text(row["created_at"]),
        data=decode_data(row["data"]),
        cursor=encode_cursor(0, row["position"]),
    )


class SQLiteEventRepository:
    def __init__(self, db: Database) -> None:
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
        position = decode_cursor(after)[1] if after else 0
        sql = (
            "SELECT position, id, type, tenant, account_id, created_at, data FROM events"
            " WHERE tenant = ? AND position > ?"
        )
        params: list[Any] = [tenant, position]
        if types:
            sql += f" AND type IN ({','.join('?' * len(types))})"
            params += list(types)
        else:
            sql += " AND type <> ?"
            params.append(EventType.WEBHOOK_TEST.value)
        if account_id is not None:
            sql += " AND account_id = ?"
            params.append(account_id)
        sql += " ORDER BY position LIMIT ?"
        params.append(limit)
        return [_event(row) for row in await self._db.fetch_all(sql, params)]

    async def get(self, event_id: str) -> Event | None:
        row = await self._db.fetch_one(
            "SELECT position, id, type, tenant, account_id, created_at, data FROM events"
            " WHERE id = ?",
            (event_id,),
        )
        return None if row is None else _event(row)

    async def prune(self, before: datetime) -> int:
        cutoff = to_text(before)
        async with self._db.transaction() as conn:
            await conn.execute(
                "DELETE FROM webhook_deliveries WHERE created_at < ? AND status <> ?",
                (cutoff, PENDING),
            )
            await conn.execute("DELETE FROM webhook_attempts WHERE at < ?", (cutoff,))
            cursor = await conn.execute(
                "DELETE FROM events WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM"
                " webhook_deliveries d WHERE d.event_id = events.id AND d.status = ?)",
                (cutoff, PENDING),
            )
            return cursor.rowcount


# -- the events each change writes (called by the repositories, in their transaction) --


async def _tenant_of(conn: aiosqlite.Connection, account_id: str) -> str | None:
    rows = list(
        await conn.execute_fetchall("SELECT tenant FROM accounts WHERE id = ?", (account_id,))
    )
    return str(rows[0][0]) if rows else None


async def emit_messages_received(
    conn: aiosqlite.Connection,
    account_id: str,
    retrieval_id: str,
    summaries: Sequence[MessageSummary],
) -> None:
    """One ``message.received`` per stored message, in the storing transaction."""
    tenant = await _tenant_of(conn, account_id)
    if tenant is None or not summaries:
        return
    await insert_events(conn, messages_received(tenant, retrieval_id, summaries))


async def emit_retrieval_ended(
    conn: aiosqlite.Connection,
    retrieval_id: str,
    status: str,
    at: datetime,
    progress: RetrievalProgress,
    error: RetrievalError | None,
) -> None:
    """``retrieval.succeeded`` or ``retrieval.failed`` for a retrieval that ended so."""
    rows = list(
        await conn.execute_fetchall(
            "SELECT r.account_id, a.tenant FROM retrievals r JOIN accounts a"
            " ON a.id = r.account_id WHERE r.id = ?",
            (retrieval_id,),
        )
    )
    if not rows:
        return
    event = retrieval_ended(rows[0][1], rows[0][0], retrieval_id, status, at, progress, error)
    if event is not None:
        await insert_events(conn, [event])


async def emit_outgoing_outcomes(
    conn: aiosqlite.Connection, outcomes: Sequence[DeliveryOutcome]
) -> None:
    """``outgoing.sent``/``deferred``/``failed`` for the attempts just recorded, with
    each recipient's state after them."""
    ids = [o.outgoing_id for o in outcomes if o.attempt is not None and o.status in REPORTED]
    await emit_outgoing_states(conn, ids)


async def emit_outgoing_states(conn: aiosqlite.Connection, ids: Sequence[str]) -> None:
    """``outgoing.sent``/``deferred``/``failed`` for these messages as they stand now in
    the open transaction (after an attempt, or expired), recipients included."""
    if not ids:
        return
    marks = ",".join("?" * len(ids))
    rows = await conn.execute_fetchall(
        "SELECT o.id, o.account_id, a.tenant, o.message_id, o.status, o.attempt_count,"
        " o.next_attempt_at, o.sent_at, o.last_error_code, o.last_error_detail, o.updated_at,"
        " o.metadata, o.tags"
        f" FROM outbox o JOIN accounts a ON a.id = o.account_id WHERE o.id IN ({marks})",
        ids,
    )
    recipients: dict[str, list[RecipientDetail]] = {}
    for r in await conn.execute_fetchall(
        "SELECT outgoing_id, address, kind, status, smtp_code, smtp_message"
        f" FROM outbox_recipients WHERE outgoing_id IN ({marks})"
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
            next_attempt_at=opt_from_text(row[6]),
            sent_at=opt_from_text(row[7]),
            error_code=row[8],
            error_detail=row[9],
            at=from_text(row[10]),
            recipients=recipients.get(row[0], []),
            metadata=msgspec.json.decode(row[11], type=dict[str, str]) if row[11] else {},
            tags=msgspec.json.decode(row[12], type=list[str]) if row[12] else [],
        )
        for row in sorted(rows, key=lambda row: order[row[0]])
    ]
    await insert_events(conn, [e for e in events if e is not None])


async def smtp_pauses(
    conn: aiosqlite.Connection, where: str, params: Sequence[Any]
) -> list[tuple[str, str, str, str | None, datetime | None]]:
    """(account id, tenant, code, detail, since) of the paused accounts ``where`` selects."""
    rows = await conn.execute_fetchall(
        "SELECT id, tenant, smtp_pause_code, smtp_pause_detail, smtp_paused_at FROM accounts"
        f" WHERE smtp_pause_code IS NOT NULL AND ({where})",
        tuple(params),
    )
    return [(r[0], r[1], r[2], r[3], opt_from_text(r[4])) for r in rows]


async def emit_account_pauses(
    conn: aiosqlite.Connection,
    pauses: Sequence[tuple[str, str, str, str | None, datetime | None]],
    *,
    resumed: bool,
    at: datetime,
) -> None:
    """``account.paused`` (or ``account.resumed``) for delivery pauses set (or ended)."""
    await insert_events(conn, account_pauses(pauses, resumed=resumed, at=at))


async def emit_retrievals_ended(conn: aiosqlite.Connection, ids: Sequence[str]) -> None:
    """``retrieval.failed``/``succeeded`` for retrievals ended in bulk (interrupted ones),
    read back in the open transaction."""
    if not ids:
        return
    rows = await conn.execute_fetchall(
        "SELECT r.id, r.account_id, a.tenant, r.status, r.finished_at, r.messages_on_server,"
        " r.messages_downloaded, r.bytes_downloaded, r.messages_deleted, r.messages_skipped,"
        " r.error_code, r.error_detail FROM retrievals r JOIN accounts a ON a.id = r.account_id"
        f" WHERE r.id IN ({','.join('?' * len(ids))}) ORDER BY r.id",
        tuple(ids),
    )
    events = [
        retrieval_ended(
            row[2],
            row[1],
            row[0],
            row[3],
            from_text(row[4]),
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
