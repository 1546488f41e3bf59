"""Delivery: the background worker that empties the outbox over SMTP.

Shape::

    dispatcher ──plans──> session tasks (at most ``concurrency`` at once)
       ^   wake: a 202, a session ending, an outcome written, the next due time
       │
    each session task: one account, one SMTP connection reused for many messages:
        claim a few due messages (status ``sending``) -> send each -> outcome to the
        writer, which commits the outcomes of all sessions in batches (non-durable)

Outcomes (``service.smtp`` classifies each failure as transient or permanent, and as
message-level or account-level):

- every recipient accepted -> ``sent``; some refused with 5xx and others accepted ->
  ``sent`` with those recipients ``failed``; recipients answered 4xx -> ``deferred`` and
  only they are tried again (accepted ones are never sent twice).
- 4xx to MAIL/DATA/the final dot, 421, a dropped connection, a timeout -> ``deferred``
  with exponential backoff (``retry_delays_s``) and jitter. Running out of the schedule or
  past ``max_message_age_s`` -> ``failed`` with ``expired``.
- 5xx to MAIL/DATA/the final dot, or to every recipient -> ``failed`` (no retry).
- Account-level and permanent (the account's settings are wrong, or the server is not
  what they say): ``auth_failed`` (535), ``tls_required`` (STARTTLS missing or stripped:
  no credentials were sent), ``tls_certificate_invalid``, ``insecure_auth_refused``,
  ``auth_not_supported``, ``rejected`` at EHLO and HELO, ``host_not_allowed`` and
  ``credentials_unreadable`` pause the account: the pause (code, text, since) is stored
  with it, so it holds across restarts (except the last two, whose cause is this
  service's configuration: a restart ends them). The account's messages stay waiting
  (their ``error`` says why, ``next_attempt_at`` reads null) and nothing more is tried
  until the outgoing settings change: a PATCH clears the pause, makes the waiting
  messages due and wakes the dispatcher at once. Paused messages still expire.
- Account-level but transient (``tls_failed`` handshake errors, a 454 to AUTH, a host
  that does not resolve right now) and connection failures: the claimed messages are
  deferred with backoff and the account is held until the earliest of them is due (or
  until its outgoing settings change).

Bounds: one attempt (opening the session when it needs one, then MAIL to the reply to the
final dot) has an overall deadline (``attempt_timeout_s``) on top of each step's RFC 5321
timeout, so a server that trickles its replies cannot keep a delivery slot; it ends as a
transient ``timeout``. One tenant's accounts hold at most ``sessions_per_tenant`` of the
``concurrency`` sessions, so a tenant's slow servers never hold up another tenant's mail.

Several processes may deliver from one store. A message is claimed by one process (its
``owner`` id) under a lease (``service.services.leases``) that a heartbeat renews while the
message is being sent and until its outcome is written. A message in flight when the
process dies stays ``sending`` in the store until its lease expires; then whichever
process sweeps first (every half lease; a SQLite process also at start, for every
``sending`` row: it is the only process of its file) records an ``interrupted`` attempt and
makes it due again. So it may be sent twice, always with the same Message-ID, and is never
lost. On a graceful stop, sends in progress get ``shutdown_grace_s`` to finish; a send cut
short then is recorded ``interrupted`` and queued again the same way.

Where SMTP runs: in this process (``LocalSession``) or, so that accepting and delivering
use two cores, in a child process (``service.services.delivery_process``): everything
above (claims, leases, policies, outcomes) stays here, the child only opens sessions and
sends. A child that dies fails the calls waiting on it (``DeliveryProcessLost``): the
message in flight gets an ``interrupted`` attempt, the rest of the claim goes back, and
the next session starts a new child. A session the server refuses (transiently) while
other sessions of the account run is the server's limit, not trouble: its claim goes back
untried and the account keeps the sessions it has for ``SERVER_LIMIT_S``.

Wake-ups come through the store's notifier (``Topic.OUTBOX`` after a 202, ``Topic.OUTGOING``
after new outgoing settings), from whichever process took the request; the idle poll
(``idle_poll_s``) is the fallback.

Each outcome is one INFO event line (``message sent``, ``message deferred``, ``message
failed``), as are ``account paused`` and ``account resumed`` (the latter is logged by the
account service, which ends the pause).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from service.codes import ErrorCode
from service.domain.accounts import Account, SMTPPause
from service.domain.enums import OutgoingStatus, RecipientStatus
from service.domain.outbox import (
    Attempt,
    AttemptOutcome,
    ClaimedMessage,
    ClaimedRecipient,
    DeliveryOutcome,
    OutgoingError,
    RecipientUpdate,
)
from service.domain.time import utcnow
from service.errors import ServiceError
from service.logs import log_event
from service.metrics import Metrics
from service.repository.accounts import AccountRepository
from service.repository.errors import RepositoryError
from service.repository.notify import Notifier, Topic
from service.repository.outbox import EXPIRED_CODE, OutboxRepository
from service.services.accounts import AccountService
from service.services.connect import ConnectFailure, MailConnector
from service.services.delivery_process import DeadlineReached, DeliveryProcessLost
from service.services.leases import RENEWALS_PER_LEASE, SWEEPS_PER_LEASE, Periodic, lease_length
from service.services.oauth import OAuthRefreshFailed
from service.smtp import (
    RcptStatus,
    SendResult,
    SMTPDeliveryError,
    SMTPReplyError,
    SMTPServer,
    SMTPSession,
    SMTPStage,
    SMTPTimedOut,
    SMTPTimeouts,
)
from service.smtp.errors import reply_text, stage_words

logger = logging.getLogger("mailroom.delivery")

CLAIM_BATCH = 50  # messages one session claims per round trip (others' sessions take the rest)
MAX_MESSAGES_PER_SESSION = 200  # then the session ends and its slot is planned afresh
SESSION_IDLE_S = 1.0  # an emptied session waits this long for new mail before QUIT
SHUTDOWN_GRACE_S = 10.0  # sends in progress at shutdown get this long to finish
IDLE_POLL_S = 5.0  # longest sleep: notices account changes (a PATCH ends a pause)
# Wake-ups closer together than this (a 202 each, under load) share one planning round: a
# round is two store reads, and a running session claims new mail of its account itself.
PLAN_INTERVAL_S = 0.02
EXPIRY_SWEEP_S = 60.0  # how often messages past max_message_age_s are failed
DUE_ACCOUNTS_SCAN = 1000  # accounts considered per planning round
# A server that refuses one more session while others of the account are open (a 421 at
# the greeting, a refused or dropped connection) is held to the sessions it took, this long.
SERVER_LIMIT_S = 300.0
WRITE_BATCH = 500  # outcomes per commit
WRITE_RETRIES = 3
WRITE_RETRY_DELAY_S = 0.5

ATTEMPT_TIMEOUT_S = 600.0  # one whole attempt; the app passes MAILROOM_SMTP_ATTEMPT_TIMEOUT
HOST_NOT_ALLOWED = ErrorCode.HOST_NOT_ALLOWED
INVALID_ADDRESS = ErrorCode.INVALID_ADDRESS
RECIPIENTS_REFUSED = ErrorCode.RECIPIENTS_REFUSED
RECIPIENTS_DEFERRED = ErrorCode.RECIPIENTS_DEFERRED
# Pauses whose cause is this service's own configuration (the keys, the allowed networks):
# a restart, which may have changed it, ends them.
PAUSES_ENDED_BY_RESTART = (ErrorCode.CREDENTIALS_UNREADABLE, ErrorCode.HOST_NOT_ALLOWED)

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How the worker retries and how much it runs at once (from the settings)."""

    retry_delays_s: tuple[float, ...]
    retry_jitter: float
    concurrency: int
    max_sessions_per_account: int | None = None  # None: up to ``concurrency``
    # Sessions one tenant's accounts may hold at once; None: up to ``concurrency``.
    max_sessions_per_tenant: int | None = None
    attempt_timeout_s: float = ATTEMPT_TIMEOUT_S
    claim_batch: int = CLAIM_BATCH
    max_messages_per_session: int = MAX_MESSAGES_PER_SESSION
    session_idle_s: float = SESSION_IDLE_S
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    idle_poll_s: float = IDLE_POLL_S
    timeouts: SMTPTimeouts | None = None  # None: the RFC 5321 defaults

    @property
    def sessions_per_account(self) -> int:
        cap = self.max_sessions_per_account
        return self.concurrency if cap is None else max(1, min(cap, self.concurrency))

    @property
    def sessions_per_tenant(self) -> int:
        cap = self.max_sessions_per_tenant
        return self.concurrency if cap is None else max(1, min(cap, self.concurrency))


