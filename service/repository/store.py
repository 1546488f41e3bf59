"""The Store seam: every repository of one database, and the one place that picks the store.

``create_store(settings)`` gives the SQLite store (a path or ``sqlite:///...``, the embedded
default) or the PostgreSQL store (``postgresql://...``, for several replicas on one
database). Services and the API see only the repository Protocols collected here; neither
knows which store it runs on.
"""

from __future__ import annotations

from typing import Protocol

from service.config import Settings
from service.repository.accounts import AccountRepository, SQLiteAccountRepository
from service.repository.api_keys import ApiKeyRepository, SQLiteApiKeyRepository
from service.repository.bounces import BounceRepository, SQLiteBounceRepository
from service.repository.database import Database
from service.repository.events import EventRepository, SQLiteEventRepository
from service.repository.messages import MessageRepository, SQLiteMessageRepository
from service.repository.notify import InProcessNotifier, Notifier
from service.repository.outbox import OutboxRepository, SQLiteOutboxRepository
from service.repository.retrievals import RetrievalRepository, SQLiteRetrievalRepository
from service.repository.stats import SQLiteStatsRepository, StatsRepository
from service.repository.webhooks import SQLiteWebhookRepository, WebhookRepository


class Store(Protocol):
    """One database and its repositories (open before use, close at the end)."""

    kind: str
    accounts: AccountRepository
    api_keys: ApiKeyRepository
    messages: MessageRepository
    retrievals: RetrievalRepository
    outbox: OutboxRepository
    stats: StatsRepository
    events: EventRepository
    webhooks: WebhookRepository
    bounces: BounceRepository
    notifier: Notifier

    async def open(self) -> None:
        """Connect and apply pending migrations.

        :raises SchemaTooNewError: the database was migrated by a newer Mailroom.
        :raises StorageFullError: no space for the migrations (retried later).
        :raises StoreUnavailableError: the database cannot be reached (retried later).
        """
        ...

    async def close(self) -> None: ...
    async def schema_version(self) -> int: ...

    @property
    def latest_version(self) -> int: ...

    @property
    def storage_full(self) -> bool: ...

    async def probe_write(self) -> None: ...


class StoreDatabase(Protocol):
    """What a store delegates to its database object (SQLite file or PostgreSQL pool)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def schema_version(self) -> int: ...

    @property
    def latest_version(self) -> int: ...

    @property
    def storage_full(self) -> bool: ...

    async def probe_write(self) -> None: ...


class DatabaseStore:
    """The part of every store that is its database's: opening, closing, versions, space."""

    db: StoreDatabase

    async def open(self) -> None:
        """Connect and apply pending migrations."""
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def schema_version(self) -> int:
        return await self.db.schema_version()

    @property
    def latest_version(self) -> int:
        return self.db.latest_version

    @property
    def storage_full(self) -> bool:
        return self.db.storage_full

    async def probe_write(self) -> None:
        await self.db.probe_write()


class SQLiteStore(DatabaseStore):
    """One SQLite file: the embedded store of a single process."""

    kind = "sqlite"

    def __init__(self, path: str) -> None:
        self.db = Database(path)
        self.accounts: AccountRepository = SQLiteAccountRepository(self.db)
        self.api_keys: ApiKeyRepository = SQLiteApiKeyRepository(self.db)
        self.messages: MessageRepository = SQLiteMessageRepository(self.db)
        self.retrievals: RetrievalRepository = SQLiteRetrievalRepository(self.db)
        self.outbox: OutboxRepository = SQLiteOutboxRepository(self.db)
        self.stats: StatsRepository = SQLiteStatsRepository(self.db)
        self.events: EventRepository = SQLiteEventRepository(self.db)
        self.webhooks: WebhookRepository = SQLiteWebhookRepository(self.db)
        self.bounces: BounceRepository = SQLiteBounceRepository(self.db)
        self.notifier: Notifier = InProcessNotifier()


def create_store(settings: Settings) -> Store:
    """The store ``settings.database`` names (nothing is opened yet)."""
    if settings.store_kind == "postgres":
        # Imported here so the embedded default never loads the PostgreSQL driver.
        from service.repository.postgres.store import PostgresStore

        return PostgresStore(
            settings.database, pool_size=settings.db_pool_size, timeout_s=settings.db_timeout_s
        )
    return SQLiteStore(str(settings.database_path))
