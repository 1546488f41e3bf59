"""The PostgreSQL store: the repositories over one asyncpg pool, and cross-replica wake-ups."""

from __future__ import annotations

from service.repository.accounts import AccountRepository
from service.repository.api_keys import ApiKeyRepository
from service.repository.bounces import BounceRepository
from service.repository.events import EventRepository
from service.repository.messages import MessageRepository
from service.repository.notify import Notifier
from service.repository.outbox import OutboxRepository
from service.repository.postgres.accounts import PgAccountRepository
from service.repository.postgres.api_keys import PgApiKeyRepository
from service.repository.postgres.bounces import PgBounceRepository
from service.repository.postgres.database import PgDatabase
from service.repository.postgres.events import PgEventRepository
from service.repository.postgres.messages import PgMessageRepository
from service.repository.postgres.notify import PostgresNotifier
from service.repository.postgres.outbox import PgOutboxRepository
from service.repository.postgres.retrievals import PgRetrievalRepository
from service.repository.postgres.stats import PgStatsRepository
from service.repository.postgres.webhooks import PgWebhookRepository
from service.repository.retrievals import RetrievalRepository
from service.repository.stats import StatsRepository
from service.repository.store import DatabaseStore
from service.repository.webhooks import WebhookRepository


class PostgresStore(DatabaseStore):
    """One PostgreSQL database shared by any number of replicas."""

    kind = "postgres"

    def __init__(self, dsn: str, *, pool_size: int, timeout_s: float) -> None:
        self.db = PgDatabase(dsn, pool_size=pool_size, timeout_s=timeout_s)
        self.accounts: AccountRepository = PgAccountRepository(self.db)
        self.api_keys: ApiKeyRepository = PgApiKeyRepository(self.db)
        self.messages: MessageRepository = PgMessageRepository(self.db)
        self.retrievals: RetrievalRepository = PgRetrievalRepository(self.db)
        self.outbox: OutboxRepository = PgOutboxRepository(self.db)
        self.stats: StatsRepository = PgStatsRepository(self.db)
        self.events: EventRepository = PgEventRepository(self.db)
        self.webhooks: WebhookRepository = PgWebhookRepository(self.db)
        self.bounces: BounceRepository = PgBounceRepository(self.db)
        self.notifier: Notifier = PostgresNotifier(self.db)
