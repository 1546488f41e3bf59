"""Running the real service process (``python -m service``) for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 30
_logs: dict[int, IO[str]] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(
    env_extra: dict[str, str], *, port: int | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start the service with ``env_extra`` on ``port`` (default: a free one); wait for /health.

    A fixed ``port`` restarts a replica where its clients expect it. Output goes to a
    temporary file (a pipe nobody reads could fill and block the service); ``stop`` and
    ``output`` read it back.
    """
    port = free_port() if port is None else port
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    env.update({"MAILROOM_PORT": str(port), **env_extra})
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _logs[proc.pid] = log
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"service exited: {output(proc)}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("service did not start")


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, wait, and check the shutdown was graceful; returns all output."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    out = output(proc)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out, out
    return out


def kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL: no shutdown code runs, as in a crash."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def output(proc: subprocess.Popen[str]) -> str:
    """Everything the process has printed so far."""
    log = _logs[proc.pid]
    log.seek(0)
    return log.read()
