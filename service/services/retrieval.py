"""Retrieval: one POP3 session that brings an account's new mail into the store.

Rules (DESIGN.md, "no mail is ever lost"):
- a message is DELEted only after it and its UIDL are committed (``synchronous=FULL``);
  deletions take effect at QUIT, so a dropped session deletes nothing;
- messages already known by UIDL are not downloaded again; UIDLs gone from the server are
  forgotten;
- messages over the account's cap are recorded as skipped and never deleted.

Runs in background tasks owned by ``RetrievalService`` (started and stopped in the app's
lifespan); never two at once for one account (a unique index in the store enforces it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

import msgspec

from service.domain.accounts import Account
from service.domain.enums import RetrievalStatus, RetrievalTrigger, ServerMessageState
from service.domain.ids import new_id
from service.domain.retrievals import (
    MessageSummary,
    NewMessage,
    Retrieval,
    RetrievalError,
    RetrievalProgress,
)
from service.domain.time import utcnow
from service.errors import Conflict, NotFound, TooManyRequests
from service.mail.parse import summarize
from service.pop3.client import POP3Client
from service.pop3.errors import MessageTooLarge, POP3Error
from service.repository.accounts import AccountRepository
from service.repository.errors import DuplicateError, RepositoryError
from service.repository.messages import KnownUidl, MessageRepository
from service.repository.pages import Page
from service.repository.retrievals import RetrievalRepository
from service.services.accounts import AccountService
from service.services.connect import ConnectFailure, MailConnector

logger = logging.getLogger("mailroom.retrieval")

# One commit (one fsync) per this many messages or bytes, whichever comes first: cheap at
# 2,000 small messages, bounded in memory for large ones.
BATCH_MESSAGES = 500
BATCH_BYTES = 8 * 1024 * 1024
SECONDS_PER_DAY = 86_400

RetrievalObserver = Callable[[Retrieval], Awaitable[None]]


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
        on_finished: RetrievalObserver | None = None,
    ) -> None:
        self._accounts = accounts
        self._account_repo = account_repo
        self._retrievals = retrievals
        self._messages = messages
        self._connector = connector
        self._max_message_bytes = max_message_bytes
        self._max_concurrent = max_concurrent
        self._on_finished = on_finished
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Close out retrievals a previous process left running."""
        count = await self._retrievals.fail_interrupted(utcnow())
        if count:
            logger.warning("marked %d interrupted retrieval(s) as failed", count)

    async def stop(self) -> None:
        """Cancel running retrievals: their sessions close without QUIT (nothing deleted)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def trigger(
        self, tenant: str, account_id: str, trigger: RetrievalTrigger = RetrievalTrigger.API
    ) -> Retrieval:
        """Create a queued retrieval and start it; 409 if one is active for the account."""
        account = await self._accounts.get(tenant, account_id)
        return await self._trigger(account, trigger)

    async def trigger_scheduled(self, account: Account) -> Retrieval | None:
        """The scheduler's trigger: silently skipped when busy."""
        try:
            return await self._trigger(account, RetrievalTrigger.SCHEDULE)
        except (Conflict, TooManyRequests):
            return None

    async def _trigger(self, account: Account, trigger: RetrievalTrigger) -> Retrieval:
        if len(self._tasks) >= self._max_concurrent:
            raise TooManyRequests(
                f"{self._max_concurrent} retrievals are running; try again shortly",
                code="too_many_retrievals",
            )
        retrieval = Retrieval(
            id=new_id("ret"),
            account_id=account.id,
            trigger=trigger,
            status=RetrievalStatus.QUEUED,
            created_at=utcnow(),
        )
        try:
            await self._retrievals.add(retrieval)
        except DuplicateError:
            active = await self._retrievals.active(account.id)
            raise Conflict(
                "a retrieval is already running for this account",
                code="retrieval_running",
                resource_id=active.id if active else None,
            ) from None
        task = asyncio.create_task(self._run(account, retrieval), name=f"retrieval {retrieval.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return retrieval

    async def get(self, tenant: str, account_id: str, retrieval_id: str) -> Retrieval:
        await self._accounts.get(tenant, account_id)
        retrieval = await self._retrievals.get(account_id, retrieval_id)
        if retrieval is None:
            raise NotFound(f"no retrieval {retrieval_id!r}")
        return retrieval

    async def page(
        self, tenant: str, account_id: str, *, after: str | None, limit: int
    ) -> Page[Retrieval]:
        await self._accounts.get(tenant, account_id)
        return await self._retrievals.page(account_id, after=after, limit=limit)

    async def wait_idle(self) -> None:
        """Wait for every running retrieval (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run(self, account: Account, retrieval: Retrieval) -> None:
        started_at = utcnow()
        await self._retrievals.start(retrieval.id, started_at)
        retrieval = msgspec.structs.replace(
            retrieval, status=RetrievalStatus.RUNNING, started_at=started_at
        )
        run = _Run(self, account, retrieval)
        status, error = RetrievalStatus.SUCCEEDED, None
        try:
            await run.execute()
        except asyncio.CancelledError:
            status = RetrievalStatus.FAILED
            error = RetrievalError("interrupted", "the service stopped during this retrieval")
            await asyncio.shield(self._finish(retrieval, status, run.progress(), error))
            raise
        except (ConnectFailure, POP3Error) as exc:
            status, error = RetrievalStatus.FAILED, RetrievalError(exc.code, exc.detail)
        except RepositoryError as exc:
            logger.error("retrieval %s: store failed: %s", retrieval.id, exc)
            status = RetrievalStatus.FAILED
            error = RetrievalError("storage_error", "the message store failed; nothing deleted")
        except Exception:
            logger.exception("retrieval %s failed unexpectedly", retrieval.id)
            status = RetrievalStatus.FAILED
            error = RetrievalError("internal_error", "unexpected error; it has been logged")
        await self._finish(retrieval, status, run.progress(), error)

    async def _finish(
        self,
        retrieval: Retrieval,
        status: RetrievalStatus,
        progress: RetrievalProgress,
        error: RetrievalError | None,
    ) -> None:
        finished_at = utcnow()
        try:
            await self._retrievals.finish(retrieval.id, status, finished_at, progress, error)
        except RepositoryError as exc:
            logger.error("retrieval %s: cannot record its end: %s", retrieval.id, exc)
            return
        if error is not None:
            logger.warning("retrieval %s failed: %s (%s)", retrieval.id, error.code, error.detail)
        if self._on_finished is not None:
            # Everything the store now holds for it is here already: no read back.
            done = msgspec.structs.replace(
                retrieval,
                status=status,
                finished_at=finished_at,
                error=error,
                **msgspec.structs.asdict(progress),
            )
            await self._on_finished(done)


class _Run:
    """The state of one retrieval while it runs."""

    def __init__(self, service: RetrievalService, account: Account, retrieval: Retrieval) -> None:
        self.s = service
        self.account = account
        self.retrieval = retrieval
        self.on_server: int | None = None
        self.downloaded = 0
        self.bytes = 0
        self.deleted = 0
        self.skipped = 0

    def progress(self) -> RetrievalProgress:
        return RetrievalProgress(
            messages_on_server=self.on_server,
            messages_downloaded=self.downloaded,
            bytes_downloaded=self.bytes,
            messages_deleted=self.deleted,
            messages_skipped=self.skipped,
        )

    @property
    def cap(self) -> int:
        own = self.account.retrieval.max_message_bytes
        return min(own, self.s._max_message_bytes) if own else self.s._max_message_bytes

    async def execute(self) -> None:
        account, s = self.account, self.s
        credentials = s._accounts.credentials(account)
        async with s._connector.pop3(account) as client:
            await client.login(account.incoming.username, credentials.incoming_password)
            delay = client.login_delay
            if delay != account.login_delay_s:
                await s._account_repo.set_login_delay(account.id, delay)
            uidls = await client.uidl()
            sizes = await client.list()
            self.on_server = len(uidls)
            await s._retrievals.progress(self.retrieval.id, self.progress())

            known = await s._messages.known(account.id)
            present = set(uidls.values())
            await s._messages.forget(account.id, [u for u in known if u not in present])

            wanted: list[int] = []
            too_big: list[tuple[str, int]] = []
            for number, uidl in sorted(uidls.items()):
                if uidl in known:
                    continue
                size = sizes.get(number, 0)
                if size > self.cap:
                    too_big.append((uidl, size))
                else:
                    wanted.append(number)
            await self._skip(too_big)

            to_delete = self._deletable_known(uidls, known)
            to_delete += await self._download(client, wanted, uidls, sizes)
            if to_delete:
                await client.dele(sorted(to_delete))
            await client.quit()
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

    def _deletable_known(self, uidls: dict[int, str], known: dict[str, KnownUidl]) -> list[int]:
        """Server copies of stored messages that the account's policy removes now."""
        policy = self.account.retrieval
        numbers: list[int] = []
        threshold = None
        if policy.delete_after_days is not None:
            threshold = utcnow() - timedelta(seconds=policy.delete_after_days * SECONDS_PER_DAY)
        for number, uidl in uidls.items():
            entry = known.get(uidl)
            if entry is None or entry.state != ServerMessageState.STORED:
                continue
            if not policy.leave_on_server:
                numbers.append(number)
            elif threshold is not None and entry.seen_at <= threshold:
                numbers.append(number)
        return numbers

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
        batch: list[NewMessage] = []
        numbers: list[int] = []
        size = 0
        writer: asyncio.Task[None] | None = None

        async def store(batch: list[NewMessage], numbers: list[int], size: int) -> None:
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

        async def flush() -> None:
            nonlocal writer, batch, numbers, size
            if writer is not None:
                await writer
                writer = None
            if batch:
                writer = asyncio.create_task(store(batch, numbers, size))
                batch, numbers, size = [], [], 0

        try:
            async for number, raw in client.retrieve_many(wanted, max_bytes=self.cap):
                batch.append(self._new_message(uidls[number], raw))
                numbers.append(number)
                size += len(raw)
                if len(batch) >= BATCH_MESSAGES or size >= BATCH_BYTES:
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

    def _new_message(self, uidl: str, raw: bytes) -> NewMessage:
        parsed = summarize(raw)
        return NewMessage(
            summary=MessageSummary(
                id=new_id("msg"),
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
            ),
            raw=raw,
        )
