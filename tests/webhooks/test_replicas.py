"""Two replicas on one PostgreSQL database deliver one endpoint's queue: every event
arrives once (each delivery is claimed by one replica: SKIP LOCKED + lease)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from datetime import UTC, datetime
from pathlib import Path

from service.crypto import CredentialCipher
from service.domain.events import EventType, new_event
from service.netguard import ConnectionGuard
from service.repository.postgres.events import insert_events
from service.repository.store import create_store
from service.services.webhooks import (
    RetryPolicy,
    WebhookDispatcher,
    WebhookSender,
    WebhookService,
)
from tests.repository.conftest import store_settings
from tests.webhooks.receiver import Receiver

EVENTS = 80


async def test_two_replicas_never_deliver_one_event_twice(tmp_path: Path) -> None:
    settings = store_settings("postgres", tmp_path)
    key = os.urandom(32)
    stores = [create_store(settings), create_store(settings)]
    receiver = await Receiver().start()
    dispatchers: list[WebhookDispatcher] = []
    try:
        services = []
        for n, store in enumerate(stores):
            await store.open()
            sender = WebhookSender(
                ConnectionGuard((ipaddress.ip_network("127.0.0.0/8"),)),
                timeout_s=10,
                ca_file=None,
            )
            service = WebhookService(
                store.webhooks,
                store.accounts,
                CredentialCipher((key,)),
                sender,
                secret_grace_s=60,
            )
            services.append(service)
            dispatchers.append(
                WebhookDispatcher(
                    store.webhooks,
                    service,
                    sender,
                    store.notifier,
                    owner=f"rep_{n}",
                    exclusive=False,
                    policy=RetryPolicy(base_s=0.05, max_s=0.2, window_s=60),
                    concurrency=4,
                    timeout_s=10,
                )
            )
        _, secret = await services[0].create(
            "default",
            url=receiver.url,
            events=["*"],
            account_ids=None,
            enabled=True,
            description=None,
        )
        receiver.secrets.append(secret)
        for store, dispatcher in zip(stores, dispatchers, strict=True):
            await store.notifier.start()
            await dispatcher.start()
        db = stores[0].db  # type: ignore[attr-defined]
        for n in range(EVENTS):
            async with db.transaction() as conn:
                await insert_events(
                    conn,
                    [
                        new_event(
                            EventType.MESSAGE_RECEIVED,
                            tenant="default",
                            account_id="acc_1",
                            created_at=datetime.now(UTC),
                            data={"n": n},
                        )
                    ],
                )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(receiver.requests) < EVENTS and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a duplicate would arrive meanwhile
        ids = [r.webhook_id for r in receiver.requests]
        assert len(ids) == EVENTS and len(set(ids)) == EVENTS
        assert all(r.verified_with == [0] for r in receiver.requests)
        by_owner = await db.fetch_all(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'"
        )
        assert by_owner[0][0] == EVENTS
    finally:
        for dispatcher in dispatchers:
            await dispatcher.stop()
        for store in stores:
            await store.notifier.stop()
            await store.close()
        await receiver.stop()
