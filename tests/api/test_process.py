"""The real process: ``python -m service`` on a free port, spoken to over HTTP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests.process import ROOT, start, stop


def test_first_start_generates_a_key_prints_it_once_and_serves(tmp_path: Path) -> None:
    db = tmp_path / "data" / "mailroom.db"
    proc, base = start({"MAILROOM_DATABASE": str(db)})
    try:
        ready = httpx.get(base + "/ready")
        assert ready.json()["status"] == "ready"
        assert httpx.get(base + "/v1/accounts").status_code == 401
    finally:
        out = stop(proc)
    match = re.search(r"API key \(shown only this once\): (mr_\S+)", out)
    assert match, out
    key = match.group(1)
    assert (tmp_path / "data" / "mailroom.key").exists()
    assert key.encode() not in db.read_bytes()

    proc, base = start({"MAILROOM_DATABASE": str(db)})
    try:
        headers = {"Authorization": f"Bearer {key}"}
        body = {
            "name": "a",
            "email": "a@example.com",
            "incoming": {"host": "pop.example.com", "username": "u", "password": "pw-1234"},
            "outgoing": {"host": "smtp.example.com"},
        }
        created = httpx.post(base + "/v1/accounts", json=body, headers=headers)
        assert created.status_code == 201, created.text
        listed = httpx.get(base + "/v1/accounts", headers=headers).json()
        assert [a["id"] for a in listed["items"]] == [created.json()["id"]]
    finally:
        out = stop(proc)
    assert "shown only this once" not in out
    assert "pw-1234" not in out


def test_bad_configuration_exits_with_a_clear_message() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    env["MAILROOM_PORT"] = "not-a-port"
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "MAILROOM_PORT" in result.stderr
