"""Scale benchmark: send and retrieval throughput on SQLite and on 1, 2 and 4 PostgreSQL replicas.

One run measures, for each configuration in turn (repeated, medians reported):

- ``sqlite``: one process on a fresh SQLite file (the embedded default: the baseline);
- ``pg1``, ``pg2``, ``pg4``: 1, 2 or 4 real service processes (``python -m service``) on
  one fresh PostgreSQL database, sharing the work through it.

Each run starts the processes, creates ``--accounts`` accounts, then:

(a) send: ``--messages`` POST /v1/accounts/{id}/outbox requests of about 10 KB, spread over
    the accounts, from 32 keep-alive HTTP/1.1 clients spread over the replicas (client i
    talks to replica i mod N, as behind a round-robin balancer), all to one Postfix
    ``smtp-sink``. ``accepted/s``: requests over the time until the last 202;
    ``delivered/s``: requests over the time until the outbox reports every message
    ``sent`` (from the first request, polled);
(b) retrieval: each account's POP3 mailbox on Dovecot holds ``--messages / --accounts``
    messages of about 10 KB (kept on the server); one retrieval per account is triggered,
    on replica i mod N, and ``retrieved/s`` is the messages over the time until every
    retrieval has succeeded.

Everything runs on this machine, on loopback: the PostgreSQL server, every replica, Dovecot,
smtp-sink and this client share its cores, so with 2 cores more replicas cannot add CPU;
what the numbers show is the cost of sharing the work through the database, not how far
it scales on more machines.

The last line is machine-readable (messages per second)::

    scale: sqlite_accept=... sqlite_deliver=... sqlite_retrieve=... pg1_accept=... ...

Run from the repository root: ``.venv/bin/python bench/scale.py [--messages N]
[--repeat R] [--replicas 1,2,4] [--postgres DSN]``. PostgreSQL: ``--postgres`` (a DSN of a
role that may create databases), else ``MAILROOM_TEST_POSTGRES``, else
``postgresql://postgres@127.0.0.1:5432/postgres``. Needs ``smtp-sink`` (Debian
``postfix``) and ``dovecot-pop3d``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.send import HTTPConnection, body_text
from tests.process import kill, start, stop
from tests.servers.dovecot import Mailbox, running_dovecot
from tests.servers.smtp import SmtpSink, running_smtp_sink

MESSAGES = 2000
ACCOUNTS = 8
MESSAGE_BYTES = 10 * 1024
HTTP_CLIENTS = 32
REPEAT = 3
REPLICAS = (1, 2, 4)
POLL_S = 0.02
# Bound on one phase (seconds): only keeps a broken service from hanging the benchmark.
WAIT_S = int(os.environ.get("BENCH_WAIT_S", "600"))
API_KEY = "bench-key-0123456789abcdef"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
NOT_DONE = ("queued", "sending", "deferred")


@dataclass(frozen=True)
class Result:
    accept_per_s: float
    deliver_per_s: float
    retrieve_per_s: float


def pop3_message(i: int) -> bytes:
    head = (
        f"From: Sender {i} <sender{i}@example.com>\nTo: you@example.com\n"
        f"Subject: Scale message {i}\nMessage-ID: <{i}@scale.example>\n"
        "Date: Thu, 26 Nov 2026 07:00:00 +0000\n\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\n"
    return head + line * ((MESSAGE_BYTES - len(head)) // len(line))


class Deployment:
    """N service processes on one store, started together and stopped together."""

    def __init__(self, database: str, replicas: int) -> None:
        self.env = {
            "MAILROOM_DATABASE": database,
            "MAILROOM_API_KEYS": API_KEY,
            "MAILROOM_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
        }
        self.count = replicas
        self.processes: list[Any] = []
        self.bases: list[str] = []

    async def __aenter__(self) -> Deployment:
        # The first one migrates the schema; the others then start together.
        for batch in ([0], list(range(1, self.count))):
            started = await asyncio.gather(
                *(asyncio.to_thread(start, self.env) for _ in batch), return_exceptions=True
            )
            for item in started:
                if isinstance(item, BaseException):
                    await self.__aexit__()
                    raise item
                self.processes.append(item[0])
                self.bases.append(item[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(
            *(
                asyncio.to_thread(stop if proc.poll() is None else kill, proc)
                for proc in self.processes
            )
        )


def connection(base: str) -> HTTPConnection:
    host, port = base.removeprefix("http://").split(":")
    return HTTPConnection(host, int(port))


AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


async def create_accounts(
    base: str, sink: SmtpSink, mailboxes: Sequence[Mailbox], pop3_port: int
) -> list[str]:
    admin = connection(base)
    ids = []
    for i, mailbox in enumerate(mailboxes):
        account = {
            "name": f"scale {i}",
            "email": f"scale{i}@example.com",
            "incoming": {
                "host": "127.0.0.1",
                "port": pop3_port,
                "security": "none",
                "username": mailbox.user,
                "password": mailbox.password,
            },
            "outgoing": {"host": sink.host, "port": sink.port, "security": "none"},
        }
        status, reply = await admin.request(
            "POST", "/v1/accounts", json.dumps(account).encode(), AUTH
        )
        assert status == 201, reply
        ids.append(json.loads(reply)["id"])
    await admin.close()
    return ids


async def run_sends(
    bases: Sequence[str], accounts: Sequence[str], messages: int
) -> tuple[float, float]:
    """Seconds until the last 202, and until every message is sent."""
    text = body_text(MESSAGE_BYTES)
    requests = [
        (
            f"/v1/accounts/{accounts[i % len(accounts)]}/outbox",
            json.dumps(
                {"to": ["rcpt@example.net"], "subject": f"scale {i}", "text": text}
            ).encode(),
        )
        for i in range(messages)
    ]
    next_index = 0

    async def client(number: int) -> None:
        nonlocal next_index
        http = connection(bases[number % len(bases)])
        try:
            while next_index < len(requests):
                path, body = requests[next_index]
                next_index += 1
                status, reply = await http.request("POST", path, body, AUTH)
                assert status == 202, reply
        finally:
            await http.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(HTTP_CLIENTS)))
    accepted = time.perf_counter() - started
    admin = connection(bases[0])
    deadline = time.monotonic() + WAIT_S
    pending = list(accounts)
    while pending:
        account = pending[0]
        busy = False
        for state in NOT_DONE:
            status, reply = await admin.request(
                "GET", f"/v1/accounts/{account}/outbox?status={state}&limit=1", b"", AUTH
            )
            assert status == 200, reply
            if json.loads(reply)["items"]:
                busy = True
                break
        if busy:
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not send everything in time")
            await asyncio.sleep(POLL_S)
        else:
            pending.pop(0)
    delivered = time.perf_counter() - started
    for account in accounts:
        status, reply = await admin.request(
            "GET", f"/v1/accounts/{account}/outbox?status=failed&limit=1", b"", AUTH
        )
        assert not json.loads(reply)["items"], f"messages failed: {reply[:500]!r}"
    await admin.close()
    return accepted, delivered


async def run_retrievals(bases: Sequence[str], accounts: Sequence[str], expect: int) -> float:
    """Seconds from the triggers until every retrieval has succeeded."""
    https = [connection(base) for base in bases]
    started = time.perf_counter()
    triggered = []
    for i, account in enumerate(accounts):
        http = https[i % len(https)]
        status, reply = await http.request("POST", f"/v1/accounts/{account}/retrievals", b"", AUTH)
        assert status == 202, reply
        triggered.append((http, account, json.loads(reply)["id"]))
    deadline = time.monotonic() + WAIT_S
    downloaded = 0
    for http, account, retrieval in triggered:
        while True:
            status, reply = await http.request(
                "GET", f"/v1/accounts/{account}/retrievals/{retrieval}", b"", AUTH
            )
            state = json.loads(reply)
            if state["status"] in ("succeeded", "failed"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the retrievals did not finish in time")
            await asyncio.sleep(POLL_S)
        if state["status"] != "succeeded":
            raise RuntimeError(f"retrieval failed: {state}")
        downloaded += state["messages_downloaded"]
    elapsed = time.perf_counter() - started
    for http in https:
        await http.close()
    if downloaded != expect:
        raise RuntimeError(f"downloaded {downloaded} messages, expected {expect}")
    return elapsed


async def run_once(
    database: str,
    replicas: int,
    sink: SmtpSink,
    mailboxes: Sequence[Mailbox],
    pop3_port: int,
    messages: int,
) -> Result:
    async with Deployment(database, replicas) as deployment:
        accounts = await create_accounts(deployment.bases[0], sink, mailboxes, pop3_port)
        accepted, delivered = await run_sends(deployment.bases, accounts, messages)
        in_mailboxes = sum(mailbox.count() for mailbox in mailboxes)
        retrieved = await run_retrievals(deployment.bases, accounts, in_mailboxes)
    return Result(messages / accepted, messages / delivered, in_mailboxes / retrieved)


class Postgres:
    """Fresh databases on a PostgreSQL server, dropped at the end."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.created: list[str] = []

    async def fresh(self) -> str:
        name = f"mr_scale_{secrets.token_hex(4)}"
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        self.created.append(name)
        return urlunsplit(urlsplit(self.admin_dsn)._replace(path=f"/{name}"))

    async def drop_all(self) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            for name in self.created:
                await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


