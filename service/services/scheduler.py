"""Scheduled polling: accounts with ``poll_interval_minutes`` are retrieved by themselves.

The schedule is kept in the store: each polled account's ``next_poll_at`` (indexed), so a
restart resumes it with no state of its own. It is set

- when an account is new or its poll interval changed (the store clears it, and the
  scheduler gives it a first poll at a stable offset within ``min(interval, spread_s)``
  from then: see :func:`first_poll_at`; so accounts created together, or all the accounts
  at an upgrade, do not fire in the same second);
- when a poll (or any retrieval of the account) ends: end time plus the interval, the
  server's LOGIN-DELAY a floor; after ``mailbox_locked`` (another session holds the
  mailbox, usually briefly) after :data:`LOCKED_RETRY_S` instead (never sooner than
  the LOGIN-DELAY): see :func:`next_poll_at`;
- while a poll runs, to a claim a lease away: a process that dies mid-poll leaves an
  account that falls due again when that lease ends.

Due polls start as retrieval slots free up, not once per tick: the scheduler claims due
accounts (most overdue first, as many as it has free slots, tenants at their share left
out), starts them, and waits for a slot to free (a retrieval of this process ends, or of
another one: ``Topic.RETRIEVAL_ENDED``) or for the next due time, whichever comes first,
and at most ``tick_s`` (to pick up schedules other processes changed). Claims are at
least :data:`CLAIM_GAP_S` apart unless the last one filled every slot, so polls that fall
due close together are claimed in one transaction (at most that much later).

Every process sharing a store runs this schedule; the claim is atomic (``SKIP LOCKED`` on
PostgreSQL, the single writer on SQLite), so each due poll starts once among them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from service.codes import ErrorCode
from service.domain.accounts import Account
from service.domain.time import utcnow
from service.errors import Conflict, TooManyRequests
from service.repository.accounts import AccountRepository
from service.repository.errors import RepositoryError
from service.repository.notify import Notifier, Topic

if TYPE_CHECKING:
    from service.services.retrieval import RetrievalService

logger = logging.getLogger("mailroom.scheduler")
SECONDS_PER_MINUTE = 60
#: After ``mailbox_locked``, the next poll comes this soon (unless the interval is shorter).
LOCKED_RETRY_S = 60.0
#: Before an account's first poll, at most this long (or its interval, if shorter).
POLL_SPREAD_S = 300.0
#: An account never retrieved, for the old ``not_after`` check: any retrieval is newer.
NEVER = datetime(1970, 1, 1, tzinfo=UTC)
#: New accounts given their first poll per store round trip.
SCHEDULE_BATCH = 1000
#: The least time between two claims of due polls, unless the last one left polls due
#: (a backlog): polls falling due in between are claimed together, in one transaction.
CLAIM_GAP_S = 0.5


def poll_interval(account: Account, login_delay_s: int | None = None) -> timedelta | None:
    """The time between two polls of the account (None: not polled); the server's
    LOGIN-DELAY (``login_delay_s``, else the one stored) is a floor."""
    minutes = account.retrieval.poll_interval_minutes
    if minutes is None:
        return None
    delay = account.login_delay_s if login_delay_s is None else login_delay_s
    return timedelta(seconds=max(minutes * SECONDS_PER_MINUTE, delay or 0))


def _retry_interval(account: Account, locked: bool, login_delay_s: int | None) -> timedelta | None:
    interval = poll_interval(account, login_delay_s)
    if interval is None or not locked:
        return interval
    # The lock is someone else's session, usually short: retry sooner, but never more often
    # than the server's LOGIN-DELAY allows.
    delay = account.login_delay_s if login_delay_s is None else login_delay_s
    floor = timedelta(seconds=delay or 0)
    return max(min(interval, timedelta(seconds=LOCKED_RETRY_S)), floor)


def is_due(account: Account, last: datetime | None, now: datetime, *, locked: bool = False) -> bool:
    """Whether a poll is due ``now`` after one at ``last``; ``locked``: that one found the
    mailbox locked."""
    interval = _retry_interval(account, locked, None)
    if interval is None:
        return False
    return last is None or now - last >= interval


def next_poll_at(
    account: Account,
    ended_at: datetime,
    error_code: str | None,
    *,
    login_delay_s: int | None = None,
) -> datetime | None:
    """When the poll after one that ended at ``ended_at`` is due (None: not polled).
    ``login_delay_s``: the LOGIN-DELAY the server announced in that session, if any."""
    interval = _retry_interval(account, error_code == ErrorCode.MAILBOX_LOCKED, login_delay_s)
    return None if interval is None else ended_at + interval


def spread_fraction(account_id: str) -> float:
    """A stable number in [0, 1) for the account: where in the spread its polls fall."""
    digest = hashlib.blake2b(account_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def first_poll_at(account: Account, now: datetime, spread_s: float) -> datetime | None:
    """The first poll of an account scheduled ``now``: at its stable offset within
    ``min(interval, spread_s)``, so many accounts scheduled at once spread out."""
    interval = poll_interval(account)
    if interval is None:
        return None
    window = min(interval.total_seconds(), spread_s)
    return now + timedelta(seconds=spread_fraction(account.id) * window)


class Scheduler:
    """Starts due polls as retrieval slots free up; sleeps until the next one otherwise."""

    def __init__(
        self,
        accounts: AccountRepository,
        service: RetrievalService,
        *,
        tick_s: float,
        lease_s: float,
        spread_s: float = POLL_SPREAD_S,
        notifier: Notifier | None = None,
    ) -> None:
        """``tick_s``: the longest sleep without a wake-up. ``lease_s``: how long a claimed
        account waits, should this process die before the poll ends. ``notifier``: wakes
        on the end of another process's retrieval (subscribe before it starts)."""
        self._accounts = accounts
        self._service = service
        self._tick_s = tick_s
        self._lease_s = lease_s
        self._spread_s = spread_s
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Tenants whose share the store said was full (other processes' retrievals): left
        # out of claims until a retrieval ends somewhere.
        self._refused: set[str] = set()
        # The earliest due time as last read (``_due_known``: still valid), which saves a
        # read per wake-up: only this process's polls and new accounts change it sooner
        # than ``tick_s``, and both make it unknown.
        self._next_due: datetime | None = None
        self._due_known = False
        # When the last claim was made (loop time), and whether it left polls due.
        self._last_claim = float("-inf")
        self._backlog = False
        service.on_slot_free(self._slot_freed)
        if notifier is not None:
            notifier.subscribe(Topic.RETRIEVAL_ENDED, self._ended_elsewhere)

    def _slot_freed(self, next_poll_at: datetime | None) -> None:
        # The poll that ended set its account's next poll: the earliest due is that one
        # if it is sooner (no read needed; an end the store could not record leaves an
        # earlier time known than stored, which costs one claim that finds nothing).
        if self._due_known and next_poll_at is not None:
            if self._next_due is None or next_poll_at < self._next_due:
                self._next_due = next_poll_at
        self._refused.clear()
        self._wake.set()

    def _ended_elsewhere(self, _retrieval_id: str) -> None:
        # Only a tenant's share, counted across processes, frees with another's end.
        if self._refused:
            self._refused.clear()
            self._wake.set()

    async def _earliest_due(self) -> datetime | None:
        if not self._due_known:
            self._next_due = await self._accounts.next_poll_due()
            self._due_known = True
        return self._next_due

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def schedule_new(self, now: datetime | None = None) -> int:
        """Give the polled accounts that have no next poll their first one (spread)."""
        scheduled = 0
        while True:
            at = now or utcnow()
            accounts = await self._accounts.unscheduled(SCHEDULE_BATCH)
            polls = [
                (a.id, first)
                for a in accounts
                if (first := first_poll_at(a, at, self._spread_s)) is not None
            ]
            await self._accounts.schedule_polls(polls, unscheduled_only=True)
            scheduled += len(polls)
            if len(accounts) < SCHEDULE_BATCH:
                return scheduled

    async def tick(self) -> int:
        """Schedule new accounts, then start due polls while slots are free; returns
        how many were started."""
        await self.schedule_new()
        return await self.start_due()

    async def start_due(self) -> int:
        """Start due polls while slots are free; returns how many were started."""
        started = 0
        if self._service.free_slots <= 0:
            return 0
        # Looked for on the reader first: most wake-ups find nothing due yet, and then
        # take no write lock.
        due = await self._earliest_due()
        if due is None or due > utcnow():
            return 0
        if not self._backlog and self._claim_wait_s() > 0:
            return 0  # claimed a moment ago: what falls due meanwhile goes in the next claim
        self._due_known = False  # to be read again after the claims
        self._last_claim = asyncio.get_running_loop().time()
        self._backlog = False
        while (free := self._service.free_slots) > 0:
            now = utcnow()
            skip = self._service.full_tenants() | self._refused
            claimed = await self._accounts.claim_due_polls(
                now, now + timedelta(seconds=self._lease_s), free, skip_tenants=skip
            )
            for index, (account, due) in enumerate(claimed):
                if account.tenant in self._refused:
                    await self._release(account, due)
                    continue
                if self._service.free_slots <= 0:
                    # An API trigger took a slot meanwhile: the rest wait for the next one.
                    for later, later_due in claimed[index:]:
                        await self._release(later, later_due)
                    return started
                if await self._start(account, due):
                    started += 1
            if len(claimed) < free:
                break
        else:
            self._backlog = True  # every slot taken: more may be due
        return started

    def _claim_wait_s(self) -> float:
        return self._last_claim + CLAIM_GAP_S - asyncio.get_running_loop().time()

    async def _release(self, account: Account, due: datetime) -> None:
        """Give a claimed account back, due as it was."""
        await self._accounts.schedule_polls([(account.id, due)])

    async def _start(self, account: Account, due: datetime) -> bool:
        try:
            await self._service.poll(account)
        except TooManyRequests:
            # The tenant's share is full across processes: back to due, and its other
            # accounts are left out until a retrieval ends.
            self._refused.add(account.tenant)
            await self._release(account, due)
            return False
        except Conflict:
            # A retrieval of the account runs already: its end sets the next poll (and if
            # its process dies, the claim's lease makes the account due again).
            return False
        except RepositoryError as exc:
            # This one could not start (its account just deleted, a full disk): the
            # claim's lease makes it due again; the rest of the batch goes on.
            logger.warning("scheduled poll of %s not started: %s", account.id, exc)
            return False
        return True

    async def _sleep_s(self) -> float:
        """How long to wait for a wake-up: until the next due poll, at most ``tick_s``;
        polls due now wait for a slot (a wake-up) unless slots are free."""
        if self._service.free_slots <= 0:
            return self._tick_s  # woken when a slot frees
        due = await self._earliest_due()
        if due is None:
            return self._tick_s
        left = (due - utcnow()).total_seconds()
        if left <= 0:
            wait = self._claim_wait_s()
            if wait > 0:
                return wait  # the next claim's turn
            # Due polls wait: for a slot, or for a refused tenant's share.
            return self._tick_s
        return min(max(left, self._claim_wait_s()), self._tick_s)

    async def _loop(self) -> None:
        # New accounts are looked for at start and every ``tick_s``, not at every
        # retrieval's end.
        loop = asyncio.get_running_loop()
        next_look = loop.time()
        while True:
            # Cleared before the tick: a retrieval that ends during it is not missed.
            self._wake.clear()
            delay = self._tick_s
            try:
                if loop.time() >= next_look:
                    next_look = loop.time() + self._tick_s
                    self._refused.clear()
                    self._due_known = False
                    await self.schedule_new()
                await self.start_due()
                delay = await self._sleep_s()
            except RepositoryError as exc:
                logger.error("scheduler: store failed: %s", exc)
            except Exception:
                logger.exception("scheduler tick failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, max(0.0, next_look - loop.time()))):
                    await self._wake.wait()
