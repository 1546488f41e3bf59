"""Wake-ups across replicas on PostgreSQL (LISTEN/NOTIFY), surviving a lost connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from service.repository.postgres.notify import PostgresNotifier
from service.repository.store import create_store
from tests.repository.conftest import store_settings
from tests.waiting import until


async def test_a_publish_wakes_every_replica_once(tmp_path: Path) -> None:
    settings = store_settings("postgres", tmp_path)
    a, b = create_store(settings), create_store(settings)
    await a.open()
    await b.open()
    seen_a: list[str] = []
    seen_b: list[str] = []
    a.notifier.subscribe("outbox", seen_a.append)
    b.notifier.subscribe("outbox", seen_b.append)
    try:
        for store in (a, b):
            await store.notifier.start()
        listener_b = b.notifier
        assert isinstance(listener_b, PostgresNotifier)
        await asyncio.wait_for(listener_b.connected.wait(), 10)
        a.notifier.publish("outbox", "acc_1")
        await until(lambda: asyncio.sleep(0, seen_b), lambda seen: seen == ["acc_1"])
        assert seen_a == ["acc_1"]  # at once, and not again from its own echo
        # Every connection is killed (the listening one too): it comes back and wake-ups flow again.
        admin = await asyncpg.connect(settings.database)
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        await until(lambda: asyncio.sleep(0.05, listener_b.connected.is_set()), bool)
        await until(
            lambda: asyncio.sleep(0.05, a.notifier.publish("outbox", "acc_2")),
            lambda _: "acc_2" in seen_b,
        )
        await asyncio.sleep(0.2)
        assert seen_a.count("acc_1") == 1
    finally:
        for store in (a, b):
            await store.notifier.stop()
            await store.close()
