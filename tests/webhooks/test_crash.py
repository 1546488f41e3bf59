"""SIGKILL of the real process (``python -m service``) during a burst of events loses none:
what was not delivered before the kill is delivered after the restart; a request repeated
after the restart carries the same ``webhook-id``. On the store the suite runs (SQLite file,
or PostgreSQL with ``MAILROOM_TEST_STORE=postgres``)."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import app_database
from tests.process import kill, start, stop
from tests.servers.smtp import SmtpSink
from tests.webhooks.receiver import Receiver

KEY = "webhook-crash-key-0123456789"
HEADERS = {"Authorization": f"Bearer {KEY}"}
BURST = 60
WAIT_S = 90


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = await Receiver().start()
    yield started
    await started.stop()


async def wait_until(check: Any, what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while loop.time() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached: {what}")


async def test_sigkill_during_a_burst_loses_no_event(
    tmp_path: Path, receiver: Receiver, smtp_sink_factory: Any
) -> None:
    env = {
        "MAILROOM_DATABASE": app_database(tmp_path),
        "MAILROOM_API_KEYS": KEY,
        "MAILROOM_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
        "MAILROOM_RETRY_DELAYS": "0.2,0.5,1",
        "MAILROOM_WEBHOOK_RETRY_BASE": "0.1",
        "MAILROOM_WEBHOOK_RETRY_MAX": "0.5",
        "MAILROOM_LEASE_SECONDS": "2",
        "MAILROOM_WEBHOOK_CONCURRENCY": "2",
    }
    sink: SmtpSink = smtp_sink_factory()
    receiver.delay_s = 0.05  # slow enough that deliveries are still queued at the kill
    killed_once: asyncio.Event = asyncio.Event()
    proc, base = await asyncio.to_thread(start, env)
    try:
        async with httpx.AsyncClient(base_url=base, headers=HEADERS, timeout=30) as api:
            account = await api.post(
                "/v1/accounts",
                json={
                    "name": "Alice",
                    "email": "alice@example.com",
                    "incoming": {
                        "host": "127.0.0.1",
                        "port": 1110,
                        "security": "none",
                        "username": "alice",
                        "password": "pop-secret",
                    },
                    "outgoing": {"host": sink.host, "port": sink.port, "security": "none"},
                },
            )
            assert account.status_code == 201, account.text
            account_id = account.json()["id"]
            hook = await api.post(
                "/v1/webhooks", json={"url": receiver.url, "events": ["outgoing.sent"]}
            )
            assert hook.status_code == 201, hook.text
            receiver.secrets.append(hook.json()["secret"])
            receiver.on_request = lambda r: (
                killed_once.set() if len(receiver.requests) >= 5 else None
            )
            accepted = await asyncio.gather(
                *(
                    api.post(
                        f"/v1/accounts/{account_id}/outbox",
                        json={"to": ["bob@example.org"], "subject": f"n{n}", "text": "x"},
                    )
                    for n in range(BURST)
                )
            )
            assert {r.status_code for r in accepted} == {202}
            await asyncio.wait_for(killed_once.wait(), WAIT_S)
        await asyncio.to_thread(kill, proc)
        delivered_before = {r.webhook_id for r in receiver.requests if r.status == 200}
        # The kill came mid-burst: most events were still to be delivered.
        assert len(delivered_before) < BURST
        proc, base = await asyncio.to_thread(start, env)
        async with httpx.AsyncClient(base_url=base, headers=HEADERS, timeout=30) as api:

            async def all_sent() -> Any:
                page = await api.get(
                    f"/v1/accounts/{account_id}/outbox", params={"status": "sent", "limit": 500}
                )
                return len(page.json()["items"]) == BURST

            await wait_until(all_sent, "every message sent")

            async def feed() -> list[dict[str, Any]]:
                items: list[dict[str, Any]] = []
                after = None
                while True:
                    params: dict[str, Any] = {"limit": 500, "types": "outgoing.sent"}
                    if after:
                        params["after"] = after
                    page = (await api.get("/v1/events", params=params)).json()
                    if not page["items"]:
                        return items
                    items += page["items"]
                    after = page["next_cursor"]

            events = await feed()
            ids = {e["id"] for e in events}
            # One event per message (a message sent again after the kill is sent again,
            # and reported again: at least once per message).
            assert len({e["data"]["outgoing_id"] for e in events}) == BURST
            assert len(ids) == len(events)

            async def all_delivered() -> Any:
                return ids <= {r.webhook_id for r in receiver.requests if r.status == 200}

            await wait_until(all_delivered, "every event delivered")
        assert all(r.verified_with == [0] for r in receiver.requests)
        # Nothing outside the feed arrived; a repeat is the same event (same webhook-id).
        assert {r.webhook_id for r in receiver.requests} == ids
        assert delivered_before < ids
        await asyncio.to_thread(stop, proc)
    finally:
        if proc.poll() is None:
            await asyncio.to_thread(kill, proc)
