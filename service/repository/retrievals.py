"""Retrieval records: one row per POP3 session's work, progress updated while it runs.

An active retrieval (queued or running) is held by one process (``owner``) under a lease
(``lease_until``) that the process renews while it works. At most one retrieval per
account is active, whichever process runs it (a partial unique index). A retrieval whose
lease expired (its process died) is ended ``interrupted`` by whichever process sweeps
first (``interrupt_expired``).

A scheduled poll on a store with one process (SQLite) may be stored only when it ends
(``add_ended``): one write for a poll that found nothing to download or delete (see
``service.services.retrieval``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Protocol

import aiosqlite
import msgspec

from service.codes import ErrorCode
from service.domain.enums import RetrievalStatus, RetrievalTrigger
from service.domain.event_emission import ended_retrieval_event, retrieval_ended
from service.domain.retrievals import Retrieval, RetrievalError, RetrievalProgress
from service.domain.time import from_text, opt_from_text, opt_to_text, to_text
from service.repository.database import Database
from service.repository.events import (
    committed,
    emit_retrieval_ended,
    emit_retrievals_ended,
    insert_events,
    write_events,
)
from service.repository.pages import Page, page_of

_COLUMNS = (
    "id, account_id, trigger, status, created_at, started_at, finished_at,"
    " messages_on_server, messages_downloaded, bytes_downloaded, messages_deleted,"
    " messages_skipped, error_code, error_detail"
)
ACTIVE = (RetrievalStatus.QUEUED.value, RetrievalStatus.RUNNING.value)
INTERRUPTED_DETAIL = (
    "the service stopped during this retrieval; nothing was deleted that was not stored"
)


class LatestRetrieval(msgspec.Struct, frozen=True):
    """An account's latest retrieval, as the poll schedule needs it."""

    created_at: datetime
    error_code: str | None


class RetrievalRepository(Protocol):
    async def add(
        self,
        retrieval: Retrieval,
        *,
        owner: str,
        lease_until: datetime,
        not_after: datetime | None = None,
    ) -> bool: ...
    async def get(self, account_id: str, retrieval_id: str) -> Retrieval | None: ...
    async def active(self, account_id: str) -> Retrieval | None: ...
    async def page(self, account_id: str, *, after: str | None, limit: int) -> Page[Retrieval]: ...
    async def count_active(self) -> int: ...
    async def count_active_for_tenant(self, tenant: str) -> int: ...
    async def latest(self) -> dict[str, LatestRetrieval]: ...
    async def start(self, retrieval_id: str, at: datetime) -> None: ...
    async def progress(self, retrieval_id: str, progress: RetrievalProgress) -> None: ...
    async def finish(
        self,
        retrieval_id: str,
        status: RetrievalStatus,
        at: datetime,
        progress: RetrievalProgress,
        error: RetrievalError | None,
        *,
        next_poll_at: datetime | None = None,
        tenant: str | None = None,
        account_id: str | None = None,
    ) -> None: ...
    async def add_ended(
        self, retrieval: Retrieval, *, tenant: str, next_poll_at: datetime | None = None
    ) -> bool: ...
    async def renew(
        self, owner: str, retrieval_ids: Collection[str], lease_until: datetime
    ) -> int: ...
    async def interrupt_expired(
        self, now: datetime, *, everything: bool = False, keep: Iterable[str] = ()
    ) -> int: ...


class SQLiteRetrievalRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(
        self,
        retrieval: Retrieval,
        *,
        owner: str,
        lease_until: datetime,
        not_after: datetime | None = None,
    ) -> bool:
        """Insert, held by ``owner`` until ``lease_until``; True when inserted.

        ``not_after`` (a scheduled poll): when a retrieval of the account was created
        after it (another process polled meanwhile), nothing is inserted: False.
        ``DuplicateError`` when the account already has an active retrieval.
        """
        r = retrieval
        async with self._db.transaction() as conn:
            # Checked and inserted under the write lock: no other process can slip a
            # retrieval in between.
            if not_after is not None:
                newer = await conn.execute_fetchall(
                    "SELECT 1 FROM retrievals WHERE account_id = ? AND created_at > ? LIMIT 1",
                    (r.account_id, to_text(not_after)),
                )
                if newer:
                    return False
            await conn.execute(
                "INSERT INTO retrievals (id, account_id, trigger, status, created_at,"
                " started_at, owner, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.id,
                    r.account_id,
                    r.trigger.value,
                    r.status.value,
                    to_text(r.created_at),
                    opt_to_text(r.started_at),
                    owner,
                    to_text(lease_until),
                ),
            )
        return True

    async def get(self, account_id: str, retrieval_id: str) -> Retrieval | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM retrievals WHERE id = ? AND account_id = ?",
            (retrieval_id, account_id),
        )
        return None if row is None else _retrieval(row)

    async def active(self, account_id: str) -> Retrieval | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM retrievals WHERE account_id = ? AND status IN (?, ?)",
            (account_id, *ACTIVE),
        )
        return None if row is None else _retrieval(row)

    async def page(self, account_id: str, *, after: str | None, limit: int) -> Page[Retrieval]:
        """Newest first."""
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM retrievals WHERE account_id = ? AND id < ?"
            " ORDER BY id DESC LIMIT ?",
            (account_id, after or "~", limit + 1),
        )
        return page_of([_retrieval(row) for row in rows], limit, key=lambda r: r.id)

    async def count_active(self) -> int:
        row = await self._db.fetch_one(
            "SELECT count(*) FROM retrievals WHERE status IN (?, ?)", ACTIVE
        )
        return int(row[0]) if row else 0

    async def count_active_for_tenant(self, tenant: str) -> int:
        """Active retrievals of the tenant's accounts, whichever process runs them."""
        row = await self._db.fetch_one(
            "SELECT count(*) FROM retrievals r JOIN accounts a ON a.id = r.account_id"
            " WHERE a.tenant = ? AND r.status IN (?, ?)",
            (tenant, *ACTIVE),
        )
        return int(row[0]) if row else 0

    async def latest(self) -> dict[str, LatestRetrieval]:
        """Per account, when its latest retrieval was created and how it failed, if it did."""
        rows = await self._db.fetch_all(
            "SELECT account_id, created_at, error_code FROM ("
            " SELECT account_id, created_at, error_code, row_number() OVER ("
            "  PARTITION BY account_id ORDER BY created_at DESC, id DESC) AS n"
            " FROM retrievals) WHERE n = 1"
        )
        return {
            row["account_id"]: LatestRetrieval(from_text(row["created_at"]), row["error_code"])
            for row in rows
        }

    async def start(self, retrieval_id: str, at: datetime) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE retrievals SET status = ?, started_at = ? WHERE id = ?",
                (RetrievalStatus.RUNNING.value, to_text(at), retrieval_id),
            )

    async def progress(self, retrieval_id: str, progress: RetrievalProgress) -> None:
        async with self._db.transaction() as conn:
            await update_progress(conn, retrieval_id, progress)

    async def finish(
        self,
        retrieval_id: str,
        status: RetrievalStatus,
        at: datetime,
        progress: RetrievalProgress,
        error: RetrievalError | None,
        *,
        next_poll_at: datetime | None = None,
        tenant: str | None = None,
        account_id: str | None = None,
    ) -> None:
        """Record the end, progress included, in one statement; ``next_poll_at``: when
        the account's next scheduled poll is due (if it is still polled), in the same
        transaction. ``tenant`` and ``account_id`` (the caller knows them) save reading
        them back for the event."""
        p = progress
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE retrievals SET status = ?, finished_at = ?, error_code = ?,"
                " error_detail = ?, lease_until = NULL, messages_on_server = ?,"
                " messages_downloaded = ?, bytes_downloaded = ?, messages_deleted = ?,"
                " messages_skipped = ? WHERE id = ?",
                (
                    status.value,
                    to_text(at),
                    error.code if error else None,
                    error.detail if error else None,
                    p.messages_on_server,
                    p.messages_downloaded,
                    p.bytes_downloaded,
                    p.messages_deleted,
                    p.messages_skipped,
                    retrieval_id,
                ),
            )
            if tenant is None or account_id is None:
                await emit_retrieval_ended(conn, retrieval_id, status.value, at, progress, error)
            elif cursor.rowcount > 0:  # none: the account was deleted meanwhile
                event = retrieval_ended(
                    tenant, account_id, retrieval_id, status.value, at, progress, error
                )
                if event is not None:
                    await insert_events(conn, [event])
            if next_poll_at is not None:
                await _set_next_poll(conn, next_poll_at, retrieval_id, account_id)

    async def add_ended(
        self, retrieval: Retrieval, *, tenant: str, next_poll_at: datetime | None = None
    ) -> bool:
        """Store a retrieval that has already ended (never stored while it ran), with its
        event and the account's next poll, in one transaction; False (nothing written)
        when the account is gone."""
        r = retrieval
        assert r.status not in ACTIVE, "only an ended retrieval is added this way"
        event = ended_retrieval_event(tenant, r)
        events = [event] if event is not None else []

        def write(raw: sqlite3.Connection) -> frozenset[str] | None:
            # From the account's row: nothing is inserted for an account deleted meanwhile.
            cursor = raw.execute(
                f"INSERT INTO retrievals ({_COLUMNS})"
                " SELECT ?, id, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM accounts WHERE id = ?",
                (
                    r.id,
                    r.trigger.value,
                    r.status.value,
                    to_text(r.created_at),
                    opt_to_text(r.started_at),
                    opt_to_text(r.finished_at),
                    r.messages_on_server,
                    r.messages_downloaded,
                    r.bytes_downloaded,
                    r.messages_deleted,
                    r.messages_skipped,
                    r.error.code if r.error else None,
                    r.error.detail if r.error else None,
                    r.account_id,
                ),
            )
            if cursor.rowcount <= 0:
                return None
            delivering = write_events(raw, events)
            if next_poll_at is not None:
                raw.execute(*_next_poll_statement(next_poll_at, r.id, r.account_id))
            return delivering

        # An empty scheduled poll ends here: one round trip for its whole transaction.
        delivering = await self._db.write(write)
        if delivering is None:
            return False
        committed(events, delivering)()
        return True

    async def renew(self, owner: str, retrieval_ids: Collection[str], lease_until: datetime) -> int:
        """Extend to ``lease_until`` the active retrievals ``owner`` still holds among
        ``retrieval_ids``; return how many it still holds."""
        if not retrieval_ids:
            return 0
        ids = list(retrieval_ids)
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE retrievals SET lease_until = ? WHERE owner = ? AND status IN (?, ?)"
                f" AND id IN ({', '.join('?' * len(ids))})",
                (to_text(lease_until), owner, *ACTIVE, *ids),
            )
            return cursor.rowcount

    async def interrupt_expired(
        self, now: datetime, *, everything: bool = False, keep: Iterable[str] = ()
    ) -> int:
        """End as failed (``interrupted``) the active retrievals whose lease expired: their
        process stopped, or lost touch with the store for longer than a lease.

        ``everything``: every active retrieval, whatever its lease (a process at start that
        is the only one on its store). ``keep`` names retrievals this process runs itself
        (when this sweep was delayed, e.g. by a full disk, and triggers came first). A row
        with no lease (from before leases existed) counts as expired.
        """
        kept = json.dumps(sorted(keep))
        expired = "" if everything else " AND (lease_until IS NULL OR lease_until <= ?)"
        params: tuple[str, ...] = () if everything else (to_text(now),)
        where = f"status IN (?, ?) AND id NOT IN (SELECT value FROM json_each(?)){expired}"
        # Looked for on the reader first: the periodic sweep mostly finds nothing, and then
        # takes no write lock.
        found = await self._db.fetch_one(
            f"SELECT 1 FROM retrievals WHERE {where} LIMIT 1", (*ACTIVE, kept, *params)
        )
        if found is None:
            return 0
        async with self._db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "UPDATE retrievals SET status = ?, finished_at = ?, error_code = ?,"
                f" error_detail = ?, lease_until = NULL WHERE {where} RETURNING id",
                (
                    RetrievalStatus.FAILED.value,
                    to_text(now),
                    ErrorCode.INTERRUPTED.value,
                    INTERRUPTED_DETAIL,
                    *ACTIVE,
                    kept,
                    *params,
                ),
            )
            ended = [str(row[0]) for row in rows]
            await emit_retrievals_ended(conn, ended)
            return len(ended)


