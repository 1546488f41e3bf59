"""Apps with webhooks delivering to a receiver on loopback (allowed networks: loopback),
with short retry delays so retries happen within a test."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from tests.api.conftest import API_KEY, make_settings
from tests.webhooks.receiver import Receiver

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
ClientFactory = Callable[..., Awaitable[AsyncTestClient[Any]]]


def webhook_settings(tmp_path: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "allowed_networks": LOOPBACK,
        "webhook_retry_base_s": 0.05,
        "webhook_retry_max_s": 0.2,
        "retry_delays_s": (0.2, 0.3),
        "retry_jitter": 0.0,
        "delivery_process": "off",
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


@pytest.fixture
async def client_factory(tmp_path: Path) -> AsyncIterator[ClientFactory]:
    clients: list[AsyncTestClient[Any]] = []

    async def start(**overrides: Any) -> AsyncTestClient[Any]:
        settings = webhook_settings(tmp_path, **overrides)
        test_client: AsyncTestClient[Any] = AsyncTestClient(app=create_app(settings))
        await test_client.__aenter__()
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        clients.append(test_client)
        return test_client

    yield start
    for test_client in reversed(clients):
        # The app's shutdown blocks its portal; the receiver lives in this loop.
        await asyncio.to_thread(asyncio.run, test_client.__aexit__(None, None, None))


@pytest.fixture
async def client(client_factory: ClientFactory) -> AsyncTestClient[Any]:
    return await client_factory()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = await Receiver().start()
    yield started
    await started.stop()


async def register(client: AsyncTestClient[Any], receiver: Receiver, **body: Any) -> dict[str, Any]:
    """Register ``receiver`` (all events unless told); its secret is added to the
    receiver's verifying secrets."""
    payload = {"url": receiver.url, "events": ["*"], **body}
    response = await client.post("/v1/webhooks", json=payload)
    assert response.status_code == 201, response.text
    created = dict(response.json())
    assert created["secret"].startswith("whsec_")
    receiver.secrets.append(created["secret"])
    return created


async def until_received(
    receiver: Receiver, done: Callable[[list[Any]], bool], timeout: float = 60
) -> list[Any]:
    """Wait (bounded) until ``done(receiver.requests)``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done(receiver.requests):
        if loop.time() > deadline:
            raise AssertionError(f"not received: {[r.payload for r in receiver.requests]}")
        await asyncio.sleep(0.02)
    return receiver.requests
