"""Apps wired to the suite's Dovecot: accounts pointing at loopback POP3 mailboxes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from tests.api.conftest import API_KEY, make_settings
from tests.pop3.fault_server import MiniPOP3, ScriptedServer, Session

DATA = Path(__file__).resolve().parents[1] / "data" / "messages"
WAIT_S = 60
# TLS accounts name "localhost", which may also resolve to ::1: every answer must pass.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.fixture
async def client(tmp_path: Path, dovecot: Any) -> AsyncIterator[AsyncTestClient[Any]]:
    settings = make_settings(
        tmp_path,
        allowed_networks=LOOPBACK,
        ca_file=dovecot.ca_file,
        scheduler_interval_s=0.1,
        poll_spread_s=0.0,  # a new polled account's first poll is due at once
    )
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield test_client


def account_json(
    dovecot: Any, mailbox: Any, *, security: str = "tls", **retrieval: Any
) -> dict[str, Any]:
    port = dovecot.pop3s_port if security == "tls" else dovecot.pop3_port
    return {
        "name": mailbox.user,
        "email": f"{mailbox.user}@example.com",
        "incoming": {
            "host": dovecot.hostname if security != "none" else dovecot.host,
            "port": port,
            "security": security,
            "username": mailbox.user,
            "password": mailbox.password,
        },
        "outgoing": {"host": "127.0.0.1", "port": 2525, "security": "none"},
        "retrieval": retrieval,
    }


async def create_account(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any, **kwargs: Any
) -> str:
    response = await client.post("/v1/accounts", json=account_json(dovecot, mailbox, **kwargs))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def wait_done(
    client: AsyncTestClient[Any], account_id: str, retrieval_id: str
) -> dict[str, Any]:
    """Poll a retrieval until it has ended (bounded; not a timing assertion)."""
    url = f"/v1/accounts/{account_id}/retrievals/{retrieval_id}"
    for _ in range(WAIT_S * 20):
        body = dict((await client.get(url)).json())
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"retrieval {retrieval_id} did not end: {body}")


async def retrieve(client: AsyncTestClient[Any], account_id: str) -> dict[str, Any]:
    response = await client.post(f"/v1/accounts/{account_id}/retrievals")
    assert response.status_code == 202, response.text
    return await wait_done(client, account_id, response.json()["id"])


async def all_messages(client: AsyncTestClient[Any], account_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get(f"/v1/accounts/{account_id}/messages", params=params)).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def scripted_account(port: int, **retrieval: Any) -> dict[str, Any]:
    """An account whose POP3 server is a scripted one on ``port`` (user alice)."""
    return {
        "name": f"scripted {port}",
        "email": "alice@example.com",
        "incoming": {
            "host": "127.0.0.1",
            "port": port,
            "security": "none",
            "username": "alice",
            "password": "secret",
        },
        "outgoing": {"host": "127.0.0.1", "port": 2525, "security": "none"},
        "retrieval": retrieval,
    }


@contextlib.asynccontextmanager
async def held_at_pass() -> AsyncIterator[tuple[ScriptedServer, asyncio.Event]]:
    """A scripted POP3 server (user alice) whose sessions wait at PASS until the event
    is set, then go on as MiniPOP3 does."""
    release = asyncio.Event()

    async def held(session: Session, line: bytes) -> bool:
        await release.wait()
        session.authenticated = True
        session.send(b"+OK\r\n")
        return False

    async with ScriptedServer(MiniPOP3(replies={"PASS": held})) as server:
        yield server, release