class DeliverySession(Protocol):
    """One SMTP connection as the worker uses it: in this process (:class:`LocalSession`)
    or in the delivery child (``delivery_process.RemoteSession``). ``deadline`` is the
    attempt's, in loop time: a session that enforces it itself raises
    ``DeadlineReached`` (after dropping the connection and noting its ``stage``)."""

    @property
    def usable(self) -> bool: ...

    @property
    def stage(self) -> SMTPStage: ...

    async def open(self, deadline: float) -> None: ...

    async def send(
        self,
        mail_from: str,
        recipients: list[str],
        data: bytes,
        *,
        smtputf8: bool,
        deadline: float,
    ) -> SendResult: ...

    async def close(self) -> None: ...

    def abort(self) -> None: ...


SessionFactory = Callable[[SMTPServer], DeliverySession]


class LocalSession:
    """An :class:`SMTPSession` in this process; the worker's own timeout keeps the
    deadline."""

    def __init__(self, server: SMTPServer) -> None:
        self._session = SMTPSession(server)

    @property
    def usable(self) -> bool:
        return self._session.usable

    @property
    def stage(self) -> SMTPStage:
        return self._session.stage

    async def open(self, deadline: float) -> None:
        await self._session.open()

    async def send(
        self,
        mail_from: str,
        recipients: list[str],
        data: bytes,
        *,
        smtputf8: bool,
        deadline: float,
    ) -> SendResult:
        return await self._session.send(mail_from, recipients, data, smtputf8=smtputf8)

    async def close(self) -> None:
        await self._session.close()

    def abort(self) -> None:
        self._session.abort()


