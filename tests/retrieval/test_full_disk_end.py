"""A retrieval whose end finds the disk full does not wedge its account (real process).

The database lives on a small tmpfs (see tests/disk.py). A retrieval
runs against a trickling server; the disk is filled; the retrieval is cancelled, so its
last writes (its batch and its end) find the disk full. Its slot is free all the same, the
API tells how it ended, and once space is back the next trigger starts (never 409
``retrieval_running`` from a row no task owns) and the end is in the store.

Mounting needs root (CI runs as root); elsewhere this is skipped.
"""

from __future__ import annotations

import asyncio
import sqlite3

import httpx

from tests.disk import Disk, pytestmark  # noqa: F401 (the skip applies here too)
from tests.pop3.fault_server import ScriptedServer
from tests.process import start, stop
from tests.retrieval.test_process_limits import Trickler, account

KEY = "disk-retrieval-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENDED = ("succeeded", "failed", "cancelled")


async def test_unrecordable_end_frees_the_account(disk: Disk) -> None:
    trickler = Trickler()
    env = {
        "MAILROOM_DATABASE": disk.database,
        "MAILROOM_API_KEYS": KEY,
        "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
    }
    async with ScriptedServer(trickler.mini) as server:
        proc, base = await asyncio.to_thread(start, env)
        try:
            async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=60) as http:
                created = await http.post("/v1/accounts", json=account(server.port, "full"))
                account_id = created.json()["id"]
                retrievals = f"/v1/accounts/{account_id}/retrievals"
                first = (await http.post(retrievals)).json()["id"]
                await asyncio.wait_for(trickler.trickling.wait(), 60)

                await asyncio.to_thread(disk.fill)
                stopped = await http.post(f"{retrievals}/{first}/cancel")
                assert stopped.status_code == 200, stopped.text
                body = stopped.json()
                assert body["status"] in ENDED, body  # over, though not yet in the store
                with sqlite3.connect(disk.database) as db:
                    row = db.execute("SELECT status FROM retrievals WHERE id = ?", (first,))
                    assert row.fetchone()[0] == "running"
                # While the disk is full, a trigger cannot be stored: 507, never 409.
                blocked = await http.post(retrievals)
                assert blocked.status_code == 507, blocked.text
                assert blocked.json()["code"] == "storage_full"

                await asyncio.to_thread(disk.free)
                again = await http.post(retrievals)
                assert again.status_code == 202, again.text
                listed = (await http.get(retrievals)).json()["items"]
                assert [r["id"] for r in listed] == [again.json()["id"], first]
                assert listed[1]["status"] in ENDED
        finally:
            out = await asyncio.to_thread(stop, proc)
    assert "Traceback" not in out, out
    assert "cannot record its end yet" in out
    with sqlite3.connect(disk.database) as db:
        status = db.execute("SELECT status FROM retrievals WHERE id = ?", (first,)).fetchone()
    assert status[0] in ENDED
    # Nothing was deleted on the server: the session was dropped, never QUIT.
    assert all("QUIT" not in s.commands() for s in server.sessions[:1])
    assert trickler.mini.deleted_at_quit == []
