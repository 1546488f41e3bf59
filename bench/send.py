"""Benchmark: 2,000 messages sent through Mailroom to smtp-sink, against a bare SMTP loop.

One run compares, to the same Postfix ``smtp-sink`` on loopback:

(a) the service end to end: the real process (``python -m service`` on a free port, a
    fresh file database), 2,000 ``POST /v1/accounts/{id}/outbox`` requests of about 10 KB
    from 32 concurrent HTTP/1.1 keep-alive clients, timed from the first request until
    the outbox reports the last message ``sent`` (polled); every 202 is timed too;
(b) a bare aiosmtplib loop sending the same 2,000 messages, composed beforehand, over 20
    reused connections (``SMTP.sendmail``).

The HTTP client is a minimal asyncio one, so the benchmark measures the service rather
than a client library. Runs are interleaved and repeated; medians are reported. The last
line is machine-readable::

    send: service_s=... bare_s=... vs_bare=... accept_p99_ms=...

``vs_bare`` is the service's time over the bare loop's (target <= 1.5); ``accept_p99_ms``
is the 99th percentile of the time to a 202 (target <= 50).

Run from the repository root: ``python bench/send.py [--messages N] [--repeat R]``.
Needs ``smtp-sink`` (Debian ``postfix``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.mail import Draft, compose
from tests.process import kill, start, stop
from tests.servers.smtp import SmtpSink, running_smtp_sink

MESSAGES = 2000
MESSAGE_BYTES = 10 * 1024
HTTP_CLIENTS = 32
BARE_CONNECTIONS = 20
REPEAT = 5
POLL_S = 0.01
# Bound on one run (seconds): only keeps a broken service from hanging the benchmark.
WAIT_S = int(os.environ.get("BENCH_WAIT_S", "600"))
API_KEY = "bench-key-0123456789abcdef"
SENDER = "bench@example.com"
RECIPIENT = "rcpt@example.net"
LINE = "The quick brown fox jumps over the lazy dog, again and again and again.\n"
NOT_DONE = ("queued", "sending", "deferred")


def body_text(size: int) -> str:
    """About ``size`` bytes of plain text, with a few lines that start with a dot."""
    lines = []
    total = 0
    while total < size:
        line = ".a line that starts with a dot\n" if len(lines) % 20 == 0 else LINE
        lines.append(line)
        total += len(line)
    return "".join(lines)


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection: just enough client for this benchmark."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        head += [f"Content-Length: {len(body)}", "", ""]
        request = "\r\n".join(head).encode() + body
        status_line = b""
        for _ in range(2):  # the server closes idle keep-alive connections: reconnect once
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            assert self._reader is not None
            self._writer.write(request)
            status_line = await self._reader.readline()
            if status_line:
                break
            await self.close()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self._reader.readexactly(length)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def run_service(sink: SmtpSink, messages: int, env_extra: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mailroom-bench-") as directory:
        env = {
            "MAILROOM_DATABASE": str(Path(directory) / "mailroom.db"),
            "MAILROOM_API_KEYS": API_KEY,
            "MAILROOM_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
            **env_extra,
        }
        proc, base = await asyncio.to_thread(start, env)
        try:
            return await _drive(base, sink, messages)
        finally:
            await asyncio.to_thread(stop if proc.poll() is None else kill, proc)


async def _drive(base: str, sink: SmtpSink, messages: int) -> dict[str, Any]:
    host, port = base.removeprefix("http://").split(":")
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    admin = HTTPConnection(host, int(port))
    account = {
        "name": "bench",
        "email": SENDER,
        "incoming": {"host": "127.0.0.1", "security": "none", "username": "b", "password": "p"},
        "outgoing": {"host": sink.host, "port": sink.port, "security": "none"},
    }
    status, reply = await admin.request("POST", "/v1/accounts", json.dumps(account).encode(), auth)
    assert status == 201, reply
    outbox = f"/v1/accounts/{json.loads(reply)['id']}/outbox"
    text = body_text(MESSAGE_BYTES)
    bodies = [
        json.dumps({"to": [RECIPIENT], "subject": f"bench {i}", "text": text}).encode()
        for i in range(messages)
    ]
    latencies: list[float] = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        connection = HTTPConnection(host, int(port))
        try:
            while next_index < messages:
                body = bodies[next_index]
                next_index += 1
                started = time.perf_counter()
                status, reply = await connection.request("POST", outbox, body, auth)
                latencies.append(time.perf_counter() - started)
                assert status == 202, reply
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(HTTP_CLIENTS)))
    accepted_s = time.perf_counter() - started
    deadline = time.monotonic() + WAIT_S
    while True:
        pending = False
        for state in NOT_DONE:
            status, reply = await admin.request(
                "GET", f"{outbox}?status={state}&limit=1", b"", auth
            )
            assert status == 200, reply
            if json.loads(reply)["items"]:
                pending = True
                break
        if not pending:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not send everything in time")
        await asyncio.sleep(POLL_S)
    elapsed = time.perf_counter() - started
    status, reply = await admin.request("GET", f"{outbox}?status=failed&limit=1", b"", auth)
    assert not json.loads(reply)["items"], f"messages failed: {reply[:500]!r}"
    await admin.close()
    return {
        "elapsed": elapsed,
        "accepted": accepted_s,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": statistics.quantiles(latencies, n=100)[98] * 1000,
    }


def prebuilt(messages: int) -> list[bytes]:
    text = body_text(MESSAGE_BYTES)
    now = datetime.now(UTC)
    return [
        compose(
            Draft(
                from_address=SENDER,
                from_name="bench",
                to=[RECIPIENT],
                subject=f"bench {i}",
                message_id=f"<bench.{i}@example.com>",
                date=now,
                text=text,
            )
        ).data
        for i in range(messages)
    ]


async def run_bare(sink: SmtpSink, data: list[bytes]) -> float:
    queue = iter(data)

    async def connection() -> None:
        smtp = aiosmtplib.SMTP(
            hostname=sink.host, port=sink.port, local_hostname="bench.local", start_tls=False
        )
        await smtp.connect()
        for message in queue:
            await smtp.sendmail(SENDER, [RECIPIENT], message)
        await smtp.quit()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(BARE_CONNECTIONS)))
    return time.perf_counter() - started


async def main_async(args: argparse.Namespace) -> int:
    env_extra = {}
    if args.smtp_concurrency:
        env_extra["MAILROOM_SMTP_CONCURRENCY"] = str(args.smtp_concurrency)
    data = prebuilt(args.messages)
    service_s: list[float] = []
    bare_s: list[float] = []
    p99: list[float] = []
    with running_smtp_sink() as sink:
        for run in range(1, args.repeat + 1):
            bare = await run_bare(sink, data)
            result = await run_service(sink, args.messages, env_extra)
            bare_s.append(bare)
            service_s.append(result["elapsed"])
            p99.append(result["p99_ms"])
            print(
                f"run {run}: service {result['elapsed']:.2f} s (all 202 after"
                f" {result['accepted']:.2f} s, p50 {result['p50_ms']:.1f} ms,"
                f" p99 {result['p99_ms']:.1f} ms), bare {bare:.2f} s",
                flush=True,
            )
    service_median = statistics.median(service_s)
    bare_median = statistics.median(bare_s)
    print(
        f"send: service_s={service_median:.2f} bare_s={bare_median:.2f}"
        f" vs_bare={service_median / bare_median:.2f}"
        f" accept_p99_ms={statistics.median(p99):.1f}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--repeat", type=int, default=REPEAT)
    parser.add_argument(
        "--smtp-concurrency",
        type=int,
        default=0,
        help="MAILROOM_SMTP_CONCURRENCY for the service (default: the service's default)",
    )
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