async def _set_next_poll(
    conn: aiosqlite.Connection, at: datetime, retrieval_id: str, account_id: str | None
) -> None:
    """Set the account's next scheduled poll (if it is still polled)."""
    await conn.execute(*_next_poll_statement(at, retrieval_id, account_id))


def _next_poll_statement(
    at: datetime, retrieval_id: str, account_id: str | None
) -> tuple[str, tuple[str, str]]:
    if account_id is not None:
        return (
            "UPDATE accounts SET next_poll_at = ? WHERE id = ? AND poll_interval_minutes"
            " IS NOT NULL",
            (to_text(at), account_id),
        )
    return (
        "UPDATE accounts SET next_poll_at = ? WHERE poll_interval_minutes IS NOT"
        " NULL AND id = (SELECT account_id FROM retrievals WHERE id = ?)",
        (to_text(at), retrieval_id),
    )


async def update_progress(
    conn: aiosqlite.Connection, retrieval_id: str, p: RetrievalProgress
) -> None:
    """Write progress counts inside the caller's transaction."""
    await conn.execute(
        "UPDATE retrievals SET messages_on_server = ?, messages_downloaded = ?,"
        " bytes_downloaded = ?, messages_deleted = ?, messages_skipped = ? WHERE id = ?",
        (
            p.messages_on_server,
            p.messages_downloaded,
            p.bytes_downloaded,
            p.messages_deleted,
            p.messages_skipped,
            retrieval_id,
        ),
    )


def _retrieval(row: sqlite3.Row) -> Retrieval:
    error = (
        None
        if row["error_code"] is None
        else RetrievalError(code=row["error_code"], detail=row["error_detail"] or "")
    )
    return Retrieval(
        id=row["id"],
        account_id=row["account_id"],
        trigger=RetrievalTrigger(row["trigger"]),
        status=RetrievalStatus(row["status"]),
        created_at=from_text(row["created_at"]),
        started_at=opt_from_text(row["started_at"]),
        finished_at=opt_from_text(row["finished_at"]),
        messages_on_server=row["messages_on_server"],
        messages_downloaded=row["messages_downloaded"],
        bytes_downloaded=row["bytes_downloaded"],
        messages_deleted=row["messages_deleted"],
        messages_skipped=row["messages_skipped"],
        error=error,
    )
