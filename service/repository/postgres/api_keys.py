"""Generated API keys on PostgreSQL: only their SHA-256 hashes are stored."""

from __future__ import annotations

from service.domain.ids import new_id
from service.domain.time import utcnow
from service.repository.postgres.database import PgDatabase


class PgApiKeyRepository:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def all(self) -> list[tuple[str, str]]:
        """(tenant, key hash) pairs."""
        rows = await self._db.fetch_all("SELECT tenant, key_hash FROM api_keys ORDER BY id")
        return [(row["tenant"], row["key_hash"]) for row in rows]

    async def add(self, tenant: str, key_hash: str) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                "INSERT INTO api_keys (id, tenant, key_hash, created_at) VALUES ($1, $2, $3, $4)",
                new_id("key"),
                tenant,
                key_hash,
                utcnow(),
            )
