"""Scheduled polling: accounts with ``poll_interval_minutes`` are retrieved by themselves.

The schedule is derived from the store (the time of each account's latest retrieval), so
a restart resumes it with no state of its own. The server's LOGIN-DELAY is a floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from service.domain.accounts import Account
from service.domain.time import utcnow
from service.repository.accounts import AccountRepository
from service.repository.errors import RepositoryError
from service.repository.retrievals import RetrievalRepository
from service.services.retrieval import RetrievalService

logger = logging.getLogger("mailroom.scheduler")
SECONDS_PER_MINUTE = 60


def poll_interval(account: Account) -> timedelta | None:
    minutes = account.retrieval.poll_interval_minutes
    if minutes is None:
        return None
    seconds = max(minutes * SECONDS_PER_MINUTE, account.login_delay_s or 0)
    return timedelta(seconds=seconds)


def is_due(account: Account, last: datetime | None, now: datetime) -> bool:
    interval = poll_interval(account)
    if interval is None:
        return False
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
        last = await self._retrievals.last_created()
        triggered = 0
        for account in await self._accounts.list_polled():
            if is_due(account, last.get(account.id), now):
                if await self._service.trigger_scheduled(account) is not None:
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