async def main_async(args: argparse.Namespace) -> int:
    replica_counts = [int(n) for n in args.replicas.split(",") if n.strip()]
    configs = [("sqlite", 1), *((f"pg{n}", n) for n in replica_counts)]
    results: dict[str, list[Result]] = {name: [] for name, _ in configs}
    postgres = Postgres(args.postgres)
    per_account = args.messages // args.accounts
    with running_smtp_sink() as sink, running_dovecot(ssl="no") as dovecot:
        mailboxes = [dovecot.add_user() for _ in range(args.accounts)]
        for number, mailbox in enumerate(mailboxes):
            mailbox.deliver_many(pop3_message(number * per_account + i) for i in range(per_account))
        print(
            f"{args.messages} sends and {per_account * args.accounts} retrieved messages of about"
            f" {MESSAGE_BYTES // 1024} KB per run, {args.accounts} accounts, {os.cpu_count()} CPUs",
            flush=True,
        )
        try:
            for run in range(1, args.repeat + 1):
                # Interleaved, so a slow moment of the machine does not hit one config only.
                for name, replicas in configs:
                    with tempfile.TemporaryDirectory(prefix="mailroom-scale-") as directory:
                        if name == "sqlite":
                            database = f"sqlite:///{Path(directory) / 'mailroom.db'}"
                        else:
                            database = await postgres.fresh()
                        result = await run_once(
                            database, replicas, sink, mailboxes, dovecot.pop3_port, args.messages
                        )
                    results[name].append(result)
                    print(
                        f"run {run} {name:<6}: accepted {result.accept_per_s:7.0f}/s,"
                        f" delivered {result.deliver_per_s:7.0f}/s,"
                        f" retrieved {result.retrieve_per_s:7.0f}/s",
                        flush=True,
                    )
        finally:
            await postgres.drop_all()
    fields = []
    print(f"{'config':<8}{'accepted/s':>12}{'delivered/s':>13}{'retrieved/s':>13}  (medians)")
    for name, _ in configs:
        accept = statistics.median(r.accept_per_s for r in results[name])
        deliver = statistics.median(r.deliver_per_s for r in results[name])
        retrieve = statistics.median(r.retrieve_per_s for r in results[name])
        print(f"{name:<8}{accept:>12.0f}{deliver:>13.0f}{retrieve:>13.0f}")
        fields += [
            f"{name}_accept={accept:.0f}",
            f"{name}_deliver={deliver:.0f}",
            f"{name}_retrieve={retrieve:.0f}",
        ]
    print("scale: " + " ".join(fields))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--accounts", type=int, default=ACCOUNTS)
    parser.add_argument("--repeat", type=int, default=REPEAT)
    parser.add_argument("--replicas", default=",".join(str(n) for n in REPLICAS), help="e.g. 1,2,4")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("MAILROOM_TEST_POSTGRES", DEFAULT_POSTGRES),
        help="DSN of a PostgreSQL role that may create databases",
    )
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
