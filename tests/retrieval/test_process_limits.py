"""Retrieval limits against the real process and trickling POP3 servers.

- the whole-session deadline (``MAILROOM_RETRIEVAL_TIMEOUT``) ends a retrieval that a
  server trickles, as `failed` / `timeout`, keeping what it committed and deleting nothing;
- a tenant holds at most its share of the retrieval slots (429 over it) while another
  tenant still starts retrievals;
- cancel stops a running retrieval (committed messages stay, nothing deleted on the
  server), frees its slot, and is 409 once the retrieval has ended, 404 for another tenant.

The scripted servers run in the test's event loop; the service is a separate process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.pop3.fault_server import MiniPOP3, ScriptedServer, Session, dot_stuff
from tests.process import start, stop
from tests.retrieval.conftest import scripted_account
from tests.waiting import until

KEY_1 = "tenant-one-key-0123456789"
KEY_2 = "tenant-two-key-0123456789"
T1 = {"Authorization": f"Bearer {KEY_1}"}
T2 = {"Authorization": f"Bearer {KEY_2}"}
FAST = b"Subject: fast\r\n\r\nhello\r\n"
SLOW = b"Subject: slow\r\n\r\n" + b"x" * 76 * 1000 + b"\r\n"
TRICKLE_PAUSE_S = 0.05  # one byte per pause: ~20 bytes/s, far below any useful rate


class Trickler:
    """A MiniPOP3 whose message 1 comes at once and message 2 one byte at a time."""

    def __init__(self) -> None:
        self.mini = MiniPOP3(messages=[FAST, SLOW], replies={"RETR": self.retr})
        self.trickling = asyncio.Event()

    async def retr(self, session: Session, line: bytes) -> bool:
        number = int(line.split()[1])
        data = b"+OK\r\n" + dot_stuff(self.mini.messages[number - 1])
        if number == 1:
            session.send(data)
            return False
        for byte in range(len(data)):
            session.send(data[byte : byte + 1])
            await session.writer.drain()
            if byte == 100:
                self.trickling.set()
            await asyncio.sleep(TRICKLE_PAUSE_S)
        return False


async def silent(session: Session) -> None:
    """Accepts the connection and never greets."""
    await asyncio.sleep(3600)


def account(port: int, name: str) -> dict[str, Any]:
    return scripted_account(port, leave_on_server=False) | {"name": name}


@pytest.fixture
async def process(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    env = {
        "MAILROOM_DATABASE": str(tmp_path / "mailroom.db"),
        "MAILROOM_API_KEYS": f"t1:{KEY_1},t2:{KEY_2}",
        "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
        **request.param,
    }
    proc, base = await asyncio.to_thread(start, env)
    state: dict[str, Any] = {"base": base}
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            state["http"] = http
            yield state
    finally:
        state["output"] = await asyncio.to_thread(stop, proc)


async def create(http: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]) -> str:
    response = await http.post("/v1/accounts", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def ended(
    http: httpx.AsyncClient, headers: dict[str, str], account_id: str, retrieval_id: str
) -> dict[str, Any]:
    url = f"/v1/accounts/{account_id}/retrievals/{retrieval_id}"
    response = await until(
        lambda: http.get(url, headers=headers),
        lambda r: r.json()["status"] not in ("queued", "running"),
    )
    return dict(response.json())


@pytest.mark.parametrize("process", [{"MAILROOM_RETRIEVAL_TIMEOUT": "3"}], indirect=True)
async def test_deadline_ends_a_trickled_retrieval_keeping_what_it_committed(
    process: dict[str, Any],
) -> None:
    http: httpx.AsyncClient = process["http"]
    trickler = Trickler()
    async with ScriptedServer(trickler.mini) as server:
        account_id = await create(http, T1, account(server.port, "slow"))
        trigger = await http.post(f"/v1/accounts/{account_id}/retrievals", headers=T1)
        assert trigger.status_code == 202, trigger.text
        done = await ended(http, T1, account_id, trigger.json()["id"])
        commands = server.commands()
    assert (done["status"], done["error"]["code"]) == ("failed", "timeout"), done
    assert "ran past its limit of 3 s" in done["error"]["detail"]
    assert "POP3Client" not in done["error"]["detail"]
    # The fast message was committed before the deadline and is kept ...
    assert (done["messages_on_server"], done["messages_downloaded"]) == (2, 1)
    messages = (await http.get(f"/v1/accounts/{account_id}/messages", headers=T1)).json()
    assert [m["subject"] for m in messages["items"]] == ["fast"]
    # ... and nothing was deleted: the session was dropped, never QUIT.
    assert "QUIT" not in commands and "DELE" not in commands
    assert trickler.mini.deleted_at_quit == []


@pytest.mark.parametrize("process", [{"MAILROOM_MAX_CONCURRENT_RETRIEVALS": "4"}], indirect=True)
async def test_tenant_share_and_cancel(process: dict[str, Any]) -> None:
    http: httpx.AsyncClient = process["http"]
    trickler = Trickler()
    async with ScriptedServer(trickler.mini) as slow, ScriptedServer(silent) as mute:
        t1_accounts = [await create(http, T1, account(slow.port, f"t1-{i}")) for i in range(3)]
        t2_account = await create(http, T2, account(mute.port, "t2"))

        # Tenant t1 fills its share (half of 4 slots) with retrievals that do not end.
        running = []
        for account_id in t1_accounts[:2]:
            response = await http.post(f"/v1/accounts/{account_id}/retrievals", headers=T1)
            assert response.status_code == 202, response.text
            running.append((account_id, response.json()["id"]))
        refused = await http.post(f"/v1/accounts/{t1_accounts[2]}/retrievals", headers=T1)
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == "too_many_retrievals"
        assert "share" in refused.json()["detail"]
        # Another tenant still gets a slot.
        other = await http.post(f"/v1/accounts/{t2_account}/retrievals", headers=T2)
        assert other.status_code == 202, other.text

        # Cancel one of t1's while its second message trickles in.
        await asyncio.wait_for(trickler.trickling.wait(), 60)
        account_id, retrieval_id = running[0]
        cancel_url = f"/v1/accounts/{account_id}/retrievals/{retrieval_id}/cancel"
        assert (await http.post(cancel_url, headers=T2)).status_code == 404  # not t2's
        cancelled = await http.post(cancel_url, headers=T1)
        assert cancelled.status_code == 200, cancelled.text
        body = cancelled.json()
        assert (body["status"], body["error"]["code"]) == ("cancelled", "cancelled"), body
        assert body["finished_at"] is not None
        assert body["messages_downloaded"] == 1  # the fast one, committed before it stopped
        assert (await http.post(cancel_url, headers=T1)).json()["code"] == "retrieval_finished"
        assert (await http.post(cancel_url, headers=T1)).status_code == 409
        # Its slot is free again for t1.
        again = await http.post(f"/v1/accounts/{t1_accounts[2]}/retrievals", headers=T1)
        assert again.status_code == 202, again.text

        # A retrieval still connecting (the server never greets) is cancelled too.
        t2_cancel = f"/v1/accounts/{t2_account}/retrievals/{other.json()['id']}/cancel"
        muted = await http.post(t2_cancel, headers=T2)
        assert (muted.status_code, muted.json()["status"]) == (200, "cancelled"), muted.text
        assert muted.json()["messages_downloaded"] == 0

        stored = (await http.get(f"/v1/accounts/{account_id}/messages", headers=T1)).json()
        assert [m["subject"] for m in stored["items"]] == ["fast"]
        sessions = list(slow.sessions)
    # The cancelled session deleted nothing: no session reached QUIT, none sent DELE.
    assert all("QUIT" not in s.commands() and "DELE" not in s.commands() for s in sessions)
    assert trickler.mini.deleted_at_quit == []
