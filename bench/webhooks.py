"""Webhook delivery: commit-to-arrival latency at a steady event rate, and events per second
with 1 and 10 endpoints, against a local receiver (another process) that answers at once.

Baseline in the same run: a bare loop of signed HTTP POSTs to the same receiver (the same
HTTP client and concurrency, no store), so the figures read as a ratio to what the
receiver and the loopback allow on this machine.

The store is a temporary SQLite file (``--database postgresql://...`` for PostgreSQL);
events are inserted the way the service does (``insert_events`` in a transaction) and the
time of each commit is taken right after it; the receiver notes each arrival; the
latency is arrival minus commit. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.config import Settings
from service.crypto import CredentialCipher
from service.domain.events import EventType, new_event
from service.netguard import ConnectionGuard
from service.repository.store import Store, create_store
from service.services.webhooks import (
    RetryPolicy,
    WebhookDispatcher,
    WebhookSender,
    WebhookService,
    new_secret,
    signature_header,
)

RATE = 500  # events per second for the latency run
SECONDS = 10
PER_COMMIT = 10  # events per transaction in the latency run
BURST = 3000  # events for the throughput runs
BATCH = 50  # events per transaction in the throughput runs
CONCURRENCY = 8


# -- the receiver (a process of its own) ------------------------------------------------------


def serve(port_queue: Any) -> None:
    async def run() -> None:
        arrivals: list[tuple[str, float]] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # HTTP/1.1 keep-alive: requests on one connection until the client closes it.
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    now = time.time()
                    lines = head.decode("latin-1").split("\r\n")
                    headers = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                    length = int(headers.get("content-length", "0"))
                    if length:
                        await reader.readexactly(length)
                    dumping = lines[0].startswith("GET /dump")
                    if dumping:
                        body = json.dumps(arrivals).encode()
                        arrivals.clear()
                    else:
                        arrivals.append((headers.get("webhook-id", ""), now))
                        body = b"ok"
                    close = b"Connection: close\r\n" if dumping else b""
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: "
                        + str(len(body)).encode()
                        + b"\r\n"
                        + close
                        + b"\r\n"
                        + body
                    )
                    await writer.drain()
                    if dumping:
                        return
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        port_queue.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(run())


async def dump(port: int) -> list[tuple[str, float]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /dump HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    return [tuple(x) for x in json.loads(data.split(b"\r\n\r\n", 1)[1])]


# -- the runs -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def insert(store: Store, count: int) -> list[str]:
    ids = []
    events = [
        new_event(
            EventType.MESSAGE_RECEIVED,
            tenant="default",
            account_id="acc_bench",
            created_at=datetime.now(UTC),
            data={"message_id": f"msg_{n}", "subject": "bench", "size": 1000},
        )
        for n in range(count)
    ]
    db: Any = store.db  # type: ignore[attr-defined]
    module: Any
    if store.kind == "postgres":
        from service.repository.postgres import events as module
    else:
        from service.repository import events as module
    async with db.transaction() as conn:
        await module.insert_events(conn, events)
    ids += [e.id for e in events]
    return ids


async def wait_arrivals(port: int, want: set[str], bound_s: float = 120) -> dict[str, float]:
    got: dict[str, float] = {}
    deadline = time.monotonic() + bound_s
    while not want <= got.keys() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        for msg_id, at in await dump(port):
            got.setdefault(msg_id, at)
    return got


async def baseline(port: int, count: int) -> float:
    """Requests per second of bare signed POSTs (same client, same concurrency)."""
    sender = WebhookSender(
        ConnectionGuard((ipaddress.ip_network("127.0.0.0/8"),)), timeout_s=10, ca_file=None
    )
    secret = new_secret()
    url = f"http://127.0.0.1:{port}/hook"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            n = queue.get_nowait()
            body = json.dumps({"id": f"evt_{n}", "data": {"n": n}}).encode()
            stamp = int(time.time())
            await sender.post(
                url,
                body,
                {
                    "webhook-id": f"base_{n}",
                    "webhook-timestamp": str(stamp),
                    "webhook-signature": signature_header([secret], f"base_{n}", stamp, body),
                },
            )

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    await dump(port)
    return count / elapsed


async def run(args: argparse.Namespace) -> int:
    ctx = multiprocessing.get_context("spawn")
    port_queue = ctx.Queue()
    receiver = ctx.Process(target=serve, args=(port_queue,), daemon=True)
    receiver.start()
    port = int(port_queue.get(timeout=30))
    tmp = tempfile.mkdtemp(prefix="mailroom-bench-webhooks-")
    database = args.database or str(Path(tmp) / "bench.db")
    settings = Settings(database=database, secret_keys=(os.urandom(32),))
    store = create_store(settings)
    await store.open()
    cipher = CredentialCipher(settings.secret_keys)
    sender = WebhookSender(
        ConnectionGuard((ipaddress.ip_network("127.0.0.0/8"),)), timeout_s=10, ca_file=None
    )
    service = WebhookService(store.webhooks, store.accounts, cipher, sender, secret_grace_s=60)
    dispatcher = WebhookDispatcher(
        store.webhooks,
        service,
        sender,
        store.notifier,
        owner="rep_bench",
        exclusive=store.kind == "sqlite",
        policy=RetryPolicy(base_s=1, max_s=10, window_s=3600),
        concurrency=CONCURRENCY,
        timeout_s=10,
    )
    await store.notifier.start()
    await dispatcher.start()
    url = f"http://127.0.0.1:{port}/hook"
    try:
        await baseline(port, args.burst // 4)  # warm-up
        base_rps = max([await baseline(port, args.burst) for _ in range(2)])

        first, _ = await service.create(
            "default", url=url, events=["*"], account_ids=None, enabled=True, description=None
        )
        await asyncio.sleep(2.5)  # the dispatcher has picked the endpoint up (its poll)
        # Latency at a steady rate: ``per_commit`` events per transaction (a retrieval
        # commits its messages in batches; a delivery writer its outcomes).
        commits: dict[str, float] = {}
        interval = 1.0 / args.rate

        async def one() -> None:
            ids = await insert(store, args.per_commit)
            at = time.time()
            for event_id in ids:
                commits[event_id] = at

        start = time.perf_counter()
        pending = []
        for n in range(args.rate * args.seconds // args.per_commit):
            delay = start + n * interval * args.per_commit - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            # Each commit in a task of its own, as requests would: a slow commit does not
            # hold back the next one's start (they queue on the writer, as in the service).
            pending.append(asyncio.create_task(one()))
        await asyncio.gather(*pending)
        achieved = len(commits) / (time.perf_counter() - start)
        arrivals = await wait_arrivals(port, set(commits))
        latencies = [(arrivals[i] - commits[i]) * 1000 for i in commits if i in arrivals]
        lost = len(commits) - len(latencies)

        async def throughput() -> float:
            want: set[str] = set()
            started = time.perf_counter()
            for _ in range(args.burst // BATCH):
                want |= set(await insert(store, BATCH))
            await wait_arrivals(port, want)
            return len(want) / (time.perf_counter() - started)

        eps_1 = await throughput()
        for _ in range(9):
            await service.create(
                "default",
                url=url,
                events=["*"],
                account_ids=None,
                enabled=True,
                description=None,
            )
        await asyncio.sleep(2.5)

        async def throughput_all(endpoints: int) -> float:
            started = time.perf_counter()
            want: list[str] = []
            for _ in range(args.burst // BATCH):
                want += await insert(store, BATCH)
            expected = len(want) * endpoints
            seen = 0
            deadline = time.monotonic() + 300
            while seen < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                seen += len(await dump(port))
            return len(want) / (time.perf_counter() - started)

        eps_10 = await throughput_all(10)
        del first
    finally:
        await dispatcher.stop()
        await store.notifier.stop()
        await store.close()
        receiver.kill()
    p50 = statistics.median(latencies)
    p99 = percentile(latencies, 0.99)
    print(f"baseline: bare signed POSTs, concurrency {CONCURRENCY}: {base_rps:.0f} req/s")
    print(
        f"latency at {achieved:.0f} events/s (target {args.rate}, {args.per_commit} per"
        " commit), commit to arrival:"
        f" p50 {p50:.1f} ms, p99 {p99:.1f} ms, lost {lost}"
    )
    print(f"throughput, 1 endpoint: {eps_1:.0f} events/s ({eps_1 / base_rps:.2f} of bare)")
    print(
        f"throughput, 10 endpoints: {eps_10:.0f} events/s"
        f" ({eps_10 * 10:.0f} deliveries/s, {eps_10 * 10 / base_rps:.2f} of bare)"
    )
    print(
        f"store={store.kind} rate={achieved:.0f} p50_ms={p50:.1f} p99_ms={p99:.1f}"
        f" lost={lost} eps_1={eps_1:.0f} eps_10={eps_10:.0f} bare_rps={base_rps:.0f}"
        f" vs_bare_1={eps_1 / base_rps:.2f}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=RATE)
    parser.add_argument("--seconds", type=int, default=SECONDS)
    parser.add_argument(
        "--per-commit", type=int, default=PER_COMMIT, help="events per transaction (latency run)"
    )
    parser.add_argument("--burst", type=int, default=BURST)
    parser.add_argument("--database", default=None, help="default: a temporary SQLite file")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