class _Failure(Exception):
    """What went wrong with an attempt: what to record, and what it means for the
    account (raised when a session cannot be opened)."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        transient: bool,
        account_level: bool,
        smtp_code: int | None = None,
        smtp_message: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.transient = transient
        self.account_level = account_level
        self.smtp_code = smtp_code
        self.smtp_message = smtp_message


class _OutcomeWriter:
    """Commits delivery outcomes in batches: every session's outcomes share a commit."""

    def __init__(self, outbox: OutboxRepository, on_written: Callable[[], None]) -> None:
        self._outbox = outbox
        self._on_written = on_written
        self._pending: list[DeliveryOutcome] = []
        self._task: asyncio.Task[None] | None = None
        # Messages whose outcome is not written yet: still ``sending`` in the store, so
        # their leases are renewed until it is.
        self.unwritten: set[str] = set()

    def put(self, outcome: DeliveryOutcome) -> None:
        self._pending.append(outcome)
        self.unwritten.add(outcome.outgoing_id)
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="delivery outcomes")

    async def flush(self) -> None:
        """Wait until everything put so far is written (or given up on)."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:WRITE_BATCH]
                del self._pending[:WRITE_BATCH]
                try:
                    await self._write(batch)
                finally:
                    self.unwritten.difference_update(o.outgoing_id for o in batch)
                self._on_written()
        finally:
            self._task = None

    async def _write(self, batch: list[DeliveryOutcome]) -> None:
        for attempt in range(1, WRITE_RETRIES + 1):
            try:
                await self._outbox.record(batch)
                return
            except Exception as exc:
                logger.error(
                    "cannot record %d delivery outcome(s) (try %d of %d): %s",
                    len(batch),
                    attempt,
                    WRITE_RETRIES,
                    exc,
                )
                await asyncio.sleep(WRITE_RETRY_DELAY_S * attempt)
        # They stay ``sending`` in the store; their leases are no longer renewed, so once
        # they expire the messages are taken back and sent again (same Message-ID).
        logger.error(
            "gave up recording %d delivery outcome(s): %s",
            len(batch),
            ", ".join(o.outgoing_id for o in batch),
        )


class DeliveryWorker:
    """Delivers due outbox messages over SMTP; started and stopped by the app lifespan."""

    def __init__(
        self,
        outbox: OutboxRepository,
        accounts: AccountService,
        account_repo: AccountRepository,
        connector: MailConnector,
        *,
        policy: DeliveryPolicy,
        owner: str,
        lease_s: float | None = None,
        exclusive: bool = False,
        notifier: Notifier | None = None,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        sessions: SessionFactory = LocalSession,
    ) -> None:
        """``owner``: this process's id, on every claim it makes. ``lease_s``: how long a
        claim holds unless renewed (default ``leases.LEASE_S``). ``exclusive``: the only
        process on its store (SQLite), so at start every ``sending`` message is taken back,
        whatever its lease. ``notifier``: wake-ups from the processes that accept mail.
        ``sessions``: where SMTP runs (default: here; ``DeliveryProcess.session`` runs it
        in the delivery child while every store write stays in this process)."""
        self._new_session = sessions
        self._outbox = outbox
        self._owner = owner
        self._lease_s = lease_length(lease_s)
        self._exclusive = exclusive
        self._metrics = metrics
        self._accounts = accounts
        self._account_repo = account_repo
        self._connector = connector
        self._policy = policy
        self._clock = clock
        self._rng = rng or random.Random()  # jitter only: no security role
        self._writer = _OutcomeWriter(outbox, self._wake_up)
        self._wake = asyncio.Event()
        self._reclaim = asyncio.Event()  # lingering sessions give their slot back
        self._account_events: dict[str, asyncio.Event] = {}
        self._sessions: dict[str, int] = {}  # account id -> running sessions
        self._tenant_of: dict[str, str] = {}  # account id -> tenant, while it has sessions
        self._tenant_sessions: dict[str, int] = {}  # tenant -> running sessions
        self._lingering = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._claimed: set[str] = set()  # taken (sending), outcome not yet produced
        self._held: dict[str, datetime] = {}  # transient trouble: not before this time
        # account id -> (sessions its server allows, until when on the monotonic clock)
        self._server_limits: dict[str, tuple[int, float]] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._heartbeat = Periodic(
            "outbox lease renewal", self._lease_s / RENEWALS_PER_LEASE, self._renew
        )
        self._sweep = Periodic(
            "outbox lease sweep", self._lease_s / SWEEPS_PER_LEASE, self._recover_expired
        )
        if notifier is not None:
            notifier.subscribe(Topic.OUTBOX, self.notify)
            notifier.subscribe(Topic.OUTGOING, self.outgoing_changed)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Requeue what a stopped process left in flight, then start dispatching."""
        await self._recover(everything=self._exclusive)
        ended = await self._account_repo.clear_smtp_pauses(PAUSES_ENDED_BY_RESTART)
        if ended:
            logger.info("%d account(s) paused on this service's configuration resume", ended)
        self._stopping = False
        self._wake.clear()
        self._reclaim.clear()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="delivery dispatcher")
        self._heartbeat.start()
        self._sweep.start()

    async def _recover(self, *, everything: bool = False) -> int:
        recovered = await self._outbox.recover_expired(self._clock(), everything=everything)
        if recovered:
            logger.warning(
                "%d message(s) were being sent by a process that stopped; they are queued"
                " again (a server may receive one twice, with the same Message-ID)",
                recovered,
            )
            self._wake.set()
        return recovered

    async def _recover_expired(self) -> None:
        await self._recover()

    async def _renew(self) -> None:
        """Renew the leases of every message this process holds (being sent, or sent and
        its outcome not yet written)."""
        held = self._claimed | self._writer.unwritten
        if held:
            lease_until = self._clock() + timedelta(seconds=self._lease_s)
            await self._outbox.renew(self._owner, held, lease_until)

    async def stop(self) -> None:
        """Stop taking work; let sends in progress finish within the grace period, then
        cancel the rest and put their messages back in the queue."""
        self._stopping = True
        await self._sweep.stop()
        self._wake.set()
        self._reclaim.set()
        for event in self._account_events.values():
            event.set()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._policy.shutdown_grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
                logger.warning(
                    "%d SMTP session(s) did not finish within %g s; their messages are"
                    " queued again",
                    len(late),
                    self._policy.shutdown_grace_s,
                )
        try:
            await self._writer.flush()
            if self._claimed:
                await self._outbox.release(set(self._claimed), self._clock())
                self._claimed.clear()
        finally:
            # Only now: the sends given their grace period held their leases until the end.
            await self._heartbeat.stop()

    def notify(self, account_id: str | None = None) -> None:
        """New mail was committed (for ``account_id``): look at the outbox now."""
        self._wake.set()
        if account_id is not None:
            event = self._account_events.get(account_id)
            if event is not None:
                event.set()

    async def wait_idle(self) -> None:
        """Wait until no session runs and every outcome is written (for tests)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))
        await self._writer.flush()

    def outgoing_changed(self, account_id: str) -> None:
        """The account's outgoing settings changed (its pause, if any, is cleared and its
        waiting messages are due): deliver them now, not after a backoff or a poll."""
        self._held.pop(account_id, None)
        self._server_limits.pop(account_id, None)  # perhaps another server now
        self.notify(account_id)

    def _wake_up(self) -> None:
        self._wake.set()

    # -- planning ----------------------------------------------------------------------

    async def _dispatch(self) -> None:
        last_sweep = -math.inf
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()
            planned_at = loop.time()
            try:
                if time.monotonic() - last_sweep >= EXPIRY_SWEEP_S:
                    last_sweep = time.monotonic()
                    expired = await self._outbox.expire_overdue(self._clock())
                    if expired:
                        logger.warning("%d message(s) expired undelivered", expired)
                timeout = await self._plan()
            except RepositoryError as exc:
                logger.error("delivery planning failed: %s", exc)
                timeout = self._policy.idle_poll_s
            except Exception:
                # A bug must not stop delivery for good: log it and plan again later.
                logger.exception("delivery planning failed unexpectedly")
                timeout = self._policy.idle_poll_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            if (pause := planned_at + PLAN_INTERVAL_S - loop.time()) > 0:
                await asyncio.sleep(pause)

    async def _plan(self) -> float:
        """Start sessions for due accounts; return how long to sleep at most."""
        now = self._clock()
        self._held = {a: t for a, t in self._held.items() if t > now}
        poll = self._policy.idle_poll_s
        working = len(self._tasks) - self._lingering
        if working >= self._policy.concurrency:
            return poll  # a session ending wakes the dispatcher
        share = self._policy.sessions_per_tenant
        # Left out of the scan, so a tenant with a big backlog cannot crowd others out of it.
        full = {t for t, n in self._tenant_sessions.items() if n >= share}
        due = await self._outbox.due_accounts(now, DUE_ACCOUNTS_SCAN, exclude_tenants=full)
        wanted: list[str] = []
        tenant_of: dict[str, str] = {}
        for account in due:
            if account.account_id in self._held:
                continue
            tenant_of[account.account_id] = account.tenant
            running = self._sessions.get(account.account_id, 0)
            target = min(
                self._sessions_allowed(account.account_id),
                math.ceil(account.due / self._policy.claim_batch),
            )
            wanted += [account.account_id] * max(0, target - running)
        # Round-robin over accounts: each gets a session before any gets a second one.
        order = _round_robin(wanted)
        over_share: set[str] = set()  # their tenant holds its share: a session ending wakes us
        for account_id in order:
            tenant = tenant_of[account_id]
            if self._tenant_sessions.get(tenant, 0) >= share:
                over_share.add(account_id)
                continue
            if len(self._tasks) >= self._policy.concurrency:
                if self._lingering:
                    self._reclaim.set()  # idle sessions make room, then we are woken
                break
            self._start_session(account_id, tenant)
        excluded = set(self._sessions) | set(self._held) | over_share
        full = {t for t, n in self._tenant_sessions.items() if n >= share}
        next_due = await self._outbox.next_due(excluded, exclude_tenants=full)
        wake_times = [t for t in (next_due, *self._held.values()) if t is not None]
        if not wake_times:
            return poll
        return max(0.0, min(poll, (min(wake_times) - self._clock()).total_seconds()))

    def _sessions_allowed(self, account_id: str) -> int:
        """Sessions the account may have: the policy's, less if its server said so."""
        limit = self._server_limits.get(account_id)
        if limit is not None:
            if limit[1] > time.monotonic():
                return min(limit[0], self._policy.sessions_per_account)
            del self._server_limits[account_id]
        return self._policy.sessions_per_account

    def _at_server_limit(self, account: Account, failure: _Failure) -> bool:
        """A session the server would not take (transiently) while other sessions of the
        account run: the server's limit, not trouble. Note it (the account keeps the
        sessions it has, and gets no more for ``SERVER_LIMIT_S``); True when the claim
        simply goes back. When the server is down, the last of them to fail holds the
        account as usual."""
        others = self._sessions.get(account.id, 1) - 1
        if not failure.transient or others < 1:
            return False
        self._server_limits[account.id] = (others, time.monotonic() + SERVER_LIMIT_S)
        log_event(
            logger,
            "smtp sessions limited by the server",
            tenant=account.tenant,
            account_id=account.id,
            sessions=others,
            code=failure.code,
            detail=failure.detail,
        )
        return True

    def _start_session(self, account_id: str, tenant: str) -> None:
        self._sessions[account_id] = self._sessions.get(account_id, 0) + 1
        self._tenant_of[account_id] = tenant
        self._tenant_sessions[tenant] = self._tenant_sessions.get(tenant, 0) + 1
        task = asyncio.create_task(self._session(account_id), name=f"smtp {account_id}")
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            left = self._sessions.get(account_id, 1) - 1
            if left > 0:
                self._sessions[account_id] = left
            else:
                self._sessions.pop(account_id, None)
                self._account_events.pop(account_id, None)
                self._tenant_of.pop(account_id, None)
            tenant_left = self._tenant_sessions.get(tenant, 1) - 1
            if tenant_left > 0:
                self._tenant_sessions[tenant] = tenant_left
            else:
                self._tenant_sessions.pop(tenant, None)
            if not finished.cancelled() and finished.exception() is not None:
                logger.error(
                    "SMTP session for account %s failed unexpectedly",
                    account_id,
                    exc_info=finished.exception(),
                )
            self._wake.set()

        task.add_done_callback(done)

    # -- one session -------------------------------------------------------------------

    async def _session(self, account_id: str) -> None:
        """Deliver the account's due messages over one connection, then QUIT."""
        account = await self._account_repo.get_any(account_id)
        if account is None or account.smtp_pause is not None:
            return
        batch = await self._claim(account_id)
        session: DeliverySession | None = None
        done = 0
        in_flight: dict[str, datetime] = {}  # the message being sent -> when it began
        loop = asyncio.get_running_loop()
        try:
            while batch:
                pending = deque(batch)
                while pending:
                    if self._stopping:
                        return  # the rest is released below
                    # One attempt's deadline covers opening a session for it, if needed.
                    deadline = loop.time() + self._policy.attempt_timeout_s
                    if session is None or not session.usable:
                        if session is not None:
                            await session.close()
                        try:
                            session = await self._open(account, deadline)
                        except _Failure as failure:
                            session = None
                            if not self._at_server_limit(account, failure):
                                await self._open_failed(account, list(pending), failure)
                            return  # what is still claimed goes back below
                    message = pending.popleft()
                    in_flight[message.id] = self._clock()
                    outcome = await self._attempt(session, message, deadline)
                    del in_flight[message.id]
                    self._finish(outcome, message)
                    done += 1
                if self._stopping or done >= self._policy.max_messages_per_session:
                    return
                batch = await self._claim(account_id)
                if not batch and await self._linger(account_id):
                    batch = await self._claim(account_id)
        except DeliveryProcessLost as exc:
            # The delivery child died: the message in flight gets an ``interrupted``
            # attempt and is due again, the rest of the claim goes back (below), as
            # after a crash of the whole process; the next session starts a new child.
            logger.warning(
                "SMTP session for account %s lost its delivery process: %s", account_id, exc
            )
            session = None
        except asyncio.CancelledError:
            if session is not None:
                # Cancelled mid-transaction (shutdown grace ran out): a QUIT now would
                # land inside the message data, so drop the connection instead; the
                # server discards a message that never got its final dot.
                session.abort()
                session = None
            raise
        finally:
            if session is not None:
                await session.close()
            await self._release_unfinished(batch, in_flight)

    async def _claim(self, account_id: str) -> list[ClaimedMessage]:
        if self._stopping or account_id in self._held:
            return []  # another session of the account just found it unusable
        now = self._clock()
        claimed = await self._outbox.claim(
            account_id,
            now,
            self._policy.claim_batch,
            owner=self._owner,
            lease_until=now + timedelta(seconds=self._lease_s),
        )
        self._claimed.update(m.id for m in claimed)
        return claimed

    async def _linger(self, account_id: str) -> bool:
        """Keep an emptied session for a moment: True if new mail came for the account."""
        event = self._account_events.setdefault(account_id, asyncio.Event())
        event.clear()
        self._lingering += 1
        try:
            waiters = [
                asyncio.ensure_future(event.wait()),
                asyncio.ensure_future(self._reclaim.wait()),
            ]
            try:
                await asyncio.wait(
                    waiters,
                    timeout=self._policy.session_idle_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()
        finally:
            self._lingering -= 1
            if self._lingering == 0:
                self._reclaim.clear()
        return event.is_set() and not self._stopping

    async def _release_unfinished(
        self, batch: Sequence[ClaimedMessage], in_flight: dict[str, datetime]
    ) -> None:
        """Give back what the session took and did not finish; a send cut short (a stop
        whose grace ran out) is recorded as an ``interrupted`` attempt first."""
        left = [m.id for m in batch if m.id in self._claimed]
        if not left:
            return
        now = self._clock()
        started = {i: at for i, at in in_flight.items() if i in left}
        with contextlib.suppress(RepositoryError):
            if started:
                await self._outbox.interrupt(started, now)
                for message in batch:
                    if message.id in started:
                        self._log_interrupted(message, started[message.id])
            rest = [i for i in left if i not in started]
            await self._outbox.release(rest, now)
            self._claimed.difference_update(left)

    def _finish(
        self, outcome: DeliveryOutcome, message: ClaimedMessage, *, paused: bool = False
    ) -> None:
        self._claimed.discard(outcome.outgoing_id)
        self._writer.put(outcome)
        self._log_outcome(outcome, message, paused=paused)
        if self._metrics is not None and outcome.attempt is not None:
            self._metrics.record_delivery_attempt(outcome.attempt.outcome)
            if outcome.status is OutgoingStatus.SENT:
                latency = (outcome.at - message.created_at).total_seconds()
                self._metrics.observe_delivery_latency(latency)

    def _log_outcome(
        self, outcome: DeliveryOutcome, message: ClaimedMessage, *, paused: bool
    ) -> None:
        """One business event per outcome: sent, deferred (tried again later) or failed."""
        event = {
            OutgoingStatus.SENT: "message sent",
            OutgoingStatus.DEFERRED: "message deferred",
        }.get(outcome.status, "message failed")
        attempt = outcome.attempt
        log_event(
            logger,
            event,
            tenant=self._tenant_of.get(message.account_id),
            account_id=message.account_id,
            outgoing_id=message.id,
            message_id=message.message_id,
            code=outcome.error.code if outcome.error else None,
            smtp_code=attempt.smtp_code if attempt else None,
            smtp_reply=(
                reply_text(attempt.smtp_code, attempt.smtp_message)
                if attempt is not None and attempt.smtp_code is not None
                else None
            ),
            attempt=message.attempt_count + 1 if outcome.count_attempt else None,
            next_attempt_at=(
                None
                if paused or outcome.next_attempt_at is None
                else outcome.next_attempt_at.isoformat()
            ),
        )

    def _log_interrupted(self, message: ClaimedMessage, started: datetime) -> None:
        log_event(
            logger,
            "message deferred",
            tenant=self._tenant_of.get(message.account_id),
            account_id=message.account_id,
            outgoing_id=message.id,
            message_id=message.message_id,
            code=ErrorCode.INTERRUPTED,
            attempt_started_at=started.isoformat(),
        )

    async def _attempt(
        self, session: DeliverySession, message: ClaimedMessage, deadline: float
    ) -> DeliveryOutcome:
        """One attempt within its overall deadline: past it, the connection is dropped and
        the attempt is a transient ``timeout``."""
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                return await self._deliver(session, message, deadline)
        except TimeoutError as timed_out:
            if not timeout.expired() and not isinstance(timed_out, DeadlineReached):
                raise
        # The session dropped the connection when the deadline cancelled it mid-command;
        # make sure: a transaction cut short cannot go on on this connection.
        session.abort()
        stage = session.stage
        exc = SMTPTimedOut(
            ErrorCode.TIMEOUT,
            f"the SMTP server did not complete the delivery attempt within"
            f" {self._policy.attempt_timeout_s:g} s (it was at {stage_words(stage)});"
            " the connection was dropped",
            stage=stage,
        )
        return self._failed(message, message.open_recipients, exc)

    async def _open(self, account: Account, deadline: float) -> DeliverySession:
        """A connected, secured, authenticated session for the account, within the
        attempt's deadline."""
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                return await self._open_session(account, deadline)
        except TimeoutError as timed_out:
            if not timeout.expired() and not isinstance(timed_out, DeadlineReached):
                raise
        raise _Failure(
            ErrorCode.TIMEOUT,
            f"the SMTP server did not let a session open within"
            f" {self._policy.attempt_timeout_s:g} s; the connection was dropped",
            transient=True,
            account_level=True,
        )

    async def _open_session(self, account: Account, deadline: float) -> DeliverySession:
        try:
            secrets = await self._accounts.secrets(account, incoming=False, pause=False)
            server = await self._connector.smtp_server(
                account, secrets.outgoing_password, oauth2=secrets.outgoing_oauth2
            )
        except OAuthRefreshFailed as exc:  # the refusal pauses the account below
            transient = exc.transient
            raise _Failure(exc.code, exc.detail, transient=transient, account_level=True) from exc
        except ConnectFailure as exc:
            cause = exc.__cause__
            transient = bool(getattr(cause, "transient", exc.code != HOST_NOT_ALLOWED))
            raise _Failure(exc.code, exc.detail, transient=transient, account_level=True) from exc
        except ServiceError as exc:  # credentials that cannot be decrypted
            raise _Failure(exc.code, exc.detail, transient=False, account_level=True) from exc
        server = self._configure(server)
        session = self._new_session(server)
        try:
            await session.open(deadline)
        except SMTPDeliveryError as exc:
            raise _Failure(
                exc.code,
                str(exc),
                transient=exc.transient,
                account_level=exc.account_level,
                smtp_code=exc.smtp_code,
                smtp_message=exc.smtp_message,
            ) from exc
        return session

    def _configure(self, server: SMTPServer) -> SMTPServer:
        if self._policy.timeouts is None:
            return server
        return dataclasses.replace(server, timeouts=self._policy.timeouts)

    async def _open_failed(
        self, account: Account, messages: list[ClaimedMessage], failure: _Failure
    ) -> None:
        """No session: record the failure on the claimed messages and decide for the
        account (pause, hold, or nothing)."""
        now = self._clock()
        error = OutgoingError(failure.code, failure.detail)
        logger.warning(
            "SMTP session for account %s failed: %s (%s)", account.id, failure.code, failure.detail
        )
        attempt_outcome = AttemptOutcome.DEFERRED if failure.transient else AttemptOutcome.FAILED
        if failure.account_level and not failure.transient:
            # Wrong settings: retrying spends the schedule and proves nothing. Pause the
            # account (stored first, so no other session takes its mail meanwhile) and keep
            # the messages waiting, due as soon as the settings change. Unless they
            # already changed while this session ran: then they simply get their try.
            pause = SMTPPause(code=failure.code, detail=failure.detail, since=now)
            paused = await self._account_repo.pause_smtp(
                account.id, pause, settings_of=account.updated_at
            )
            if paused:
                log_event(
                    logger,
                    "account paused",
                    level=logging.WARNING,
                    tenant=account.tenant,
                    account_id=account.id,
                    code=failure.code,
                    smtp_code=failure.smtp_code,
                    smtp_reply=(
                        reply_text(failure.smtp_code, failure.smtp_message)
                        if failure.smtp_code is not None
                        else None
                    ),
                    detail=failure.detail,
                )
            for message in messages:
                attempt = _attempt(now, AttemptOutcome.DEFERRED, failure)
                self._finish(_waiting(message, now, attempt, error), message, paused=paused)
            await self._writer.flush()
            if paused:
                await self._outbox.note_hold(account.id, error, now)
            return
        earliest: datetime | None = None
        for message in messages:
            attempt = _attempt(now, attempt_outcome, failure)
            targets = message.open_recipients
            if failure.transient:
                updates = _every(
                    targets, RecipientStatus.DEFERRED, failure.smtp_code, failure.smtp_message
                )
                outcome = self._deferral(message, updates, now, attempt, error)
                if outcome.next_attempt_at is not None:
                    earliest = min(earliest or outcome.next_attempt_at, outcome.next_attempt_at)
            else:
                # Permanent and about this server's answer (say a 554 greeting).
                updates = _every(
                    targets, RecipientStatus.FAILED, failure.smtp_code, failure.smtp_message
                )
                outcome = _conclude(message, updates, now, attempt, error=error)
            self._finish(outcome, message)
        if earliest is not None:
            self._held[account.id] = earliest

    # -- one message -------------------------------------------------------------------

    async def _deliver(
        self, session: DeliverySession, message: ClaimedMessage, deadline: float
    ) -> DeliveryOutcome:
        now = self._clock()
        if now >= message.expires_at:
            return _conclude(message, {}, now, None, expired=True)
        targets = message.open_recipients
        if not targets:  # nothing left to do (a recovered message whose outcome was lost)
            return _conclude(message, {}, now, None)
        try:
            result = await session.send(
                message.mail_from,
                [r.address for r in targets],
                message.raw,
                smtputf8=message.smtputf8,
                deadline=deadline,
            )
        except SMTPDeliveryError as exc:
            return self._failed(message, targets, exc)
        except ValueError as exc:  # an address unsafe on a command line: never sendable
            now = self._clock()
            failure = _Failure(INVALID_ADDRESS, str(exc), transient=False, account_level=False)
            updates = _every(targets, RecipientStatus.FAILED, None, None)
            return _conclude(
                message,
                updates,
                now,
                _attempt(now, AttemptOutcome.FAILED, failure),
                error=OutgoingError(INVALID_ADDRESS, str(exc)),
            )
        return self._sent(message, targets, result)

    def _sent(
        self, message: ClaimedMessage, targets: Sequence[ClaimedRecipient], result: SendResult
    ) -> DeliveryOutcome:
        """The server took the message for at least one recipient."""
        now = self._clock()
        updates = {
            target.position: RecipientUpdate(
                target.position, _RCPT_STATUS[o.status], o.smtp_code, o.smtp_message
            )
            for target, o in zip(targets, result.recipients, strict=True)
        }
        every = all(o.status is RcptStatus.ACCEPTED for o in result.recipients)
        deferred = any(u.status is RecipientStatus.DEFERRED for u in updates.values())
        attempt = Attempt(
            at=now,
            outcome=AttemptOutcome.SENT if every else AttemptOutcome.PARTIAL,
            smtp_code=result.smtp_code,
            smtp_message=result.smtp_message,
            # Deferred (4xx) recipients are what the message still waits on, so they name
            # the attempt even when others were refused for good.
            error_code=None if every else RECIPIENTS_DEFERRED if deferred else RECIPIENTS_REFUSED,
        )
        if deferred:
            error = OutgoingError(
                RECIPIENTS_DEFERRED,
                "the server deferred some recipients (4xx); only they are tried again",
            )
            return self._deferral(message, updates, now, attempt, error, delivered_now=True)
        return _conclude(message, updates, now, attempt, delivered_now=True)

    def _failed(
        self,
        message: ClaimedMessage,
        targets: Sequence[ClaimedRecipient],
        exc: SMTPDeliveryError,
    ) -> DeliveryOutcome:
        """The transaction delivered nothing: per recipient, retry (4xx, drops, timeouts)
        or fail (5xx)."""
        now = self._clock()
        error = OutgoingError(exc.code, str(exc))
        failure = _Failure(
            exc.code,
            str(exc),
            transient=exc.transient,
            account_level=exc.account_level,
            smtp_code=exc.smtp_code,
            smtp_message=exc.smtp_message,
        )
        retry = RecipientStatus.DEFERRED if exc.transient else RecipientStatus.FAILED
        replies = {o.address: o for o in exc.recipients} if isinstance(exc, SMTPReplyError) else {}
        updates: dict[int, RecipientUpdate] = {}
        for target in targets:
            reply = replies.get(target.address)
            if reply is not None and reply.status is not RcptStatus.ACCEPTED:
                # Its own RCPT reply decides: 5xx fails it whatever comes next.
                status = RecipientStatus.FAILED if reply.status is RcptStatus.REJECTED else retry
                updates[target.position] = RecipientUpdate(
                    target.position, status, reply.smtp_code, reply.smtp_message
                )
            else:
                updates[target.position] = RecipientUpdate(
                    target.position, retry, exc.smtp_code, exc.smtp_message
                )
        if any(u.status is RecipientStatus.DEFERRED for u in updates.values()):
            attempt = _attempt(now, AttemptOutcome.DEFERRED, failure)
            return self._deferral(message, updates, now, attempt, error)
        return _conclude(
            message, updates, now, _attempt(now, AttemptOutcome.FAILED, failure), error=error
        )

    def _deferral(
        self,
        message: ClaimedMessage,
        updates: dict[int, RecipientUpdate],
        now: datetime,
        attempt: Attempt,
        error: OutgoingError,
        *,
        delivered_now: bool = False,
    ) -> DeliveryOutcome:
        """Try the deferred recipients again later, per the schedule, or give up."""
        next_at = self._next_attempt(message, now)
        if next_at is None:
            return _conclude(
                message,
                updates,
                now,
                attempt,
                error=error,
                expired=True,
                delivered_now=delivered_now,
            )
        return DeliveryOutcome(
            outgoing_id=message.id,
            status=OutgoingStatus.DEFERRED,
            at=now,
            next_attempt_at=next_at,
            sent_at=now if delivered_now else None,
            attempt=attempt,
            count_attempt=True,
            recipients=tuple(updates.values()),
            error=error,
        )

    def _next_attempt(self, message: ClaimedMessage, now: datetime) -> datetime | None:
        """When to try again after this attempt; None when the schedule is used up or the
        message would outlive ``max_message_age_s``."""
        delays = self._policy.retry_delays_s
        made = message.attempt_count + 1  # attempts including this one
        if made > len(delays):
            return None
        jitter = self._policy.retry_jitter
        delay = delays[made - 1] * self._rng.uniform(1 - jitter, 1 + jitter)
        next_at = now + timedelta(seconds=max(0.0, delay))
        return None if next_at >= message.expires_at else next_at


_RCPT_STATUS = {
    RcptStatus.ACCEPTED: RecipientStatus.SENT,
    RcptStatus.DEFERRED: RecipientStatus.DEFERRED,
    RcptStatus.REJECTED: RecipientStatus.FAILED,
}


def _attempt(now: datetime, outcome: AttemptOutcome, failure: _Failure) -> Attempt:
    return Attempt(
        at=now,
        outcome=outcome,
        smtp_code=failure.smtp_code,
        smtp_message=failure.smtp_message,
        error_code=failure.code,
    )


def _every(
    recipients: Sequence[ClaimedRecipient],
    status: RecipientStatus,
    smtp_code: int | None,
    smtp_message: str | None,
) -> dict[int, RecipientUpdate]:
    return {
        r.position: RecipientUpdate(r.position, status, smtp_code, smtp_message) for r in recipients
    }


def _waiting(
    message: ClaimedMessage, now: datetime, attempt: Attempt, error: OutgoingError
) -> DeliveryOutcome:
    """Back in the queue, due at once (the account is paused: nothing happens until it
    changes), the attempt recorded."""
    return DeliveryOutcome(
        outgoing_id=message.id,
        status=OutgoingStatus.DEFERRED,
        at=now,
        next_attempt_at=now,
        sent_at=None,
        attempt=attempt,
        count_attempt=True,
        recipients=(),
        error=error,
    )


def _conclude(
    message: ClaimedMessage,
    updates: dict[int, RecipientUpdate],
    now: datetime,
    attempt: Attempt | None,
    *,
    error: OutgoingError | None = None,
    expired: bool = False,
    delivered_now: bool = False,
) -> DeliveryOutcome:
    """Nothing left to retry: recipients still open fail (when ``expired``); the message
    is ``sent`` if any recipient ever got it, else ``failed``."""
    final = dict(updates)
    if expired:
        for r in message.recipients:
            current = final.get(r.position)
            status = current.status if current is not None else r.status
            if status in (RecipientStatus.PENDING, RecipientStatus.DEFERRED):
                final[r.position] = RecipientUpdate(
                    r.position,
                    RecipientStatus.FAILED,
                    current.smtp_code if current else None,
                    current.smtp_message if current else None,
                )
    statuses = [
        final[r.position].status if r.position in final else r.status for r in message.recipients
    ]
    refused = statuses.count(RecipientStatus.FAILED)
    delivered = RecipientStatus.SENT in statuses
    if expired:
        detail = "not delivered before the retry schedule or the message's lifetime ran out"
        if error is not None:
            detail += f"; the last attempt: {error.detail}"
        error = OutgoingError(EXPIRED_CODE, detail)
    elif delivered:
        error = (
            OutgoingError(
                RECIPIENTS_REFUSED, f"{refused} of {len(statuses)} recipients were refused"
            )
            if refused
            else None
        )
    elif error is None:
        error = OutgoingError(RECIPIENTS_REFUSED, "every recipient was refused")
    return DeliveryOutcome(
        outgoing_id=message.id,
        status=OutgoingStatus.SENT if delivered else OutgoingStatus.FAILED,
        at=now,
        next_attempt_at=None,
        sent_at=now if delivered_now else None,
        attempt=attempt,
        count_attempt=attempt is not None,
        recipients=tuple(final.values()),
        error=error,
    )


def _round_robin(wanted: list[str]) -> list[str]:
    """``[a, a, b, a, b, c]`` -> ``[a, b, c, a, b, a]``: first sessions before extra ones."""
    rounds: dict[str, int] = {}
    keyed = []
    for index, account_id in enumerate(wanted):
        nth = rounds.get(account_id, 0)
        rounds[account_id] = nth + 1
        keyed.append((nth, index, account_id))
    return [account_id for _, _, account_id in sorted(keyed)]
