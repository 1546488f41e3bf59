"""Aggregate counts for metrics."""

from __future__ import annotations

from typing import Protocol

from service.repository.database import Database


class StatsRepository(Protocol):
    async def outbox_by_status(self) -> dict[str, int]: ...


class SQLiteStatsRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def outbox_by_status(self) -> dict[str, int]:
        """How many outgoing messages are in each status, over all accounts."""
        rows = await self._db.fetch_all("SELECT status, count(*) FROM outbox GROUP BY status")
        return {str(row[0]): int(row[1]) for row in rows}
