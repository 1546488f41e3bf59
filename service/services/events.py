"""The pull feed (``GET /v1/events``) with long-polling, and the event store's retention."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import timedelta

from service.domain.events import Event
from service.domain.time import utcnow
from service.errors import FieldError, Invalid
from service.logs import log_event
from service.repository.events import EventRepository, InvalidEventCursor, subscribe_committed
from service.repository.notify import Notifier, Topic
from service.services.leases import Periodic

logger = logging.getLogger("mailroom.events")

MAX_WAIT_S = 30.0
#: While long-polling, the feed is read again this often even without a wake-up: on
#: PostgreSQL an event may become servable only when an older transaction ends.
RECHECK_S = 0.5
#: How often old events are pruned.
PRUNE_INTERVAL_S = 3600.0
#: The first pruning after a start (not at once: the start has other work).
FIRST_PRUNE_S = 30.0


class EventFeed:
    """Reads a tenant's events in commit order; waits for new ones when asked to."""

    def __init__(self, events: EventRepository, notifier: Notifier) -> None:
        self._events = events
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._unsubscribe = subscribe_committed(self._wake)
        notifier.subscribe(Topic.EVENTS, self._wake)

    def close(self) -> None:
        self._unsubscribe()

    def _wake(self, tenant: str) -> None:
        for waiter in self._waiters.get(tenant, ()):
            waiter.set()

    async def read(
        self,
        tenant: str,
        *,
        after: str | None,
        types: Sequence[str] | None,
        account_id: str | None,
        limit: int,
        wait_s: float,
    ) -> list[Event]:
        """Events after the cursor ``after``; when there are none, wait up to ``wait_s``
        seconds for some. :raises Invalid: a cursor this service did not issue."""
        deadline = time.monotonic() + min(wait_s, MAX_WAIT_S)
        waiter = asyncio.Event()
        self._waiters.setdefault(tenant, set()).add(waiter)
        try:
            while True:
                waiter.clear()
                try:
                    found = await self._events.feed(
                        tenant, after=after, types=types, account_id=account_id, limit=limit
                    )
                except InvalidEventCursor as exc:
                    raise Invalid(str(exc), errors=[FieldError("after", str(exc))]) from exc
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, RECHECK_S)):
                        await waiter.wait()
        finally:
            waiters = self._waiters.get(tenant)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[tenant]


class EventPruner:
    """Deletes events older than the retention (and finished deliveries as old)."""

    def __init__(self, events: EventRepository, *, retention_days: int) -> None:
        self._events = events
        self._retention = timedelta(days=retention_days)
        self._periodic = Periodic("event pruning", PRUNE_INTERVAL_S, self.prune)
        self._first: asyncio.Task[None] | None = None

    async def prune(self) -> int:
        removed = await self._events.prune(utcnow() - self._retention)
        if removed:
            log_event(logger, "old events pruned", removed=removed)
        return removed

    def start(self) -> None:
        """Prune soon after the start (a process restarted more often than hourly still
        prunes), then hourly."""
        self._periodic.start()
        self._first = asyncio.create_task(self._prune_soon(), name="first event pruning")

    async def _prune_soon(self) -> None:
        await asyncio.sleep(FIRST_PRUNE_S)
        try:
            await self.prune()
        except Exception as exc:  # the hourly run tries again
            logger.warning("pruning old events failed: %s", exc)

    async def stop(self) -> None:
        if self._first is not None:
            self._first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._first
        await self._periodic.stop()
