"""Retrieval: one POP3 session that brings an account's new mail into the store.

Rules (DESIGN.md, "no mail is ever lost"):
- a message is DELEted only after it and its UIDL are committed (``synchronous=FULL``);
  deletions take effect at QUIT, so a dropped session deletes nothing;
- messages already known by UIDL are not downloaded again; UIDLs gone from the server are
  forgotten;
- messages over the account's cap are recorded as skipped and never deleted.

Runs in background tasks owned by ``RetrievalService`` (started and stopped in the app's
lifespan); never two at once for one account, whichever process runs it (a unique index in
the store enforces it).

Several processes may share one store. A retrieval is held by the process that runs it (its
``owner`` id) under a lease its heartbeat renews (``service.services.leases``); a process
that dies leaves a lease that expires, and whichever process sweeps first (every half
lease; a SQLite process also at start, for every active row: it is the only process of its
file) ends the retrieval ``interrupted``. Nothing is lost: what was committed stays, and
nothing was deleted that was not. A tenant's share of retrieval slots is counted in the
store, across processes (best effort: two processes may each take the last slot at the
same moment); the global ``max_concurrent`` is per process. A cancel that reaches a process
other than the one running the retrieval is passed on through the store's notifier.

Limits: a whole session has a deadline (``retrieval_timeout_s``) and a minimum transfer
rate, both enforced by the POP3 client while it waits for the server (so never in the
middle of a commit); a tenant holds at most its share of the retrieval slots. A caller may
cancel a retrieval: it stops at the next network step (the connection is dropped without
QUIT, so nothing of that session is deleted) after committing what it downloaded.
A retrieval whose end cannot be recorded (a full disk) is over all the same: its slot is
free, its end is recorded again in the background, and the next trigger for the account
records it first instead of answering 409.

A scheduled poll on a store with one process (SQLite, ``exclusive``) is stored when it
ends, with its outcome, in one transaction, unless it finds work first, or runs longer
than :data:`STORE_RUNNING_AFTER_S`: then it is stored as running before anything is
downloaded or deleted (and before an API trigger for its account is answered 409). So a
poll that finds nothing new costs one write, and every poll has its record in
``GET .../retrievals`` once it has ended; what is not stored is the running row of an empty
poll during its first second, and so the ``interrupted`` record of one cut short by a crash
within it (nothing was stored or deleted in it; its account's claim expires and it is
polled again). One retrieval per account still holds: this process runs them all and
checks its own slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from enum import StrEnum

import msgspec

from service.codes import ErrorCode
from service.config import MIN_RATE_WINDOW_S
from service.domain.accounts import Account
from service.domain.enums import RetrievalStatus, RetrievalTrigger
from service.domain.ids import new_id
from service.domain.retrievals import (
    MessageSummary,
    NewMessage,
    Retrieval,
    RetrievalError,
    RetrievalProgress,
)
from service.domain.threads import thread_id_for
from service.domain.time import utcnow
from service.errors import Conflict, NotFound, TooManyRequests
from service.logs import log_event
from service.mail.parse import summarize
from service.pop3.client import POP3Client
from service.pop3.errors import MessageTooLarge, POP3Error, POP3TimeoutError
from service.repository.accounts import AccountRepository
from service.repository.errors import DuplicateError, RepositoryError
from service.repository.messages import MessageRepository
from service.repository.notify import Notifier, Topic
from service.repository.pages import Page
from service.repository.retrievals import RetrievalRepository
from service.services.accounts import AccountService
from service.services.connect import ConnectFailure, MailConnector
from service.services.leases import RENEWALS_PER_LEASE, SWEEPS_PER_LEASE, Periodic, lease_length
from service.services.oauth import OAuthRefreshFailed
from service.services.scheduler import next_poll_at

logger = logging.getLogger("mailroom.retrieval")

# One commit (one fsync) per this many messages or bytes, whichever comes first: cheap at
# 2,000 small messages, bounded in memory for large ones.
BATCH_MESSAGES = 500
BATCH_BYTES = 8 * 1024 * 1024
#: Known UIDLs the server no longer lists are forgotten after the retrieval has ended, this
#: many per (short) transaction: an account that knew 100,000 does not make its retrieval
#: wait for them, nor hold the store's writer for long.
FORGET_BATCH = 5000
#: Messages handed to the parsing thread at a time: small enough that parsing keeps up
#: with the download, large enough that the hand-over costs little.
PARSE_CHUNK = 50
SECONDS_PER_DAY = 86_400
#: A scheduled poll not stored yet (see the module's docstring) is stored as running once
#: it has run this long: an empty poll takes milliseconds, a slow server shows in the API.
STORE_RUNNING_AFTER_S = 1.0
#: How long a cancel request waits for the retrieval to stop before answering anyway.
CANCEL_WAIT_S = 30.0
#: How often a cancel passed on to another process looks whether the retrieval ended.
CANCEL_POLL_S = 0.25
#: Pauses between attempts to record the end of a retrieval when the store refused it
#: (a full disk); the last one repeats until it is recorded or the service stops.
FINISH_RETRY_DELAYS_S = (1.0, 2.0, 5.0, 15.0, 30.0, 60.0)
ACTIVE_STATUSES = (RetrievalStatus.QUEUED, RetrievalStatus.RUNNING)
#: The longest a caller may wait for a retrieval to end (``GET ...?wait=``), in seconds:
#: below common proxy and load-balancer idle timeouts.
MAX_WAIT_S = 60
#: How often a waiting caller re-reads the retrieval anyway (a wake-up is only a hint: one
#: lost between processes costs this much, nothing more).
WAIT_POLL_S = 1.0

RetrievalObserver = Callable[[Retrieval], Awaitable[None]]


class _Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """How a retrieval ended, kept until the store has recorded it."""

    status: RetrievalStatus
    finished_at: datetime
    progress: RetrievalProgress
    error: RetrievalError | None
    tenant: str | None = None  # whose slot it held (counted until the end is recorded)
    account_id: str | None = None
    next_poll_at: datetime | None = None  # the account's next scheduled poll, if polled


class _Unstored:
    """A scheduled poll not in the store yet: stored at its end, or as running once it
    finds work (whichever comes first, under ``lock``)."""

    __slots__ = ("lock", "retrieval", "tenant", "timer")

    def __init__(self, retrieval: Retrieval, tenant: str) -> None:
        self.retrieval = retrieval
        self.tenant = tenant
        self.lock = asyncio.Lock()
        self.timer: asyncio.TimerHandle | None = None  # stores it as running when it fires


class _Slot:
    """A retrieval slot held by one tenant: reserved at trigger, freed when its task ends."""

    __slots__ = ("account_id", "inserted", "next_poll_at", "run", "task", "tenant")

    def __init__(self, tenant: str, account_id: str) -> None:
        self.tenant = tenant
        self.account_id = account_id
        self.task: asyncio.Task[None] | None = None
        self.run: _Run | None = None
        # Its row may be in the store (set just before the insert): counted there, and
        # its lease renewed.
        self.inserted = False
        # When its account's next poll is due, as its end set it (told to slot watchers).
        self.next_poll_at: datetime | None = None


class _Cancelled(Exception):
    """Raised at a checkpoint of a run a caller has cancelled."""


class RetrievalService:
    """Triggers retrievals, runs them in the background and answers queries about them."""

    def __init__(
        self,
        *,
        accounts: AccountService,
        account_repo: AccountRepository,
        retrievals: RetrievalRepository,
        messages: MessageRepository,
        connector: MailConnector,
        max_message_bytes: int,
        max_concurrent: int,
        max_per_tenant: int | None = None,
        session_timeout_s: float | None = None,
        min_transfer_rate: int = 0,
        rate_window_s: float = MIN_RATE_WINDOW_S,
        on_finished: RetrievalObserver | None = None,
        owner: str,
        lease_s: float | None = None,
        exclusive: bool = False,
        notifier: Notifier | None = None,
    ) -> None:
        """``owner``: this process's id, on every retrieval it runs. ``lease_s``: how long
        a retrieval is held unless renewed (default ``leases.LEASE_S``). ``exclusive``: the
        only process on its store (SQLite), so at start every active retrieval is ended,
        whatever its lease, and an active row no task of this process runs is an orphan.
        ``notifier``: cancels passed on between processes."""
        self._owner = owner
        self._lease_s = lease_length(lease_s)
        self._exclusive = exclusive
        self._notifier = notifier
        self._accounts = accounts
        self._account_repo = account_repo
        self._retrievals = retrievals
        self._messages = messages
        self._connector = connector
        self._max_message_bytes = max_message_bytes
        self._max_concurrent = max_concurrent
        self._max_per_tenant = max_per_tenant or max_concurrent
        self._session_timeout_s = session_timeout_s
        self._min_transfer_rate = min_transfer_rate
        self._rate_window_s = rate_window_s
        self._on_finished = on_finished
        self._tasks: set[asyncio.Task[None]] = set()
        # Retrieval id -> the slot of a retrieval this process runs (or is starting).
        self._slots: dict[str, _Slot] = {}
        # Retrieval id -> an end the store has not recorded yet (retried in the background).
        self._unrecorded: dict[str, _Outcome] = {}
        # Retrieval id -> a scheduled poll not stored yet (``exclusive`` stores only).
        self._unstored: dict[str, _Unstored] = {}
        self._recorders: set[asyncio.Task[None]] = set()
        self._forgetters: set[asyncio.Task[None]] = set()
        self._stopping = False
        # Called whenever a slot frees (the scheduler starts the next due poll at once),
        # with the next poll its retrieval set (if any).
        self._slot_watchers: list[Callable[[datetime | None], None]] = []
        # Called with the account id right after each batch of its messages commits (the
        # bounce service links the DSNs among them); must not raise.
        self.after_batch: Callable[[str], Awaitable[None]] | None = None
        # Retrieval id -> the event its long-polling callers wait on, and how many they are.
        self._waiters: dict[str, tuple[asyncio.Event, int]] = {}
        # Header parsing runs here, off the event loop, while the next messages download.
        # One thread: chunks are summarized in the order they arrive, so message ids
        # (time-ordered) follow the server's order.
        self._parser = ThreadPoolExecutor(1, thread_name_prefix="mailroom-parse")
        self._heartbeat = Periodic(
            "retrieval lease renewal", self._lease_s / RENEWALS_PER_LEASE, self._renew
        )
        self._sweep = Periodic(
            "retrieval lease sweep", self._lease_s / SWEEPS_PER_LEASE, self._interrupt_expired
        )
        if notifier is not None:
            notifier.subscribe(Topic.RETRIEVAL_CANCEL, self._cancel_requested)
            notifier.subscribe(Topic.RETRIEVAL_ENDED, self._wake)

    async def start(self) -> None:
        """Close out retrievals a stopped process left running; renew this process's
        leases and sweep for expired ones from now on."""
        # Started first: triggers may come before this recovery succeeds (a full disk).
        self._heartbeat.start()
        self._sweep.start()
        await self._interrupt_expired(everything=self._exclusive)

    async def _interrupt_expired(self, *, everything: bool = False) -> None:
        count = await self._retrievals.interrupt_expired(
            utcnow(), everything=everything, keep=list(self._slots)
        )
        if count:
            logger.warning(
                "marked %d retrieval(s) of a stopped process as failed (interrupted)", count
            )

    def _lease_until(self) -> datetime:
        return utcnow() + timedelta(seconds=self._lease_s)

    async def _renew(self) -> None:
        """Renew the leases of the retrievals this process runs (or has ended without its
        end recorded yet: no other process should end them meanwhile)."""
        held = {i for i, slot in self._slots.items() if slot.inserted} | set(self._unrecorded)
        if held:
            await self._retrievals.renew(self._owner, held, self._lease_until())

    async def stop(self) -> None:
        """Cancel running retrievals: their sessions close without QUIT (nothing deleted).

        Ends not yet recorded stay unrecorded: the next start fails them as interrupted.
        """
        self._stopping = True
        await self._sweep.stop()
        for recorder in [*self._recorders, *self._forgetters]:
            recorder.cancel()
        await asyncio.gather(*self._recorders, *self._forgetters, return_exceptions=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._parser.shutdown(wait=False)
        await self._heartbeat.stop()

    async def trigger(
        self, tenant: str, account_id: str, trigger: RetrievalTrigger = RetrievalTrigger.API
    ) -> Retrieval:
        """Create a queued retrieval and start it; 409 if one is active for the account."""
        account = await self._accounts.get(tenant, account_id)
        retrieval = await self._trigger(account, trigger)
        if retrieval is None:  # only a scheduled trigger (``not_after``) is ever skipped
            raise Conflict(
                "a retrieval was just made for this account", code=ErrorCode.RETRIEVAL_RUNNING
            )
        return retrieval

    async def poll(self, account: Account) -> Retrieval:
        """The scheduler's trigger for an account it claimed: started as running at once
        (no caller sees it queued, so no separate write marks its start). Raises
        ``Conflict`` (one is active) and ``TooManyRequests`` (no slot, or the tenant's
        share is full) like :meth:`trigger`."""
        retrieval = await self._trigger(account, RetrievalTrigger.SCHEDULE, running=True)
        assert retrieval is not None  # skipped only with ``not_after``
        return retrieval

    def on_slot_free(self, callback: Callable[[datetime | None], None]) -> None:
        """Call ``callback(next_poll_at)`` each time a retrieval slot of this process
        frees: when the ended retrieval's account is due next (None: not set)."""
        self._slot_watchers.append(callback)

    def _free(self, retrieval_id: str) -> None:
        slot = self._slots.pop(retrieval_id, None)
        next_at = slot.next_poll_at if slot is not None else None
        for watcher in self._slot_watchers:
            watcher(next_at)

    def full_tenants(self) -> set[str]:
        """Tenants holding their whole share of this process's slots."""
        held: dict[str, int] = {}
        for slot in self._slots.values():
            held[slot.tenant] = held.get(slot.tenant, 0) + 1
        return {tenant for tenant, count in held.items() if count >= self._max_per_tenant}

    async def trigger_scheduled(
        self, account: Account, *, not_after: datetime | None = None
    ) -> Retrieval | None:
        """The scheduler's trigger: silently skipped when busy, and when a retrieval of
        the account was created after ``not_after`` (another process polled it)."""
        try:
            return await self._trigger(account, RetrievalTrigger.SCHEDULE, not_after=not_after)
        except (Conflict, TooManyRequests):
            return None

    def _too_many_for_tenant(self, held: int) -> TooManyRequests:
        return TooManyRequests(
            f"this tenant already runs {held} retrievals, its share of the"
            f" {self._max_concurrent} retrieval slots; try again when one ends",
            code=ErrorCode.TOO_MANY_RETRIEVALS,
        )

    async def _trigger(
        self,
        account: Account,
        trigger: RetrievalTrigger,
        *,
        not_after: datetime | None = None,
        running: bool = False,
    ) -> Retrieval | None:
        held = sum(1 for slot in self._slots.values() if slot.tenant == account.tenant)
        # A scheduled poll on the only process of its store is stored when it ends (or
        # finds work): this process's slots are the whole truth about what runs.
        unstored = running and self._exclusive
        if unstored and any(slot.account_id == account.id for slot in self._slots.values()):
            raise Conflict(
                "a retrieval is already running for this account",
                code=ErrorCode.RETRIEVAL_RUNNING,
            )
        if held >= self._max_per_tenant:
            raise self._too_many_for_tenant(held)
        if len(self._slots) >= self._max_concurrent:
            raise TooManyRequests(
                f"all {self._max_concurrent} retrieval slots are in use; try again shortly",
                code=ErrorCode.TOO_MANY_RETRIEVALS,
            )
        now = utcnow()
        retrieval = Retrieval(
            id=new_id("ret"),
            account_id=account.id,
            trigger=trigger,
            status=RetrievalStatus.RUNNING if running else RetrievalStatus.QUEUED,
            created_at=now,
            started_at=now if running else None,
        )
        # Held from now, so concurrent triggers cannot overrun the limits while this one
        # waits for the store.
        slot = self._slots[retrieval.id] = _Slot(account.tenant, account.id)
        if unstored:
            waiting = self._unstored[retrieval.id] = _Unstored(retrieval, account.tenant)
            waiting.timer = asyncio.get_running_loop().call_later(
                STORE_RUNNING_AFTER_S, self._store_running_later, retrieval.id
            )
        else:
            try:
                if self._exclusive:
                    # A poll of the account not stored yet is stored first: this trigger
                    # then answers 409 with its id, as for any running retrieval.
                    await self._store_unstored(account.id)
                await self._check_tenant_share(account.tenant)
                slot.inserted = True
                if not await self._add(retrieval, not_after=not_after):
                    del self._slots[retrieval.id]
                    return None
            except BaseException:
                self._slots.pop(retrieval.id, None)
                raise
        run = slot.run = _Run(self, account, retrieval)
        task = asyncio.create_task(self._run(run), name=f"retrieval {retrieval.id}")
        slot.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._free(retrieval.id))
        return retrieval

    async def _store_unstored(self, account_id: str) -> None:
        """Store as running the scheduled polls of the account not stored yet."""
        for retrieval_id in [i for i, slot in self._slots.items() if slot.account_id == account_id]:
            await self.store_running(retrieval_id)

    async def store_running(self, retrieval_id: str) -> None:
        """Store a scheduled poll of this process as running, if it is not stored yet (it
        found work, or an API trigger asks for its account); at once if it is."""
        unstored = self._unstored.get(retrieval_id)
        if unstored is None:
            return
        async with unstored.lock:
            if retrieval_id not in self._unstored:
                return  # stored meanwhile (as running, or with its end)
            slot = self._slots.get(retrieval_id)
            if slot is not None:
                slot.inserted = True
            await self._add(unstored.retrieval)
            self._forget_unstored(retrieval_id)

    def _forget_unstored(self, retrieval_id: str) -> None:
        unstored = self._unstored.pop(retrieval_id)
        if unstored.timer is not None:
            unstored.timer.cancel()

    def _store_running_later(self, retrieval_id: str) -> None:
        """The poll has run :data:`STORE_RUNNING_AFTER_S`: store it as running."""
        if retrieval_id not in self._unstored or self._stopping:
            return

        async def store() -> None:
            try:
                await self.store_running(retrieval_id)
            except (RepositoryError, Conflict) as exc:  # stored with its end instead
                logger.warning("retrieval %s: not stored as running: %s", retrieval_id, exc)

        task = asyncio.create_task(store(), name=f"store running {retrieval_id}")
        self._recorders.add(task)
        task.add_done_callback(self._recorders.discard)

    @property
    def free_slots(self) -> int:
        """How many more retrievals this process may run now."""
        return max(0, self._max_concurrent - len(self._slots))

    def adopt(self, account: Account, retrieval: Retrieval) -> None:
        """Run a queued retrieval this process has claimed from the store (an API-only
        process stored it); its row is already held under this process's lease."""
        slot = self._slots[retrieval.id] = _Slot(account.tenant, account.id)
        slot.inserted = True
        run = slot.run = _Run(self, account, retrieval)
        task = asyncio.create_task(self._run(run), name=f"retrieval {retrieval.id}")
        slot.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._free(retrieval.id))

    async def _check_tenant_share(self, tenant: str) -> None:
        """The tenant's share counted across processes: its active retrievals in the store
        that are not this process's, plus the slots this process holds for it (which
        include the one being reserved). The only process of its store (``exclusive``)
        holds every active retrieval there is, and has counted them already."""
        if self._exclusive:
            return
        stored = await self._retrievals.count_active_for_tenant(tenant)
        mine = [slot for slot in self._slots.values() if slot.tenant == tenant]
        unrecorded = sum(1 for o in self._unrecorded.values() if o.tenant == tenant)
        others = max(0, stored - sum(1 for slot in mine if slot.inserted) - unrecorded)
        if others + len(mine) > self._max_per_tenant:
            raise self._too_many_for_tenant(others + len(mine) - 1)

    async def _add(self, retrieval: Retrieval, *, not_after: datetime | None = None) -> bool:
        """Insert the row (False: a newer retrieval made a scheduled one pointless); an
        active row that no process runs any more is ended first."""
        try:
            return await self._retrievals.add(
                retrieval, owner=self._owner, lease_until=self._lease_until(), not_after=not_after
            )
        except DuplicateError:
            active = await self._retrievals.active(retrieval.account_id)
            if active is None or active.id in self._slots:
                raise Conflict(
                    "a retrieval is already running for this account",
                    code=ErrorCode.RETRIEVAL_RUNNING,
                    resource_id=active.id if active else None,
                ) from None
        if self._exclusive or active.id in self._unrecorded:
            # Its task is gone (its end could not be recorded): record that end now.
            await self._record_orphan(active)
        else:
            # Another process may be running it: ended only if its lease has expired.
            await self._interrupt_expired()
        try:
            return await self._retrievals.add(
                retrieval, owner=self._owner, lease_until=self._lease_until(), not_after=not_after
            )
        except DuplicateError:
            raise Conflict(
                "a retrieval is already running for this account",
                code=ErrorCode.RETRIEVAL_RUNNING,
                resource_id=active.id,
            ) from None

    async def _record_orphan(self, active: Retrieval, *, cancelled: bool = False) -> Retrieval:
        """End an active row that no task of this process runs; return it as ended."""
        outcome = self._unrecorded.get(active.id)
        if outcome is None:
            status, code, detail = (
                (RetrievalStatus.CANCELLED, ErrorCode.CANCELLED, "cancelled by a caller")
                if cancelled
                else (
                    RetrievalStatus.FAILED,
                    ErrorCode.INTERRUPTED,
                    "no task was running this retrieval any more",
                )
            )
            outcome = _Outcome(
                status=status,
                finished_at=utcnow(),
                progress=active.progress(),
                error=RetrievalError(code, f"{detail}; nothing was deleted that was not stored"),
            )
        await self._record(active.id, outcome)
        logger.warning("retrieval %s: its end is recorded now (%s)", active.id, outcome.status)
        return _ended(active, outcome)

    async def _record(self, retrieval_id: str, outcome: _Outcome) -> None:
        if not await self._record_unstored(retrieval_id, outcome):
            await self._retrievals.finish(
                retrieval_id,
                outcome.status,
                outcome.finished_at,
                outcome.progress,
                outcome.error,
                next_poll_at=outcome.next_poll_at,
                tenant=outcome.tenant,
                account_id=outcome.account_id,
            )
        self._unrecorded.pop(retrieval_id, None)
        self._announce_end(retrieval_id)

    async def _record_unstored(self, retrieval_id: str, outcome: _Outcome) -> bool:
        """Store a poll that was never stored, with its end, in one transaction; False
        when it is in the store already."""
        unstored = self._unstored.get(retrieval_id)
        if unstored is None:
            return False
        async with unstored.lock:
            if retrieval_id not in self._unstored:
                return False  # stored as running meanwhile
            await self._retrievals.add_ended(
                _ended(unstored.retrieval, outcome),
                tenant=unstored.tenant,
                next_poll_at=outcome.next_poll_at,
            )
            self._forget_unstored(retrieval_id)
        return True

    async def cancel(self, tenant: str, account_id: str, retrieval_id: str) -> Retrieval:
        """Stop a retrieval at its next safe point and return it as it ended.

        409 ``retrieval_finished`` if it had already ended. Waits for it to stop at most
        :data:`CANCEL_WAIT_S` (then answers with its state at that moment).
        """
        retrieval = await self.get(tenant, account_id, retrieval_id)
        slot = self._slots.get(retrieval_id)
        if slot is None or slot.task is None:
            if retrieval.status not in ACTIVE_STATUSES:
                raise Conflict(
                    f"the retrieval has already ended ({retrieval.status.value})",
                    code=ErrorCode.RETRIEVAL_FINISHED,
                    resource_id=retrieval_id,
                )
            if retrieval_id in self._unrecorded:
                # It ended before the cancel; only the store does not know it yet.
                await self._record_orphan(retrieval)
                raise Conflict(
                    "the retrieval had already ended",
                    code=ErrorCode.RETRIEVAL_FINISHED,
                    resource_id=retrieval_id,
                )
            if self._exclusive:
                return await self._record_orphan(retrieval, cancelled=True)
            return await self._cancel_elsewhere(tenant, account_id, retrieval)
        log_event(
            logger,
            "retrieval cancel requested",
            tenant=tenant,
            account_id=account_id,
            retrieval_id=retrieval_id,
        )
        if slot.run is not None:
            slot.run.request_cancel(slot.task)
        await asyncio.wait({slot.task}, timeout=CANCEL_WAIT_S)
        return await self.get(tenant, account_id, retrieval_id)

    async def _cancel_elsewhere(
        self, tenant: str, account_id: str, retrieval: Retrieval
    ) -> Retrieval:
        """Cancel a retrieval another process runs: ended here if that process is gone
        (its lease expired), else passed on to it; wait for the end as for a local one."""
        await self._interrupt_expired()
        current = await self.get(tenant, account_id, retrieval.id)
        if current.status not in ACTIVE_STATUSES or self._notifier is None:
            return current
        log_event(
            logger,
            "retrieval cancel requested",
            tenant=tenant,
            account_id=account_id,
            retrieval_id=retrieval.id,
            passed_on=True,
        )
        self._notifier.publish(Topic.RETRIEVAL_CANCEL, retrieval.id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                while current.status in ACTIVE_STATUSES:
                    await asyncio.sleep(CANCEL_POLL_S)
                    current = await self.get(tenant, account_id, retrieval.id)
        return current

    def _cancel_requested(self, retrieval_id: str) -> None:
        """Another process passed on a cancel: stop the retrieval if this one runs it."""
        slot = self._slots.get(retrieval_id)
        if slot is not None and slot.task is not None and slot.run is not None:
            slot.run.request_cancel(slot.task)

    def _announce_end(self, retrieval_id: str) -> None:
        """Wake the callers waiting for this retrieval, in every process."""
        if self._notifier is not None:
            self._notifier.publish(Topic.RETRIEVAL_ENDED, retrieval_id)
        else:
            self._wake(retrieval_id)

    def _wake(self, retrieval_id: str) -> None:
        waiting = self._waiters.get(retrieval_id)
        if waiting is not None:
            waiting[0].set()

    async def wait(
        self, tenant: str, account_id: str, retrieval_id: str, timeout_s: float
    ) -> Retrieval:
        """The retrieval once it has ended, or as it is when ``timeout_s`` has passed.

        Woken by the end of the retrieval (in this process, or in another through the
        notifier), and re-read every :data:`WAIT_POLL_S` in case a wake-up was lost.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(timeout_s, MAX_WAIT_S)
        # Registered before the first read, so an end between the read and the wait wakes it.
        event, count = self._waiters.get(retrieval_id, (asyncio.Event(), 0))
        self._waiters[retrieval_id] = (event, count + 1)
        try:
            current = await self.get(tenant, account_id, retrieval_id)
            while current.status in ACTIVE_STATUSES:
                left = deadline - loop.time()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, WAIT_POLL_S)):
                        await event.wait()
                current = await self.get(tenant, account_id, retrieval_id)
            return current
        finally:
            event, count = self._waiters[retrieval_id]
            if count > 1:
                self._waiters[retrieval_id] = (event, count - 1)
            else:
                del self._waiters[retrieval_id]

    async def get(self, tenant: str, account_id: str, retrieval_id: str) -> Retrieval:
        await self._accounts.get(tenant, account_id)
        retrieval = await self._retrievals.get(account_id, retrieval_id)
        if retrieval is None:
            raise NotFound(f"no retrieval {retrieval_id!r}")
        return self._as_known(retrieval)

    async def page(
        self, tenant: str, account_id: str, *, after: str | None, limit: int
    ) -> Page[Retrieval]:
        await self._accounts.get(tenant, account_id)
        page = await self._retrievals.page(account_id, after=after, limit=limit)
        return Page([self._as_known(r) for r in page.items], page.next_after)

    def _as_known(self, retrieval: Retrieval) -> Retrieval:
        """The stored retrieval, or how it ended if the store could not record that yet."""
        outcome = self._unrecorded.get(retrieval.id)
        if outcome is None or retrieval.status not in ACTIVE_STATUSES:
            return retrieval
        return _ended(retrieval, outcome)

    @property
    def running(self) -> int:
        """How many retrieval slots are held (queued or running in this process)."""
        return len(self._slots)

    async def wait_idle(self) -> None:
        """Wait for every running retrieval (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run(self, run: _Run) -> None:
        retrieval = run.retrieval
        status, error = RetrievalStatus.SUCCEEDED, None
        try:
            if retrieval.started_at is None:  # stored as queued: mark its start
                started_at = utcnow()
                await self._retrievals.start(retrieval.id, started_at)
                run.retrieval = msgspec.structs.replace(
                    retrieval, status=RetrievalStatus.RUNNING, started_at=started_at
                )
            await run.execute()
        except asyncio.CancelledError:
            if not run.cancel_requested or self._stopping:
                status = RetrievalStatus.FAILED
                error = RetrievalError(
                    ErrorCode.INTERRUPTED, "the service stopped during this retrieval"
                )
                await asyncio.shield(self._finish(run, status, error))
                raise
            # A caller's cancel that landed while connecting: the task goes on to finish.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            status, error = RetrievalStatus.CANCELLED, run.cancelled_error()
        except (_Cancelled, ConnectFailure, POP3Error) as exc:
            # After a cancel, whatever broke the session is the cancel's doing.
            if run.cancel_requested or isinstance(exc, _Cancelled):
                status, error = RetrievalStatus.CANCELLED, run.cancelled_error()
            else:
                status, error = RetrievalStatus.FAILED, run.error_of(exc)
        except OAuthRefreshFailed as exc:  # no access token: nothing was connected
            status, error = RetrievalStatus.FAILED, RetrievalError(exc.code, exc.detail)
        except RepositoryError as exc:
            logger.error("retrieval %s: store failed: %s", retrieval.id, exc)
            status = RetrievalStatus.FAILED
            error = RetrievalError(
                ErrorCode.STORAGE_ERROR, "the message store failed; nothing deleted"
            )
        except Exception:
            logger.exception("retrieval %s failed unexpectedly", retrieval.id)
            status = RetrievalStatus.FAILED
            error = RetrievalError(ErrorCode.INTERNAL_ERROR, "unexpected error; it has been logged")
        await self._finish(run, status, error)
        if run.listed is not None and not self._stopping:
            forgetter = asyncio.create_task(
                self._forget_unlisted(run.account.id, *run.listed),
                name=f"forget unlisted UIDLs of {retrieval.id}",
            )
            self._forgetters.add(forgetter)
            forgetter.add_done_callback(self._forgetters.discard)

    async def _forget_unlisted(self, account_id: str, listed: list[str], at: datetime) -> None:
        """Forget the account's known UIDLs its server no longer listed at ``at`` (they
        change no comparison, so this runs after the retrieval, in short rounds)."""
        try:
            forgotten = FORGET_BATCH
            while forgotten >= FORGET_BATCH:  # other writers get their turn between rounds
                forgotten = await self._messages.forget_unlisted(
                    account_id, listed, seen_before=at, limit=FORGET_BATCH
                )
        except RepositoryError as exc:  # the next retrieval of the account tries again
            logger.warning("forgetting UIDLs gone from the server failed: %s", exc)

    async def _finish(
        self, run: _Run, status: RetrievalStatus, error: RetrievalError | None
    ) -> None:
        retrieval = run.retrieval
        finished_at = utcnow()
        outcome = _Outcome(
            status=status,
            finished_at=finished_at,
            progress=run.progress(),
            error=error,
            tenant=run.account.tenant,
            account_id=run.account.id,
            # Recorded with the end, in one transaction: the schedule never misses a poll.
            next_poll_at=next_poll_at(
                run.account,
                finished_at,
                error.code if error else None,
                login_delay_s=run.client.login_delay if run.client is not None else None,
            ),
        )
        done = _ended(retrieval, outcome)
        slot = self._slots.get(retrieval.id)
        if slot is not None:
            slot.next_poll_at = outcome.next_poll_at
        started = retrieval.started_at or retrieval.created_at
        log_event(
            logger,
            "retrieval finished",
            tenant=run.account.tenant,
            account_id=retrieval.account_id,
            retrieval_id=retrieval.id,
            status=status.value,
            code=error.code if error else None,
            messages_on_server=done.messages_on_server,
            messages_downloaded=done.messages_downloaded,
            bytes_downloaded=done.bytes_downloaded,
            messages_deleted=done.messages_deleted,
            duration_s=round((outcome.finished_at - started).total_seconds(), 3),
        )
        if error is not None and status is RetrievalStatus.FAILED:
            logger.warning("retrieval %s failed: %s (%s)", retrieval.id, error.code, error.detail)
        try:
            await self._record(retrieval.id, outcome)
        except RepositoryError as exc:
            # The retrieval is over all the same: its task ends (freeing its slot), and
            # its end is recorded later, by a retry or by the next trigger.
            logger.error("retrieval %s: cannot record its end yet: %s", retrieval.id, exc)
            self._unrecorded[retrieval.id] = outcome
            recorder = asyncio.create_task(
                self._record_later(retrieval.id), name=f"record end of {retrieval.id}"
            )
            self._recorders.add(recorder)
            recorder.add_done_callback(self._recorders.discard)
            # Ended all the same (``get`` answers with the unrecorded end): wake the waiters.
            self._wake(retrieval.id)
        if self._on_finished is not None:
            # Everything the store holds (or will hold) for it is here already: no read back.
            await self._on_finished(done)

    async def _record_later(self, retrieval_id: str) -> None:
        """Retry recording an end with bounded backoff until it is recorded."""
        attempt = 0
        while retrieval_id in self._unrecorded:
            await asyncio.sleep(FINISH_RETRY_DELAYS_S[min(attempt, len(FINISH_RETRY_DELAYS_S) - 1)])
            attempt += 1
            outcome = self._unrecorded.get(retrieval_id)
            if outcome is None:
                return  # recorded meanwhile (by a trigger or a cancel)
            try:
                await self._record(retrieval_id, outcome)
            except RepositoryError as exc:
                logger.warning(
                    "retrieval %s: recording its end failed again (attempt %d): %s",
                    retrieval_id,
                    attempt,
                    exc,
                )
            else:
                logger.info("retrieval %s: its end is recorded now", retrieval_id)


def _ended(retrieval: Retrieval, outcome: _Outcome) -> Retrieval:
    return msgspec.structs.replace(
        retrieval,
        status=outcome.status,
        finished_at=outcome.finished_at,
        error=outcome.error,
        **msgspec.structs.asdict(outcome.progress),
    )


class _Phase(StrEnum):
    """Where a run is, which decides how a cancel reaches it."""

    STARTING = "starting"  # nothing in flight: the flag is seen at the first checkpoint
    CONNECTING = "connecting"  # resolving and connecting: the task itself is cancelled
    TRANSFERRING = "transferring"  # the connection is dropped (no QUIT: nothing deleted)
    FINISHING = "finishing"  # DELE and QUIT under way: let them complete


class _Run:
    """The state of one retrieval while it runs."""

    def __init__(self, service: RetrievalService, account: Account, retrieval: Retrieval) -> None:
        self.s = service
        self.account = account
        self.retrieval = retrieval
        self.phase = _Phase.STARTING
        self.cancel_requested = False
        self.client: POP3Client | None = None
        self.on_server: int | None = None
        self.downloaded = 0
        self.bytes = 0
        self.deleted = 0
        self.skipped = 0
        # The server's UIDL list and when it was read (for forgetting the unlisted ones).
        self.listed: tuple[list[str], datetime] | None = None

    def progress(self) -> RetrievalProgress:
        return RetrievalProgress(
            messages_on_server=self.on_server,
            messages_downloaded=self.downloaded,
            bytes_downloaded=self.bytes,
            messages_deleted=self.deleted,
            messages_skipped=self.skipped,
        )

    def request_cancel(self, task: asyncio.Task[None]) -> None:
        """Ask the run to stop at its next safe point (see :class:`_Phase`)."""
        self.cancel_requested = True
        if self.phase is _Phase.CONNECTING:
            task.cancel()
        elif self.phase is _Phase.TRANSFERRING and self.client is not None:
            # Network waits fail at once; a commit under way completes first.
            self.client.close()

    def checkpoint(self) -> None:
        if self.cancel_requested and self.phase is not _Phase.FINISHING:
            raise _Cancelled

    def cancelled_error(self) -> RetrievalError:
        return RetrievalError(
            ErrorCode.CANCELLED,
            f"cancelled by a caller; the {self.downloaded} message(s) downloaded before are"
            " stored and nothing was deleted on the server in this session",
        )

    def error_of(self, exc: ConnectFailure | POP3Error) -> RetrievalError:
        detail = exc.detail
        if isinstance(exc, POP3TimeoutError) and self.on_server is not None:
            detail += f"; the {self.downloaded} message(s) downloaded before that are stored"
        return RetrievalError(exc.code, detail)

    @property
    def cap(self) -> int:
        own = self.account.retrieval.max_message_bytes
        return min(own, self.s._max_message_bytes) if own else self.s._max_message_bytes

    async def execute(self) -> None:
        account, s = self.account, self.s
        pause = account.smtp_pause
        if (
            account.incoming.auth == "oauth2"
            and pause is not None
            and pause.code == ErrorCode.OAUTH_REFRESH_FAILED
        ):
            # Paused: the refresh token was refused; only new credentials (a PATCH) help.
            raise OAuthRefreshFailed(
                f"the account is paused since {pause.since.isoformat()}: {pause.detail};"
                " PATCH new OAuth2 credentials to resume",
                transient=False,
            )
        credentials = await s._accounts.secrets(account, outgoing=False)
        self.checkpoint()
        self.phase = _Phase.CONNECTING
        async with s._connector.pop3(
            account,
            session_timeout=s._session_timeout_s,
            min_rate=s._min_transfer_rate,
            rate_window=s._rate_window_s,
        ) as client:
            self.client, self.phase = client, _Phase.TRANSFERRING
            self.checkpoint()
            await client.login(
                account.incoming.username,
                credentials.incoming_password,
                oauth2=credentials.incoming_oauth2,
            )
            delay = client.login_delay
            if delay != account.login_delay_s:
                await s._account_repo.set_login_delay(account.id, delay)
            listed_at = utcnow()
            uidls = await client.uidl()
            self.on_server = len(uidls)

            # Compared in the store: the known UIDLs never come into this process.
            delete_stored, seen_until = self._deletion_rule()
            compared = await s._messages.compare_uidls(
                account.id,
                list(uidls.values()),
                delete_stored=delete_stored,
                delete_seen_until=seen_until,
            )
            if compared.unlisted:  # forgotten once the retrieval has ended
                self.listed = (list(uidls.values()), listed_at)
            # Sizes matter only for new messages: a poll that finds none skips LIST.
            sizes = await client.list() if compared.new else {}

            wanted: list[int] = []
            too_big: list[tuple[str, int]] = []
            for number, uidl in sorted(uidls.items()):
                if uidl not in compared.new:
                    continue
                size = sizes.get(number, 0)
                if size > self.cap:
                    too_big.append((uidl, size))
                else:
                    wanted.append(number)
            to_delete = [n for n, uidl in uidls.items() if uidl in compared.deletable]
            if wanted or too_big or to_delete:
                # Work to do: the poll is stored as running (if it was not) before anything
                # is downloaded or deleted.
                await s.store_running(self.retrieval.id)
            if wanted or too_big:
                # Shown while the work goes on; a poll that finds nothing new writes its
                # count once, with its end.
                await s._retrievals.progress(self.retrieval.id, self.progress())
            await self._skip(too_big)

            if wanted:
                to_delete += await self._download(client, wanted, uidls, sizes)
            self.checkpoint()
            self.phase = _Phase.FINISHING
            if to_delete:
                await client.dele(sorted(to_delete))
                await client.quit()
            else:
                # Nothing to commit at QUIT: its reply would tell nothing (a poll that
                # found nothing new does not wait for it).
                client.quit_nowait()
            self.deleted = len(to_delete)

    async def _skip(self, too_big: list[tuple[str, int]]) -> None:
        if not too_big:
            return
        await self.s._messages.record_skipped(self.account.id, too_big, utcnow())
        self.skipped += len(too_big)
        for uidl, size in too_big:
            logger.info(
                "retrieval %s: skipped %s (%d bytes > cap %d)",
                self.retrieval.id,
                uidl,
                size,
                self.cap,
            )

    def _deletion_rule(self) -> tuple[bool, datetime | None]:
        """Which stored messages the account's policy removes from the server now: all of
        them, or those seen at or before a time (or none)."""
        policy = self.account.retrieval
        if not policy.leave_on_server:
            return True, None
        if policy.delete_after_days is not None:
            return False, utcnow() - timedelta(seconds=policy.delete_after_days * SECONDS_PER_DAY)
        return False, None

    async def _download(
        self,
        client: POP3Client,
        wanted: list[int],
        uidls: dict[int, str],
        sizes: dict[int, int],
    ) -> list[int]:
        """Download and store in durable batches; return what may be deleted (committed).

        One batch is committed while the next downloads (at most one commit in flight),
        so the network and the disk work at the same time.
        """
        deletable: list[int] = []
        delete_new = not self.account.retrieval.leave_on_server
        loop = asyncio.get_running_loop()
        # Downloaded messages not yet handed to the parsing thread, and the chunks handed
        # over (in order) for the next batch.
        pending: list[tuple[str, bytes]] = []
        parsing: list[asyncio.Future[list[NewMessage]]] = []
        numbers: list[int] = []
        size = 0
        writer: asyncio.Task[None] | None = None

        def hand_over() -> None:
            nonlocal pending
            if pending:
                parsing.append(loop.run_in_executor(self.s._parser, self._new_messages, pending))
                pending = []

        async def store(
            chunks: list[asyncio.Future[list[NewMessage]]], numbers: list[int], size: int
        ) -> None:
            batch = [message for chunk in await asyncio.gather(*chunks) for message in chunk]
            progress = msgspec.structs.replace(
                self.progress(),
                messages_downloaded=self.downloaded + len(batch),
                bytes_downloaded=self.bytes + size,
            )
            await self.s._messages.store_batch(self.account.id, batch, self.retrieval.id, progress)
            self.downloaded += len(batch)
            self.bytes += size
            # Only now, with the batch committed, may its messages be deleted.
            if delete_new:
                deletable.extend(numbers)
            if self.s.after_batch is not None:
                await self.s.after_batch(self.account.id)

        async def flush() -> None:
            nonlocal writer, parsing, numbers, size
            hand_over()
            if writer is not None:
                # Shielded: whatever ends the run, a commit under way completes.
                await asyncio.shield(writer)
                writer = None
            if parsing:
                writer = asyncio.create_task(store(parsing, numbers, size))
                parsing, numbers, size = [], [], 0

        try:
            async for number, raw in client.retrieve_many(wanted, max_bytes=self.cap):
                self.checkpoint()
                pending.append((uidls[number], raw))
                numbers.append(number)
                size += len(raw)
                if len(pending) >= PARSE_CHUNK:
                    hand_over()
                if len(numbers) >= BATCH_MESSAGES or size >= BATCH_BYTES:
                    await flush()
        except MessageTooLarge as exc:
            # Remember the big one as skipped (never deleted); what came before is kept.
            listed = exc.listed_size or sizes.get(exc.number, 0)
            await self._skip([(uidls[exc.number], listed)] if exc.number in uidls else [])
            raise
        finally:
            # Whatever ended the download, keep what was downloaded before it.
            await flush()
            await flush()
        return deletable

    def _new_messages(self, downloaded: list[tuple[str, bytes]]) -> list[NewMessage]:
        """Summarize downloaded messages (in the parsing thread)."""
        return [self._new_message(uidl, raw) for uidl, raw in downloaded]

    def _new_message(self, uidl: str, raw: bytes) -> NewMessage:
        parsed = summarize(raw)
        message_id = new_id("msg")
        return NewMessage(
            summary=MessageSummary(
                id=message_id,
                account_id=self.account.id,
                uidl=uidl,
                size=len(raw),
                retrieved_at=utcnow(),
                message_id=parsed.message_id,
                from_=parsed.from_,
                to=list(parsed.to),
                cc=list(parsed.cc),
                subject=parsed.subject,
                date=parsed.date,
                has_attachments=parsed.has_attachments,
                in_reply_to=parsed.in_reply_to,
                references=list(parsed.references),
                # From its own headers; the store may join it to its parent's thread.
                thread_id=thread_id_for(
                    parsed.message_id, parsed.in_reply_to, parsed.references, message_id
                ),
            ),
            raw=raw,
        )
