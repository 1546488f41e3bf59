"""Process roles (``MAILROOM_ROLE``): the API and the background work in separate processes.

``all`` (the default) serves the API and runs the delivery worker, the retrievals and the
scheduler in one process. On PostgreSQL the work can be split: ``api`` processes only
accept (sends go to the outbox, which workers claim from the database; a retrieval trigger
stores a queued retrieval and wakes the workers), ``worker`` processes only work (and
serve /health, /ready and /metrics). Any number of each share the database.

A queued retrieval waits for a worker under :data:`QUEUE_OWNER`: a worker takes it over
with its own lease (``claim_queued``, ``SKIP LOCKED``), woken by
``Topic.RETRIEVAL_QUEUED`` and, should a wake-up be lost, by polling every
:data:`QUEUE_POLL_S`. One no worker claims within :data:`QUEUE_WAIT_S` is ended as
``interrupted`` by the workers' lease sweep, so the account is not blocked for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from service.codes import ErrorCode
from service.domain.accounts import Account
from service.domain.enums import RetrievalStatus, RetrievalTrigger
from service.domain.ids import new_id
from service.domain.retrievals import Retrieval
from service.domain.time import utcnow
from service.errors import Conflict, TooManyRequests
from service.logs import log_event
from service.repository.accounts import AccountRepository
from service.repository.errors import DuplicateError, RepositoryError
from service.repository.notify import Notifier, Topic
from service.repository.retrievals import RetrievalRepository
from service.services.accounts import AccountService
from service.services.leases import lease_length
from service.services.retrieval import RetrievalService

logger = logging.getLogger("mailroom.roles")

#: The owner of a queued retrieval no worker has claimed yet (process owners are
#: ``rep_...`` ids, so no process ever has this one).
QUEUE_OWNER = "queue"
#: How long a queued retrieval waits for a worker before the sweep ends it.
QUEUE_WAIT_S = 300.0
#: How often a worker looks for queued retrievals when no wake-up came.
QUEUE_POLL_S = 2.0


@runtime_checkable
class QueuedRetrievals(Protocol):
    """The store calls a worker makes to take over queued retrievals (PostgreSQL)."""

    async def claim_queued(
        self, queue: str, owner: str, lease_until: datetime, limit: int
    ) -> list[Retrieval]: ...


class QueuingRetrievalService(RetrievalService):
    """The retrieval service of an API-only process: a trigger stores a queued retrieval
    for a worker and returns it; this process runs none (reads and cancels as usual)."""

    def __init__(
        self,
        *,
        accounts: AccountService,
        retrievals: RetrievalRepository,
        notifier: Notifier,
        max_per_tenant: int,
        **kwargs: Any,
    ) -> None:
        """As :class:`RetrievalService`; ``max_per_tenant`` bounds a tenant's active
        retrievals across every process."""
        super().__init__(
            accounts=accounts,
            retrievals=retrievals,
            notifier=notifier,
            max_per_tenant=max_per_tenant,
            **kwargs,
        )
        self._queue_accounts = accounts
        self._queue_store = retrievals
        self._queue_notifier = notifier
        self._queue_share = max_per_tenant

    async def trigger(
        self, tenant: str, account_id: str, trigger: RetrievalTrigger = RetrievalTrigger.API
    ) -> Retrieval:
        """Store a queued retrieval and wake the workers; 409 if one is active for the
        account, 429 if the tenant holds its share of retrievals already."""
        account = await self._queue_accounts.get(tenant, account_id)
        held = await self._queue_store.count_active_for_tenant(tenant)
        if held >= self._queue_share:
            raise TooManyRequests(
                f"this tenant already has {held} retrievals queued or running, its share;"
                " try again when one ends",
                code=ErrorCode.TOO_MANY_RETRIEVALS,
            )
        retrieval = Retrieval(
            id=new_id("ret"),
            account_id=account.id,
            trigger=trigger,
            status=RetrievalStatus.QUEUED,
            created_at=utcnow(),
        )
        lease_until = utcnow() + timedelta(seconds=QUEUE_WAIT_S)
        try:
            await self._queue_store.add(retrieval, owner=QUEUE_OWNER, lease_until=lease_until)
        except DuplicateError:
            # The active one may belong to a process that is gone: ended if its lease
            # expired, then this trigger is tried once more.
            await self._queue_store.interrupt_expired(utcnow())
            try:
                await self._queue_store.add(retrieval, owner=QUEUE_OWNER, lease_until=lease_until)
            except DuplicateError:
                active = await self._queue_store.active(account.id)
                raise Conflict(
                    "a retrieval is already queued or running for this account",
                    code=ErrorCode.RETRIEVAL_RUNNING,
                    resource_id=active.id if active else None,
                ) from None
        log_event(
            logger,
            "retrieval queued for a worker",
            tenant=tenant,
            account_id=account.id,
            retrieval_id=retrieval.id,
        )
        self._queue_notifier.publish(Topic.RETRIEVAL_QUEUED, retrieval.id)
        return retrieval

    async def trigger_scheduled(
        self, account: Account, *, not_after: datetime | None = None
    ) -> Retrieval | None:
        """An API-only process runs no scheduler: never called; nothing is started."""
        return None


class QueuedRetrievalClaimer:
    """A worker's loop that takes over queued retrievals while it has free slots."""

    def __init__(
        self,
        *,
        store: QueuedRetrievals,
        account_repo: AccountRepository,
        service: RetrievalService,
        notifier: Notifier,
        owner: str,
        lease_s: float,
        poll_s: float = QUEUE_POLL_S,
    ) -> None:
        """Subscribes at once: build it before the notifier starts."""
        self._store = store
        self._account_repo = account_repo
        self._service = service
        self._owner = owner
        self._lease_s = lease_s
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        notifier.subscribe(Topic.RETRIEVAL_QUEUED, lambda _key: self._wake.set())

    def start(self) -> None:
        """Claim what is queued now, and from then on on every wake-up or poll."""
        self._task = asyncio.create_task(self._loop(), name="queued retrieval claimer")

    async def stop(self) -> None:
        """Stop claiming (the retrievals already adopted stop with the service)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            # Cleared before the claim: a wake-up during it is not lost.
            self._wake.clear()
            try:
                await self.claim()
            except RepositoryError as exc:
                logger.warning("cannot claim queued retrievals: %s; will retry", exc)
            except Exception:
                logger.exception("claiming queued retrievals failed; will retry")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await self._wake.wait()

    async def claim(self) -> int:
        """Take over queued retrievals while slots are free and start them; how many."""
        started = 0
        while (free := self._service.free_slots) > 0:
            lease_until = utcnow() + timedelta(seconds=self._lease_s)
            claimed = await self._store.claim_queued(QUEUE_OWNER, self._owner, lease_until, free)
            for retrieval in claimed:
                account = await self._account_repo.get_any(retrieval.account_id)
                if account is None:
                    # Deleted meanwhile; the row's lease (not renewed) lets the sweep end it.
                    continue
                self._service.adopt(account, retrieval)
                started += 1
            if len(claimed) < free:
                break
        return started


def queued_claimer(
    retrievals: object,
    *,
    account_repo: AccountRepository,
    service: RetrievalService,
    notifier: Notifier,
    owner: str,
    lease_s: float | None,
) -> QueuedRetrievalClaimer | None:
    """A claimer for a store that can hand queued retrievals over (PostgreSQL); None for
    one that cannot (SQLite: one process, which runs every retrieval it stores)."""
    if not isinstance(retrievals, QueuedRetrievals):
        return None
    return QueuedRetrievalClaimer(
        store=retrievals,
        account_repo=account_repo,
        service=service,
        notifier=notifier,
        owner=owner,
        lease_s=lease_length(lease_s),
    )
