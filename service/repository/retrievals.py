"""Retrieval records: one row per POP3 session's work, progress updated while it runs."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import datetime
from typing import Protocol

import aiosqlite
import msgspec

from service.codes import ErrorCode
from service.domain.enums import RetrievalStatus, RetrievalTrigger
from service.domain.retrievals import Retrieval, RetrievalError, RetrievalProgress
from service.domain.time import from_text, opt_from_text, to_text
from service.repository.database import Database
from service.repository.pages import Page, page_of

_COLUMNS = (
    "id, account_id, trigger, status, created_at, started_at, finished_at,"
    " messages_on_server, messages_downloaded, bytes_downloaded, messages_deleted,"
    " messages_skipped, error_code, error_detail"
)
ACTIVE = (RetrievalStatus.QUEUED.value, RetrievalStatus.RUNNING.value)


class LatestRetrieval(msgspec.Struct, frozen=True):
    """An account's latest retrieval, as the poll schedule needs it."""

    created_at: datetime
    error_code: str | None


class RetrievalRepository(Protocol):
    async def add(self, retrieval: Retrieval) -> None: ...
    async def get(self, account_id: str, retrieval_id: str) -> Retrieval | None: ...
    async def active(self, account_id: str) -> Retrieval | None: ...
    async def page(self, account_id: str, *, after: str | None, limit: int) -> Page[Retrieval]: ...
    async def count_active(self) -> int: ...
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
    ) -> None: ...
    async def fail_interrupted(self, at: datetime, *, keep: Iterable[str] = ()) -> int: ...


class SQLiteRetrievalRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(self, retrieval: Retrieval) -> None:
        """Insert; ``DuplicateError`` when the account already has an active retrieval."""
        r = retrieval
        async with self._db.transaction() as conn:
            await conn.execute(
                "INSERT INTO retrievals (id, account_id, trigger, status, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (r.id, r.account_id, r.trigger.value, r.status.value, to_text(r.created_at)),
            )

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
    ) -> None:
        async with self._db.transaction() as conn:
            await update_progress(conn, retrieval_id, progress)
            await conn.execute(
                "UPDATE retrievals SET status = ?, finished_at = ?, error_code = ?,"
                " error_detail = ? WHERE id = ?",
                (
                    status.value,
                    to_text(at),
                    error.code if error else None,
                    error.detail if error else None,
                    retrieval_id,
                ),
            )

    async def fail_interrupted(self, at: datetime, *, keep: Iterable[str] = ()) -> int:
        """At start: retrievals left active by a stopped process end as failed.

        ``keep`` names retrievals this process already runs (when this recovery was
        delayed, e.g. by a full disk, and triggers came first).
        """
        kept = json.dumps(sorted(keep))
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE retrievals SET status = ?, finished_at = ?, error_code = ?,"
                " error_detail = 'the service stopped during this retrieval; nothing was"
                " deleted that was not stored' WHERE status IN (?, ?)"
                " AND id NOT IN (SELECT value FROM json_each(?))",
                (
                    RetrievalStatus.FAILED.value,
                    to_text(at),
                    ErrorCode.INTERRUPTED.value,
                    *ACTIVE,
                    kept,
                ),
            )
            return cursor.rowcount


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
