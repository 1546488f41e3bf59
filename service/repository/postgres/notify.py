"""Wake-ups across replicas over PostgreSQL ``LISTEN``/``NOTIFY``.

One dedicated connection listens on a channel per topic; ``publish`` sends ``pg_notify``
through the pool (a task: fire and forget) and calls this process's own callbacks at once,
so a local wake-up does not wait for the round trip or depend on the listener. Each
payload carries this process's origin id, so the echo of its own notifications is skipped.
A lost listening connection is opened again with backoff; meanwhile polling (the
delivery dispatcher's idle poll) finds the work, so a lost wake-up only costs latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

import asyncpg

from service.repository.postgres.database import DRIVER_ERRORS, PgDatabase

logger = logging.getLogger("mailroom.notify")

CHANNEL_PREFIX = "mailroom_"
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 15.0
# How often the listener checks that its connection is still alive (a lost one may go
# unnoticed until the next read otherwise).
LIVENESS_CHECK_S = 5.0
_SEPARATOR = "|"

Callback = Callable[[str], None]


class PostgresNotifier:
    """``Notifier`` for replicas sharing one PostgreSQL database."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._origin = secrets.token_hex(8)
        self._callbacks: dict[str, list[Callback]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._conn: asyncpg.Connection | None = None  # the listening one, while connected
        self.connected = asyncio.Event()  # for tests and readiness: listening now

    def subscribe(self, topic: str, callback: Callback) -> None:
        """Call ``callback(key)`` for every wake-up of ``topic`` from any replica."""
        new = topic not in self._callbacks
        self._callbacks.setdefault(topic, []).append(callback)
        if new and self._conn is not None:
            # Subscribed after the start: listen on the open connection too.
            self._spawn(self._conn.add_listener(CHANNEL_PREFIX + topic, self._on_notification))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def publish(self, topic: str, key: str) -> None:
        """Wake the subscribers of ``topic`` here at once and in the other replicas."""
        self._deliver(topic, key)
        self._spawn(self._send(topic, key))

    async def _send(self, topic: str, key: str) -> None:
        try:
            async with self._db.connection() as conn:
                await conn.execute(
                    "SELECT pg_notify($1, $2)",
                    CHANNEL_PREFIX + topic,
                    f"{self._origin}{_SEPARATOR}{key}",
                )
        except Exception as exc:  # a hint only: polling finds the work
            logger.warning("could not publish a %s wake-up: %s", topic, exc)

    def _deliver(self, topic: str, key: str) -> None:
        for callback in self._callbacks.get(topic, ()):
            try:
                callback(key)
            except Exception:
                logger.exception("a %s subscriber failed", topic)

    def _on_notification(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        origin, _, key = payload.partition(_SEPARATOR)
        if origin != self._origin:
            self._deliver(channel.removeprefix(CHANNEL_PREFIX), key)

    async def start(self) -> None:
        """Start listening (in the background: a database that is down is retried)."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="notify listener")

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        for task in list(self._sends):
            task.cancel()
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)

    async def _listen(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._db.dsn, timeout=self._db.timeout_s)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                for topic in list(self._callbacks):
                    await conn.add_listener(CHANNEL_PREFIX + topic, self._on_notification)
                self._conn = conn
                self.connected.set()
                delay = RECONNECT_MIN_S
                while not lost.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), LIVENESS_CHECK_S)
                    if not lost.is_set():
                        # A round trip: a dead peer shows up as an error here.
                        await conn.execute("SELECT 1", timeout=self._db.timeout_s)
                logger.warning("the wake-up connection was lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except DRIVER_ERRORS as exc:
                logger.warning("wake-ups: cannot listen (%s); retrying in %.1fs", exc, delay)
            finally:
                self._conn = None
                self.connected.clear()
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
