"""Aggregate counts for metrics, on PostgreSQL."""

from __future__ import annotations

from datetime import datetime

from service.repository.postgres.database import PgDatabase
from service.repository.stats import BY_STATUS_SQL, OLDEST_UNSENT_SQL


class PgStatsRepository:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def outbox_by_status(self) -> dict[str, int]:
        """How many outgoing messages are in each status, over all accounts."""
        rows = await self._db.fetch_all(BY_STATUS_SQL.format(now="now()"))
        return {str(row[0]): int(row[1]) for row in rows}

    async def oldest_unsent_at(self) -> datetime | None:
        """When the oldest message still queued, deferred or sending was accepted."""
        value = await self._db.fetch_value(OLDEST_UNSENT_SQL)
        return value if isinstance(value, datetime) else None
