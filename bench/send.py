"""Benchmark: 2,000 messages sent through Mailroom to smtp-sink, against a bare SMTP loop.

One run compares, to the same Postfix ``smtp-sink`` on loopback:

(a) the service end to end: the real process (``python -m service`` on a free port, a
    fresh file database), 2,000 ``POST /v1/accounts/{id}/outbox`` requests of about 10 KB
    from 32 concurrent HTTP/1.1 keep-alive clients, timed from the first request until
    the outbox reports the last message ``sent`` (polled); every 202 is timed too;
(b) a bare aiosmtplib loop sending the same 2,000 messages, composed beforehand, over 20
    reused connections (``SMTP.sendmail``);
(c) ``POST .../outbox`` alone: the same requests to a fresh service whose account's SMTP
    server refuses connections (with a long retry delay, so delivery stops after its first
    try and accepting runs alone), in requests per second;
(d) the framework ceiling for (c): a bare Litestar app on the same server stack (uvicorn,
    uvloop, httptools) that decodes the same bodies with msgspec and inserts each into
    aiosqlite with a group commit at ``synchronous=FULL`` (this script, ``--serve-bare``).

The HTTP client is a minimal asyncio one, so the benchmark measures the service rather
than a client library. Runs are interleaved and repeated; medians are reported. The last
line is machine-readable::

    send: service_s=... bare_s=... vs_bare=... accept_p99_ms=... post_rps=... \
          bare_post_rps=... post_vs_bare=...

``vs_bare`` is the service's time over the bare loop's (target <= 1.5); ``accept_p99_ms``
is the 99th percentile of the time to a 202 (target <= 50); ``post_rps`` is (c) (target
>= 1,500) and ``post_vs_bare`` its share of the ceiling (d) (about 0.6 expected).

Run from the repository root: ``python bench/send.py [--messages N] [--repeat R]``
(``--delivery-process off`` compares delivery in the API process itself).
Needs ``smtp-sink`` (Debian ``postfix``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import msgspec

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


def send_bodies(messages: int) -> list[bytes]:
    text = body_text(MESSAGE_BYTES)
    return [
        json.dumps({"to": [RECIPIENT], "subject": f"bench {i}", "text": text}).encode()
        for i in range(messages)
    ]


async def run_service(
    sink: SmtpSink | None, messages: int, env_extra: dict[str, str]
) -> dict[str, Any]:
    """(a), or with no ``sink`` (c): accepting alone."""
    with tempfile.TemporaryDirectory(prefix="mailroom-bench-") as directory:
        env = {
            "MAILROOM_DATABASE": str(Path(directory) / "mailroom.db"),
            "MAILROOM_API_KEYS": API_KEY,
            "MAILROOM_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
            **env_extra,
        }
        if sink is None:
            env["MAILROOM_RETRY_DELAYS"] = "3600"  # after one refused connection: held
        proc, base = await asyncio.to_thread(start, env)
        try:
            return await _drive(base, sink, messages)
        finally:
            await asyncio.to_thread(stop if proc.poll() is None else kill, proc)


async def post_all(
    host: str, port: int, path: str, bodies: list[bytes], headers: dict[str, str], expect: int
) -> tuple[float, list[float]]:
    """POST every body from ``HTTP_CLIENTS`` keep-alive clients: (seconds, latencies)."""
    latencies: list[float] = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        connection = HTTPConnection(host, port)
        try:
            while next_index < len(bodies):
                body = bodies[next_index]
                next_index += 1
                started = time.perf_counter()
                status, reply = await connection.request("POST", path, body, headers)
                latencies.append(time.perf_counter() - started)
                assert status == expect, reply
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(HTTP_CLIENTS)))
    return time.perf_counter() - started, latencies


async def _drive(base: str, sink: SmtpSink | None, messages: int) -> dict[str, Any]:
    host, port = base.removeprefix("http://").split(":")
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    admin = HTTPConnection(host, int(port))
    # No sink: a port nothing listens on (refused at once; the account is then held).
    smtp_host, smtp_port = (sink.host, sink.port) if sink is not None else closed_port()
    account = {
        "name": "bench",
        "email": SENDER,
        "incoming": {"host": "127.0.0.1", "security": "none", "username": "b", "password": "p"},
        "outgoing": {"host": smtp_host, "port": smtp_port, "security": "none"},
    }
    status, reply = await admin.request("POST", "/v1/accounts", json.dumps(account).encode(), auth)
    assert status == 201, reply
    outbox = f"/v1/accounts/{json.loads(reply)['id']}/outbox"
    bodies = send_bodies(messages)
    started = time.perf_counter()
    accepted_s, latencies = await post_all(host, int(port), outbox, bodies, auth, 202)
    if sink is None:
        await admin.close()
        return {"accepted": accepted_s, "rps": messages / accepted_s}
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


def closed_port() -> tuple[str, int]:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return "127.0.0.1", int(sock.getsockname()[1])


# -- (d): the bare framework ceiling ------------------------------------------------------


class BareSend(msgspec.Struct, forbid_unknown_fields=True):
    to: list[str]
    subject: str
    text: str


def serve_bare(port: int, database: str) -> None:
    """A bare Litestar POST with an aiosqlite insert and group commit (``--serve-bare``)."""
    import aiosqlite
    import uvicorn
    from litestar import Litestar, post

    state: dict[str, Any] = {"pending": [], "committer": None}

    async def commit_pending(db: aiosqlite.Connection) -> None:
        try:
            while state["pending"]:
                batch, state["pending"] = state["pending"], []
                await db.executemany(
                    "INSERT INTO outbox (id, subject, recipients, body) VALUES (?, ?, ?, ?)",
                    [row for row, _ in batch],
                )
                await db.commit()
                for _, future in batch:
                    future.set_result(None)
        finally:
            state["committer"] = None

    async def startup() -> None:
        db = await aiosqlite.connect(database)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute(
            "CREATE TABLE outbox (id TEXT PRIMARY KEY, subject TEXT, recipients TEXT, body TEXT)"
        )
        state["db"] = db

    @post("/outbox", status_code=202)
    async def accept(data: BareSend) -> dict[str, str]:
        message_id = os.urandom(16).hex()
        future = asyncio.get_running_loop().create_future()
        state["pending"].append(((message_id, data.subject, ",".join(data.to), data.text), future))
        if state["committer"] is None:
            state["committer"] = asyncio.create_task(commit_pending(state["db"]))
        await future
        return {"id": message_id, "status": "queued"}

    @post("/health", status_code=200)
    async def health() -> str:
        return "ok"

    app = Litestar([accept, health], on_startup=[startup], logging_config=None)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


async def run_bare_post(messages: int) -> float:
    """(d): requests per second of the bare app for the same bodies and clients."""
    with tempfile.TemporaryDirectory(prefix="mailroom-bench-bare-") as directory:
        port = closed_port()[1]
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-bare", str(port), str(Path(directory) / "b.db")]
        )
        try:
            probe = HTTPConnection("127.0.0.1", port)
            for _ in range(300):
                try:
                    status, _ = await probe.request("POST", "/health")
                    if status == 200:
                        break
                except OSError:
                    await probe.close()
                    await asyncio.sleep(0.05)
            await probe.close()
            headers = {"Content-Type": "application/json"}
            elapsed, _ = await post_all(
                "127.0.0.1", port, "/outbox", send_bodies(messages), headers, 202
            )
            return messages / elapsed
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait)


async def main_async(args: argparse.Namespace) -> int:
    env_extra = {}
    if args.smtp_concurrency:
        env_extra["MAILROOM_SMTP_CONCURRENCY"] = str(args.smtp_concurrency)
    if args.delivery_process:
        env_extra["MAILROOM_DELIVERY_PROCESS"] = args.delivery_process
    data = prebuilt(args.messages)
    service_s: list[float] = []
    bare_s: list[float] = []
    p99: list[float] = []
    post_rps: list[float] = []
    bare_post_rps: list[float] = []
    with running_smtp_sink() as sink:
        for run in range(1, args.repeat + 1):
            bare = await run_bare(sink, data)
            result = await run_service(sink, args.messages, env_extra)
            alone = await run_service(None, args.messages, env_extra)
            ceiling = await run_bare_post(args.messages)
            bare_s.append(bare)
            service_s.append(result["elapsed"])
            p99.append(result["p99_ms"])
            post_rps.append(alone["rps"])
            bare_post_rps.append(ceiling)
            print(
                f"run {run}: service {result['elapsed']:.2f} s (all 202 after"
                f" {result['accepted']:.2f} s, p50 {result['p50_ms']:.1f} ms,"
                f" p99 {result['p99_ms']:.1f} ms), bare {bare:.2f} s; POST alone"
                f" {alone['rps']:.0f}/s, bare Litestar + aiosqlite {ceiling:.0f}/s",
                flush=True,
            )
    service_median = statistics.median(service_s)
    bare_median = statistics.median(bare_s)
    post_median = statistics.median(post_rps)
    ceiling_median = statistics.median(bare_post_rps)
    print(
        f"send: service_s={service_median:.2f} bare_s={bare_median:.2f}"
        f" vs_bare={service_median / bare_median:.2f}"
        f" accept_p99_ms={statistics.median(p99):.1f}"
        f" post_rps={post_median:.0f} bare_post_rps={ceiling_median:.0f}"
        f" post_vs_bare={post_median / ceiling_median:.2f}"
    )
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--serve-bare"]:
        serve_bare(int(sys.argv[2]), sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--repeat", type=int, default=REPEAT)
    parser.add_argument(
        "--smtp-concurrency",
        type=int,
        default=0,
        help="MAILROOM_SMTP_CONCURRENCY for the service (default: the service's default)",
    )
    parser.add_argument(
        "--delivery-process",
        choices=("auto", "on", "off"),
        default=None,
        help="MAILROOM_DELIVERY_PROCESS for the service (default: the service's default)",
    )
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
