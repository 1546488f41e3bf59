"""Scheduled polling: accounts with ``poll_interval_minutes`` are retrieved by themselves.

The schedule is derived from the store (the time of each account's latest retrieval), so
a restart resumes it with no state of its own. The server's LOGIN-DELAY is a floor.
A poll that found the mailbox locked by another session (``mailbox_locked``, temporary) is
tried again sooner: after :data:`LOCKED_RETRY_S` rather than a whole poll interval. A poll
that finds the service's or its tenant's retrieval slots full waits for a later tick.

Every process sharing a store runs this schedule; each due poll starts once among them:
the trigger carries the latest retrieval this tick saw (``not_after``) and the store
inserts nothing when a newer one exists (another process polled meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from service.codes import ErrorCode
from service.domain.accounts import Account
from service.domain.time import utcnow
from service.repository.accounts import AccountRepository
from service.repository.errors import RepositoryError
from service.repository.retrievals import RetrievalRepository
from service.services.retrieval import RetrievalService

logger = logging.getLogger("mailroom.scheduler")
SECONDS_PER_MINUTE = 60
#: After ``mailbox_locked``, the next poll comes this soon (unless the interval is shorter).
LOCKED_RETRY_S = 60.0
#: ``not_after`` for an account never retrieved: any retrieval of it is newer.
NEVER = datetime(1970, 1, 1, tzinfo=UTC)


def poll_interval(account: Account) -> timedelta | None:
    minutes = account.retrieval.poll_interval_minutes
    if minutes is None:
        return None
    seconds = max(minutes * SECONDS_PER_MINUTE, account.login_delay_s or 0)
    return timedelta(seconds=seconds)


def is_due(account: Account, last: datetime | None, now: datetime, *, locked: bool = False) -> bool:
    """Whether a poll is due; ``locked``: the latest one found the mailbox locked."""
    interval = poll_interval(account)
    if interval is None:
        return False
    if locked:
        # The lock is someone else's session, usually short: retry sooner, but never
        # more often than the server's LOGIN-DELAY allows.
        floor = timedelta(seconds=account.login_delay_s or 0)
        interval = max(min(interval, timedelta(seconds=LOCKED_RETRY_S)), floor)
    return last is None or now - last >= interval


class Scheduler:
    """Checks the poll schedule every ``tick_s`` seconds and triggers due retrievals."""

    def __init__(
        self,
        accounts: AccountRepository,
        retrievals: RetrievalRepository,
        service: RetrievalService,
        *,
        tick_s: float,
    ) -> None:
        self._accounts = accounts
        self._retrievals = retrievals
        self._service = service
        self._tick_s = tick_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def tick(self) -> int:
        """Trigger every due account once; returns how many were triggered."""
        now = utcnow()
        latest = await self._retrievals.latest()
        triggered = 0
        for account in await self._accounts.list_polled():
            last = latest.get(account.id)
            locked = last is not None and last.error_code == ErrorCode.MAILBOX_LOCKED
            if is_due(account, last.created_at if last else None, now, locked=locked):
                seen = last.created_at if last else NEVER
                if await self._service.trigger_scheduled(account, not_after=seen) is not None:
                    triggered += 1
        return triggered

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except RepositoryError as exc:
                logger.error("scheduler: store failed: %s", exc)
            except Exception:
                logger.exception("scheduler tick failed")
            await asyncio.sleep(self._tick_s)
