"""Leases on shared work: how long a claim holds, and the background loops that keep them.

A process holds the work it does (a message being sent, a retrieval being run) under a
lease stored with it: its owner id and a time the claim holds until. While it works, a
heartbeat renews its leases every third of a lease, so one missed renewal (a slow disk, a
busy database) loses nothing. A process that dies stops renewing; every process sweeps
for expired leases every half lease, so the work is taken over within about a lease and a
half of the death, by whichever process notices first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from service.repository.errors import RepositoryError

logger = logging.getLogger("mailroom.leases")

#: How long a claim holds without renewal (seconds). Tests set it short.
LEASE_S = 60.0
#: Renewals per lease: a claim survives this many minus one missed renewals.
RENEWALS_PER_LEASE = 3
#: Sweeps for expired leases per lease.
SWEEPS_PER_LEASE = 2


def lease_length(lease_s: float | None) -> float:
    """``lease_s``, or the module's :data:`LEASE_S` read now (so tests can change it)."""
    return LEASE_S if lease_s is None else lease_s


class Periodic:
    """Runs ``step`` every ``interval_s`` seconds in a background task until stopped.

    A store error is logged and the step runs again at the next interval: a heartbeat or
    a sweep that fails once must not stop for good.
    """

    def __init__(self, name: str, interval_s: float, step: Callable[[], Awaitable[object]]):
        self._name = name
        self._interval_s = interval_s
        self._step = step
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start the loop (its first step comes after one interval); idempotent."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        """Stop the loop; a step under way is cancelled."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._step()
            except RepositoryError as exc:
                logger.warning(
                    "%s failed: %s; tried again in %g s", self._name, exc, self._interval_s
                )
            except Exception:
                logger.exception("%s failed unexpectedly", self._name)
