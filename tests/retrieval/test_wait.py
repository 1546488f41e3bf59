"""Long polls: ``GET .../retrievals/{id}?wait=<seconds>`` answers when the retrieval ends or
when the time has passed, whichever is first; the bound is enforced (422 above it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from service.services.retrieval import MAX_WAIT_S
from tests.pop3.fault_server import MiniPOP3, ScriptedServer, Session
from tests.process import start, stop
from tests.retrieval.conftest import create_account, scripted_account

ENDED = ("succeeded", "failed", "cancelled")
KEY = "wait-key-0123456789abcdef"


async def test_wait_answers_with_the_end_of_a_dovecot_retrieval(
    client: AsyncTestClient[Any], dovecot: Any
) -> None:
    mailbox = dovecot.add_user()
    mailbox.deliver_many(
        f"Subject: wait {i}\nMessage-ID: <{i}@wait>\n\nbody {i}\n".encode() for i in range(30)
    )
    account = await create_account(client, dovecot, mailbox)
    started = await client.post(f"/v1/accounts/{account}/retrievals")
    assert started.status_code == 202, started.text
    url = f"/v1/accounts/{account}/retrievals/{started.json()['id']}"
    # One request, no polling loop: it answers once the retrieval has ended.
    waited = await client.get(url, params={"wait": MAX_WAIT_S})
    assert waited.status_code == 200, waited.text
    assert waited.json()["status"] == "succeeded"
    assert waited.json()["messages_downloaded"] == 30
    # An ended retrieval answers at once, the same as without wait.
    again = await client.get(url, params={"wait": 5})
    assert again.json() == (await client.get(url)).json()


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The real service process (concurrent long polls need a real server), SQLite."""
    env = {
        "MAILROOM_DATABASE": str(tmp_path / "mailroom.db"),
        "MAILROOM_API_KEYS": KEY,
        "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
    }
    proc, base = await asyncio.to_thread(start, env)
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as client:
            yield client
    finally:
        await asyncio.to_thread(stop, proc)


async def test_wait_times_out_while_running_and_wakes_at_the_end(
    http: httpx.AsyncClient,
) -> None:
    release = asyncio.Event()
    asked = asyncio.Event()

    async def password(session: Session, line: bytes) -> bool:
        asked.set()
        await release.wait()  # the retrieval stays running until the test lets it go
        session.authenticated = True
        session.send(b"+OK\r\n")
        return False

    mini = MiniPOP3(messages=[b"Subject: held\r\n\r\nhi\r\n"], replies={"PASS": password})
    async with ScriptedServer(mini) as server:
        created = await http.post("/v1/accounts", json=scripted_account(server.port))
        account = created.json()["id"]
        started = await http.post(f"/v1/accounts/{account}/retrievals")
        url = f"/v1/accounts/{account}/retrievals/{started.json()['id']}"
        await asyncio.wait_for(asked.wait(), MAX_WAIT_S)
        # The time passes first: the answer is the retrieval as it is, still running.
        early = await http.get(url, params={"wait": 0.2})
        assert early.status_code == 200, early.text
        assert early.json()["status"] == "running"
        # Two callers wait; the end wakes both with the ended retrieval.
        waiting = [asyncio.create_task(http.get(url, params={"wait": MAX_WAIT_S}))]
        waiting.append(asyncio.create_task(http.get(url, params={"wait": MAX_WAIT_S})))
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in waiting)  # still waiting, as it still runs
        release.set()
        answers = await asyncio.wait_for(asyncio.gather(*waiting), MAX_WAIT_S + 10)
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "succeeded", answer.text
        assert answer.json()["messages_downloaded"] == 1


async def test_wait_is_bounded_and_checked(client: AsyncTestClient[Any], dovecot: Any) -> None:
    mailbox = dovecot.add_user()
    account = await create_account(client, dovecot, mailbox)
    started = await client.post(f"/v1/accounts/{account}/retrievals")
    url = f"/v1/accounts/{account}/retrievals/{started.json()['id']}"
    for bad in (MAX_WAIT_S + 1, -1, "soon", "nan", "inf"):
        response = await client.get(url, params={"wait": bad})
        assert response.status_code == 422, (bad, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        body = response.json()
        assert body["code"] == "validation_error"
        assert [f["field"] for f in body["errors"]] == ["wait"], body
    missing = await client.get(f"/v1/accounts/{account}/retrievals/ret_missing", params={"wait": 1})
    assert missing.status_code == 404
    done = await client.get(url, params={"wait": MAX_WAIT_S})
    assert done.json()["status"] in ENDED
