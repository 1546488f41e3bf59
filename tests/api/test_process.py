"""The real process: ``python -m service`` on a free port, spoken to over HTTP."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(env_extra: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    env.update({"MAILROOM_PORT": str(port), **env_extra})
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"service exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("service did not start")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out, out
    return out


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
