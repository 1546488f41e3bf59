"""Crash safety: SIGKILL the real process mid-retrieval; nothing is lost or doubled."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx

from tests.process import kill, start, stop
from tests.retrieval.conftest import LOOPBACK, account_json
from tests.waiting import wait_for

KEY = "crash-test-key-0123456789"
MESSAGES = 1500
BODY = b"x" * 76 + b"\n"


def test_sigkill_during_retrieval_loses_and_doubles_nothing(
    tmp_path: Path, dovecot: Any, mailbox: Any
) -> None:
    for i in range(MESSAGES):
        mailbox.deliver(f"Subject: crash {i}\nMessage-ID: <{i}@crash>\n\n".encode() + BODY * 128)
    env = {
        "MAILROOM_DATABASE": str(tmp_path / "mailroom.db"),
        "MAILROOM_API_KEYS": KEY,
        "MAILROOM_ALLOWED_NETWORKS": ",".join(str(net) for net in LOOPBACK),
        "MAILROOM_CA_FILE": dovecot.ca_file,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    proc, base = start(env)
    body = account_json(dovecot, mailbox, leave_on_server=False)
    account = httpx.post(f"{base}/v1/accounts", json=body, headers=headers).json()["id"]
    stop(proc)

    # Kill points: at once, while listing, after the first and the second committed batch.
    kill_after_downloaded = [None, 0, 500, 1000]
    interrupted = 0
    for threshold in kill_after_downloaded:
        proc, base = start(env)
        trigger = httpx.post(f"{base}/v1/accounts/{account}/retrievals", headers=headers)
        assert trigger.status_code == 202, trigger.text
        url = f"{base}/v1/accounts/{account}/retrievals/{trigger.json()['id']}"
        if threshold is not None:

            def reached(url: str = url, threshold: int = threshold) -> bool:
                state = httpx.get(url, headers=headers).json()
                return state["status"] != "running" or (
                    state["messages_on_server"] is not None
                    and state["messages_downloaded"] >= threshold
                )

            wait_for(reached)
        status = httpx.get(url, headers=headers).json()["status"]
        kill(proc)
        interrupted += status in ("queued", "running")
    assert interrupted >= 2  # most kills really landed mid-retrieval

    proc, base = start(env)
    try:
        previous = httpx.get(f"{base}/v1/accounts/{account}/retrievals", headers=headers).json()
        assert all(r["status"] in ("failed", "succeeded") for r in previous["items"])
        assert any(r["error"] and r["error"]["code"] == "interrupted" for r in previous["items"])
        trigger = httpx.post(f"{base}/v1/accounts/{account}/retrievals", headers=headers)
        url = f"{base}/v1/accounts/{account}/retrievals/{trigger.json()['id']}"
        final = wait_for(
            lambda: (
                (s := httpx.get(url, headers=headers).json())["status"] != "running"
                and s["status"] != "queued"
                and s
            )
        )
        assert final["status"] == "succeeded", final
    finally:
        stop(proc)

    assert mailbox.count() == 0
    db = sqlite3.connect(tmp_path / "mailroom.db")
    total, distinct = db.execute("SELECT count(*), count(DISTINCT uidl) FROM messages").fetchone()
    assert total == distinct == MESSAGES
    ids = {row[0] for row in db.execute("SELECT message_id FROM messages")}
    assert ids == {f"<{i}@crash>" for i in range(MESSAGES)}
    bodies = db.execute("SELECT count(*) FROM message_bodies").fetchone()[0]
    assert bodies == MESSAGES
