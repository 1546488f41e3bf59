"""Wake-ups between the processes that share a store: publish a topic and a key, and every
subscriber of the topic (in any replica) is called with the key.

A wake-up is a hint, never the only way work is found: a lost one costs the time until
the next poll (the delivery dispatcher's idle poll), nothing more. So ``publish`` is
synchronous and fire-and-forget, and callbacks must be quick and must not raise.

``InProcessNotifier`` serves the SQLite store (one process per file): it calls the
callbacks at once. The PostgreSQL store has its own, over ``LISTEN``/``NOTIFY``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

logger = logging.getLogger("mailroom.notify")

Callback = Callable[[str], None]


class Topic(StrEnum):
    """What a wake-up is about; its key names the account (or the retrieval)."""

    #: Mail of the account was committed to the outbox (after a 202): deliver it.
    OUTBOX = "outbox"
    #: The account's outgoing settings changed (a pause ended, its waiting mail is due).
    OUTGOING = "outgoing"
    #: A caller cancelled a retrieval (key: its id) that another process may be running.
    RETRIEVAL_CANCEL = "retrieval_cancel"
    #: A retrieval (key: its id) has ended: wake the callers long-polling it.
    RETRIEVAL_ENDED = "retrieval_ended"
    #: An API-only process stored a queued retrieval (key: its id) for a worker to claim.
    RETRIEVAL_QUEUED = "retrieval_queued"
    #: Events of a tenant (key: the tenant) were committed: wake webhook delivery and the
    #: feed's long-polls. On PostgreSQL it is sent inside the transaction (delivered at
    #: commit, to this process too).
    EVENTS = "events"


class Notifier(Protocol):
    def publish(self, topic: str, key: str) -> None:
        """Wake the subscribers of ``topic`` in every process (fire and forget)."""
        ...

    def subscribe(self, topic: str, callback: Callback) -> None:
        """Call ``callback(key)`` for every wake-up of ``topic`` (subscribe before start)."""
        ...

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class InProcessNotifier:
    """Wake-ups within one process: ``publish`` calls the topic's callbacks at once."""

    def __init__(self) -> None:
        self._callbacks: dict[str, list[Callback]] = {}

    def publish(self, topic: str, key: str) -> None:
        """Call every callback of ``topic`` with ``key``; one that raises is logged."""
        for callback in self._callbacks.get(topic, ()):
            try:
                callback(key)
            except Exception:
                # A wake-up is a hint: a broken subscriber must not fail the publisher
                # (a 202 already committed).
                logger.exception("a %s subscriber failed", topic)

    def subscribe(self, topic: str, callback: Callback) -> None:
        """Call ``callback(key)`` for each later ``publish(topic, key)``."""
        self._callbacks.setdefault(topic, []).append(callback)

    async def start(self) -> None:
        """Nothing to open in one process."""

    async def stop(self) -> None:
        """Nothing to close in one process."""
