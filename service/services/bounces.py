"""Linking bounces: each stored DSN tied to the outgoing message it reports.

Messages that may be DSNs are queued (``dsn_candidates``) in the transaction that stores
them. Right after a retrieval's batch commits, :meth:`BounceService.after_batch` links the
account's candidates; at start, and every :data:`SWEEP_S` seconds, :meth:`process` links
whatever is left (a crash between a batch's commit and its linking, a store error). Each
candidate is linked in its own transaction that also removes it from the queue, so it is
linked once (see ``service.repository.bounces``).

Matching: the report's ``Original-Envelope-Id`` when it is an outgoing id of the account
(Mailroom sends ``ENVID=<outgoing id>`` to servers that offer DSN), else the Message-ID of
the returned message (its headers part), else the DSN's own In-Reply-To/References. Only
messages of the account that stored the DSN are looked at.
"""

from __future__ import annotations

import asyncio
import logging

from service.domain.bounces import BounceLink, DsnCandidate
from service.domain.time import utcnow
from service.logs import log_event
from service.mail.dsn import DeliveryReport, parse_dsn
from service.repository.bounces import BounceRepository
from service.repository.errors import RepositoryError
from service.services.leases import Periodic

logger = logging.getLogger("mailroom.bounces")

# Candidates read per query while working through the queue.
BATCH = 100
# How often the queue is looked at besides after each retrieval batch (the fallback).
SWEEP_S = 60.0
# Parsing a report this big would stall other requests: it goes to a thread.
PARSE_IN_THREAD_BYTES = 256 * 1024


class BounceService:
    """Links DSN candidates to the outgoing messages they report."""

    def __init__(
        self, bounces: BounceRepository, *, sweep_s: float = SWEEP_S, batch: int = BATCH
    ) -> None:
        self._bounces = bounces
        self._batch = batch
        self._lock = asyncio.Lock()
        self._sweep = Periodic("bounce linking sweep", sweep_s, self.process)

    async def start(self) -> None:
        """Link what a stopped process left queued, then sweep periodically."""
        self._sweep.start()
        await self.process()

    async def stop(self) -> None:
        await self._sweep.stop()

    async def after_batch(self, account_id: str) -> None:
        """Link the account's queued DSNs (called right after a batch of its messages
        committed). Never raises: what fails stays queued for the sweep."""
        try:
            await self.process(account_id=account_id)
        except RepositoryError as exc:
            logger.warning("cannot link bounces now: %s; the sweep tries again", exc)
        except Exception:
            logger.exception("linking bounces failed; the sweep tries again")

    async def process(self, account_id: str | None = None) -> int:
        """Link every queued candidate (of one account, or of all); how many were DSNs
        about a message of their account."""
        linked = 0
        async with self._lock:
            while True:
                candidates = await self._bounces.candidates(self._batch, account_id=account_id)
                for candidate in candidates:
                    linked += await self._link(candidate)
                if len(candidates) < self._batch:
                    return linked

    async def _link(self, candidate: DsnCandidate) -> int:
        raw = await self._bounces.raw(candidate.message_id)
        report: DeliveryReport | None = None
        if raw is not None:
            if len(raw) >= PARSE_IN_THREAD_BYTES:
                report = await asyncio.to_thread(parse_dsn, raw)
            else:
                report = parse_dsn(raw)
        link: BounceLink | None = None
        if report is not None:
            outgoing_id = await self._bounces.find_outgoing(
                candidate.account_id,
                report.original_envelope_id,
                report.candidate_message_ids(),
            )
            if outgoing_id is not None:
                link = BounceLink(
                    dsn_message_id=candidate.message_id,
                    outgoing_id=outgoing_id,
                    failed=report.failed,
                )
        bounced = await self._bounces.link(candidate, link, utcnow())
        if link is None or bounced is None:
            return 0
        log_event(
            logger,
            "message bounced" if bounced else "delivery report linked",
            tenant=candidate.tenant,
            account_id=candidate.account_id,
            outgoing_id=link.outgoing_id,
            dsn_message_id=candidate.message_id,
            recipients=",".join(b.address for b in bounced),
            status=",".join(b.report.status or "" for b in bounced),
        )
        return 1
