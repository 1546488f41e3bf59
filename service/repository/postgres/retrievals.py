"""Retrieval records on PostgreSQL, each active one held by one replica under a lease."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any

from service.codes import ErrorCode
from service.domain.enums import RetrievalStatus, RetrievalTrigger
from service.domain.event_emission import ended_retrieval_event, retrieval_ended
from service.domain.retrievals import Retrieval, RetrievalError, RetrievalProgress
from service.repository.pages import Page, page_of
from service.repository.postgres.database import PgDatabase, Record, rowcount
from service.repository.postgres.events import (
    emit_retrieval_ended,
    emit_retrievals_ended,
    insert_events,
)
from service.repository.retrievals import ACTIVE, INTERRUPTED_DETAIL, LatestRetrieval

_COLUMNS = (
    "id, account_id, trigger, status, created_at, started_at, finished_at,"
    " messages_on_server, messages_downloaded, bytes_downloaded, messages_deleted,"
    " messages_skipped, error_code, error_detail"
)
_ACTIVE = list(ACTIVE)


class PgRetrievalRepository:
    def __init__(self, db: PgDatabase) -> None:
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

        ``not_after`` (a scheduled poll): when a retrieval of the account was created after
        it (another replica polled meanwhile), nothing is inserted: False.
        ``DuplicateError`` when the account already has an active retrieval (the partial
        unique index, across replicas).
        """
        r = retrieval
        async with self._db.transaction() as conn:
            if not_after is not None:
                # The account row's lock makes the check and the insert one step for all
                # replicas: two scheduled polls of one account cannot both pass it.
                await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", r.account_id)
                newer = await conn.fetchval(
                    "SELECT 1 FROM retrievals WHERE account_id = $1 AND created_at > $2 LIMIT 1",
                    r.account_id,
                    not_after,
                )
                if newer is not None:
                    return False
            await conn.execute(
                "INSERT INTO retrievals (id, account_id, trigger, status, created_at,"
                " started_at, owner, lease_until) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                r.id,
                r.account_id,
                r.trigger.value,
                r.status.value,
                r.created_at,
                r.started_at,
                owner,
                lease_until,
            )
        return True

    async def get(self, account_id: str, retrieval_id: str) -> Retrieval | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM retrievals WHERE id = $1 AND account_id = $2",
            retrieval_id,
            account_id,
        )
        return None if row is None else _retrieval(row)

    async def active(self, account_id: str) -> Retrieval | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM retrievals WHERE account_id = $1 AND status = ANY($2)",
            account_id,
            _ACTIVE,
        )
        return None if row is None else _retrieval(row)

    async def page(self, account_id: str, *, after: str | None, limit: int) -> Page[Retrieval]:
        """Newest first."""
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM retrievals WHERE account_id = $1 AND id < $2"
            " ORDER BY id DESC LIMIT $3",
            account_id,
            after or "~",
            limit + 1,
        )
        return page_of([_retrieval(row) for row in rows], limit, key=lambda r: r.id)

    async def count_active(self) -> int:
        return int(
            await self._db.fetch_value(
                "SELECT count(*) FROM retrievals WHERE status = ANY($1)", _ACTIVE
            )
        )

    async def count_active_for_tenant(self, tenant: str) -> int:
        """Active retrievals of the tenant's accounts, whichever replica runs them."""
        return int(
            await self._db.fetch_value(
                "SELECT count(*) FROM retrievals r JOIN accounts a ON a.id = r.account_id"
                " WHERE a.tenant = $1 AND r.status = ANY($2)",
                tenant,
                _ACTIVE,
            )
        )

    async def latest(self) -> dict[str, LatestRetrieval]:
        """Per account, when its latest retrieval was created and how it failed, if it did."""
        rows = await self._db.fetch_all(
            "SELECT DISTINCT ON (account_id) account_id, created_at, error_code"
            " FROM retrievals ORDER BY account_id, created_at DESC, id DESC"
        )
        return {
            row["account_id"]: LatestRetrieval(row["created_at"], row["error_code"]) for row in rows
        }

    async def start(self, retrieval_id: str, at: datetime) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE retrievals SET status = $1, started_at = $2 WHERE id = $3",
                RetrievalStatus.RUNNING.value,
                at,
                retrieval_id,
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
        """Record the end, progress included; ``next_poll_at``: when the account's next
        scheduled poll is due (if it is still polled), in the same transaction.
        ``tenant`` and ``account_id`` (the caller knows them) save reading them back for
        the event."""
        p = progress
        async with self._db.transaction() as conn:
            status_line = await conn.execute(
                "UPDATE retrievals SET status = $1, finished_at = $2, error_code = $3,"
                " error_detail = $4, lease_until = NULL, messages_on_server = $5,"
                " messages_downloaded = $6, bytes_downloaded = $7, messages_deleted = $8,"
                " messages_skipped = $9 WHERE id = $10",
                status.value,
                at,
                error.code if error else None,
                error.detail if error else None,
                p.messages_on_server,
                p.messages_downloaded,
                p.bytes_downloaded,
                p.messages_deleted,
                p.messages_skipped,
                retrieval_id,
            )
            if tenant is None or account_id is None:
                await emit_retrieval_ended(conn, retrieval_id, status.value, at, progress, error)
            elif rowcount(status_line) > 0:  # none: the account was deleted meanwhile
                event = retrieval_ended(
                    tenant, account_id, retrieval_id, status.value, at, progress, error
                )
                if event is not None:
                    await insert_events(conn, [event])
            if next_poll_at is not None:
                await conn.execute(
                    "UPDATE accounts SET next_poll_at = $1 WHERE poll_interval_minutes IS NOT"
                    " NULL AND id = (SELECT account_id FROM retrievals WHERE id = $2)",
                    next_poll_at,
                    retrieval_id,
                )

    async def add_ended(
        self, retrieval: Retrieval, *, tenant: str, next_poll_at: datetime | None = None
    ) -> bool:
        """Store a retrieval that has already ended (never stored while it ran), with its
        event and the account's next poll, in one transaction; False (nothing written)
        when the account is gone."""
        r = retrieval
        assert r.status.value not in ACTIVE, "only an ended retrieval is added this way"
        async with self._db.transaction() as conn:
            status_line = await conn.execute(
                f"INSERT INTO retrievals ({_COLUMNS}) SELECT $1, id, $2, $3, $4, $5, $6, $7,"
                " $8, $9, $10, $11, $12, $13 FROM accounts WHERE id = $14",
                r.id,
                r.trigger.value,
                r.status.value,
                r.created_at,
                r.started_at,
                r.finished_at,
                r.messages_on_server,
                r.messages_downloaded,
                r.bytes_downloaded,
                r.messages_deleted,
                r.messages_skipped,
                r.error.code if r.error else None,
                r.error.detail if r.error else None,
                r.account_id,
            )
            if rowcount(status_line) <= 0:
                return False
            event = ended_retrieval_event(tenant, r)
            if event is not None:
                await insert_events(conn, [event])
            if next_poll_at is not None:
                await conn.execute(
                    "UPDATE accounts SET next_poll_at = $1 WHERE id = $2"
                    " AND poll_interval_minutes IS NOT NULL",
                    next_poll_at,
                    r.account_id,
                )
        return True

    async def renew(self, owner: str, retrieval_ids: Collection[str], lease_until: datetime) -> int:
        """Extend to ``lease_until`` the active retrievals ``owner`` still holds among
        ``retrieval_ids``; return how many it still holds."""
        if not retrieval_ids:
            return 0
        async with self._db.transaction() as conn:
            status = await conn.execute(
                "UPDATE retrievals SET lease_until = $1 WHERE owner = $2 AND status = ANY($3)"
                " AND id = ANY($4)",
                lease_until,
                owner,
                _ACTIVE,
                list(retrieval_ids),
            )
            return rowcount(status)

    async def interrupt_expired(
        self, now: datetime, *, everything: bool = False, keep: Iterable[str] = ()
    ) -> int:
        """End as failed (``interrupted``) the active retrievals whose lease expired (their
        replica died or lost the database for longer than a lease); ``everything``: every
        active one but ``keep``. A row with no lease counts as expired."""
        async with self._db.transaction() as conn:
            rows = await conn.fetch(
                "UPDATE retrievals SET status = $1, finished_at = $2, error_code = $3,"
                " error_detail = $4, lease_until = NULL"
                " WHERE status = ANY($5) AND NOT (id = ANY($6))"
                " AND ($7 OR lease_until IS NULL OR lease_until <= $2) RETURNING id",
                RetrievalStatus.FAILED.value,
                now,
                ErrorCode.INTERRUPTED.value,
                INTERRUPTED_DETAIL,
                _ACTIVE,
                sorted(keep),
                everything,
            )
            ended = [str(row[0]) for row in rows]
            await emit_retrievals_ended(conn, ended)
            return len(ended)

    async def claim_queued(
        self, queue: str, owner: str, lease_until: datetime, limit: int
    ) -> list[Retrieval]:
        """Take over up to ``limit`` queued retrievals held by ``queue`` (an API-only
        process stored them for any worker), oldest first; each is ``owner``'s from now.
        ``SKIP LOCKED``: workers claiming at once never take the same row."""
        async with self._db.transaction() as conn:
            rows = await conn.fetch(
                "UPDATE retrievals SET owner = $1, lease_until = $2 WHERE id IN"
                " (SELECT id FROM retrievals WHERE status = $3 AND owner = $4"
                f" ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}",
                owner,
                lease_until,
                RetrievalStatus.QUEUED.value,
                queue,
                limit,
            )
        return sorted((_retrieval(row) for row in rows), key=lambda r: r.id)


async def update_progress(conn: Any, retrieval_id: str, p: RetrievalProgress) -> None:
    """Write progress counts inside the caller's transaction."""
    await conn.execute(
        "UPDATE retrievals SET messages_on_server = $1, messages_downloaded = $2,"
        " bytes_downloaded = $3, messages_deleted = $4, messages_skipped = $5 WHERE id = $6",
        p.messages_on_server,
        p.messages_downloaded,
        p.bytes_downloaded,
        p.messages_deleted,
        p.messages_skipped,
        retrieval_id,
    )


def _retrieval(row: Record) -> Retrieval:
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
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        messages_on_server=row["messages_on_server"],
        messages_downloaded=row["messages_downloaded"],
        bytes_downloaded=row["bytes_downloaded"],
        messages_deleted=row["messages_deleted"],
        messages_skipped=row["messages_skipped"],
        error=error,
    )
