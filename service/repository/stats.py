"""Aggregate counts for metrics."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from service.domain.time import from_text, to_text, utcnow
from service.repository.database import Database

# Two queries whose conditions match the outbox's partial indexes (waiting, sending), so
# the oldest unsent message is found among the pending rows only, however many were sent.
OLDEST_UNSENT_SQL = (
    "SELECT min(created_at) FROM ("
    # A scheduled message is waiting only from its send_at (a later time: age 0 until then).
    "SELECT min(coalesce(send_at, created_at)) AS created_at FROM outbox"
    " WHERE status IN ('queued', 'deferred')"
    " UNION ALL SELECT min(created_at) FROM outbox WHERE status = 'sending') AS pending"
)

# A queued message whose send_at is still ahead is counted as ``scheduled``, as the API
# shows it (both are stored queued).
BY_STATUS_SQL = (
    "SELECT CASE WHEN status = 'queued' AND send_at > {now} THEN 'scheduled' ELSE status END"
    " AS shown, count(*) FROM outbox GROUP BY shown"
)


class StatsRepository(Protocol):
    async def outbox_by_status(self) -> dict[str, int]: ...

    async def oldest_unsent_at(self) -> datetime | None: ...


class SQLiteStatsRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def outbox_by_status(self) -> dict[str, int]:
        """How many outgoing messages are in each status, over all accounts."""
        rows = await self._db.fetch_all(BY_STATUS_SQL.format(now="?"), (to_text(utcnow()),))
        return {str(row[0]): int(row[1]) for row in rows}

    async def oldest_unsent_at(self) -> datetime | None:
        """When the oldest message still queued, deferred or sending was accepted."""
        row = await self._db.fetch_one(OLDEST_UNSENT_SQL)
        return None if row is None or row[0] is None else from_text(str(row[0]))
