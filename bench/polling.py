"""Scheduled polling benchmark: many accounts on empty Dovecot mailboxes, polled on schedule.

Run from the repository root::

    .venv/bin/python bench/polling.py [--accounts 2000] [--interval-minutes 1] [--cycles 2]
    .venv/bin/python bench/polling.py --accounts 10000 --interval-minutes 5    # the target
    .venv/bin/python bench/polling.py --profile 400                            # cProfile

One Mailroom app runs in this process, on uvloop as ``python -m service`` runs it
(``--loop asyncio``: the standard library's loop), with default settings (SQLite, 8
retrieval slots, 15 s scheduler tick, first polls spread over min(interval, 5 min)); only
the database, the API key, the allowed networks and the CA file are set. N accounts are
created over the API with a poll interval, each on its own empty Dovecot mailbox. After one
interval of warm-up (the first, spread, polls), the scheduler's polls are watched for
``--cycles`` intervals:

- polls/s: scheduled polls started in the window / its length (the ideal is N / interval);
- lateness: for each poll, when the scheduler started it minus when it was due (p50, p99,
  max; the target: none later than 30 s);
- CPU ms per empty poll: this process's CPU time (every thread) over the window / polls.

The baseline, in the same run and process: a bare asyncio POP3 empty poll (connect, USER,
PASS, UIDL, QUIT; no store, no scheduler) at 8 at a time on the same loop, over the same
mailboxes: its CPU per poll is the floor. Plain POP3 first, then implicit TLS (``--modes
plain,tls``).

``--profile K``: K empty polls through the retrieval service (the scheduler's trigger),
8 at a time: CPU per poll without the profiler, then cProfile's top functions. Run it with
``PYTHONPATH`` pointing at an older checkout to profile that code the same way (run from
that checkout's directory: this script puts its own checkout first on the path).
Environment: ``BENCH_ROWS`` (how many functions to list, 18), ``BENCH_CUMULATIVE`` (a
pattern: also list those functions by cumulative time), ``BENCH_CALLERS`` (a pattern: who
calls them).

The last line is machine-readable (``key=value`` pairs).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ipaddress
import os
import pstats
import sqlite3
import ssl
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.app import create_app
from service.config import ApiKey, Settings
from service.domain.time import utcnow
from service.services import scheduler as scheduler_module
from tests.servers.dovecot import Dovecot, Mailbox, running_dovecot

KEY = "bench-key-0123456789abcdef"
BARE_CONCURRENCY = 8  # the service's default retrieval slots
CREATE_CONCURRENCY = 16
LATE_LIMIT_S = 30.0


def settings_for(tmp: str, dovecot: Dovecot, **overrides: Any) -> Settings:
    return Settings(
        database=f"{tmp}/mailroom.db",
        api_keys=(ApiKey("default", KEY),),
        secret_keys=(os.urandom(32),),
        allowed_networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        ca_file=dovecot.ca_file,
        **overrides,
    )


def account_body(dovecot: Dovecot, mailbox: Mailbox, tls: bool, minutes: int | None) -> Any:
    return {
        "name": mailbox.user,
        "email": f"{mailbox.user}@example.com",
        "incoming": {
            "host": dovecot.hostname if tls else dovecot.host,
            "port": dovecot.pop3s_port if tls else dovecot.pop3_port,
            "security": "tls" if tls else "none",
            "username": mailbox.user,
            "password": mailbox.password,
        },
        "outgoing": {"host": "127.0.0.1", "port": 25, "security": "none"},
        "retrieval": {"poll_interval_minutes": minutes} if minutes else {},
    }


async def create_accounts(
    client: httpx.AsyncClient,
    dovecot: Dovecot,
    mailboxes: list[Mailbox],
    tls: bool,
    minutes: int | None,
) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(mailboxes), CREATE_CONCURRENCY):
        chunk = mailboxes[start : start + CREATE_CONCURRENCY]
        responses = await asyncio.gather(
            *(
                client.post("/v1/accounts", json=account_body(dovecot, m, tls, minutes))
                for m in chunk
            )
        )
        for response in responses:
            if response.status_code != 201:
                raise SystemExit(f"account not created: {response.status_code} {response.text}")
            ids.append(response.json()["id"])
    return ids


# The baseline: a bare asyncio empty poll ---------------------------------------------------


async def bare_poll(dovecot: Dovecot, mailbox: Mailbox, context: ssl.SSLContext | None) -> None:
    port = dovecot.pop3s_port if context else dovecot.pop3_port
    host = dovecot.hostname if context else dovecot.host
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname=host if context else None
    )
    try:
        if not (await reader.readline()).startswith(b"+OK"):
            raise SystemExit("bare poll: no greeting")
        for command in (f"USER {mailbox.user}", f"PASS {mailbox.password}"):
            writer.write(command.encode() + b"\r\n")
            if not (await reader.readline()).startswith(b"+OK"):
                raise SystemExit(f"bare poll: {command.split()[0]} refused")
        writer.write(b"UIDL\r\n")
        line = await reader.readline()
        while line != b".\r\n":
            line = await reader.readline()
        writer.write(b"QUIT\r\n")
        await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()


async def run_bare(
    dovecot: Dovecot, mailboxes: list[Mailbox], polls: int, tls: bool
) -> dict[str, float]:
    context = ssl.create_default_context(cafile=dovecot.ca_file) if tls else None
    queue = [mailboxes[i % len(mailboxes)] for i in range(polls)]

    async def worker() -> None:
        while queue:
            await bare_poll(dovecot, queue.pop(), context)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(BARE_CONCURRENCY)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_ms": cpu * 1000 / polls, "polls_per_s": polls / wall}


# The service on schedule -------------------------------------------------------------------


class StartWatch:
    """Records, for every poll the scheduler starts, when and how late (start - due)."""

    def __init__(self) -> None:
        self.starts: list[tuple[float, float]] = []  # (monotonic time, lateness in s)
        self._original = scheduler_module.Scheduler._start

    def install(self) -> None:
        original, starts = self._original, self.starts

        async def watched(self: Any, account: Any, due: datetime) -> bool:
            starts.append((time.monotonic(), (utcnow() - due).total_seconds()))
            result: bool = await original(self, account, due)
            return result

        scheduler_module.Scheduler._start = watched  # type: ignore[method-assign]

    def remove(self) -> None:
        scheduler_module.Scheduler._start = self._original  # type: ignore[method-assign]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


async def run_service(
    dovecot: Dovecot, mailboxes: list[Mailbox], minutes: int, cycles: int, tls: bool
) -> dict[str, float]:
    watch = StartWatch()
    watch.install()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = settings_for(tmp, dovecot)
            app = create_app(settings)
            tick_s = settings.scheduler_interval_s
            async with (
                app.lifespan(),
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app),
                    base_url="http://bench",
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=60,
                ) as client,
            ):
                made = time.perf_counter()
                await create_accounts(client, dovecot, mailboxes, tls, minutes)
                made = time.perf_counter() - made
                interval_s = minutes * 60
                print(
                    f"  {len(mailboxes)} accounts created in {made:.1f} s;"
                    f" warm-up {interval_s + tick_s:.0f} s"
                )
                await asyncio.sleep(interval_s + tick_s)
                first_cycle = [late for _, late in watch.starts]
                begin, cpu = time.monotonic(), time.process_time()
                window = cycles * interval_s
                await asyncio.sleep(window)
                end, cpu = time.monotonic(), time.process_time() - cpu
            db = sqlite3.connect(f"{tmp}/mailroom.db")
            statuses = dict(
                db.execute("SELECT status, count(*) FROM retrievals GROUP BY status").fetchall()
            )
            # Failures other than the polls cut short by this run's end (``interrupted``).
            failed = db.execute(
                "SELECT count(*) FROM retrievals WHERE status = 'failed'"
                " AND error_code IS NOT 'interrupted'"
            ).fetchone()[0]
            db.close()
    finally:
        watch.remove()
    late = [lateness for at, lateness in watch.starts if begin <= at < end]
    polls = len(late)
    if not polls:
        raise SystemExit("no poll started in the window")
    print(f"  retrievals by status: {statuses}")
    return {
        "polls": polls,
        "polls_per_s": polls / (end - begin),
        "ideal_per_s": len(mailboxes) / interval_s,
        "late_p50_s": percentile(late, 50),
        "late_p99_s": percentile(late, 99),
        "late_max_s": max(late),
        "late_over_30s": sum(1 for x in late if x > LATE_LIMIT_S),
        "first_cycle_late_max_s": max(first_cycle) if first_cycle else 0.0,
        "cpu_ms": cpu * 1000 / polls,
        "failed": failed,
    }


# cProfile of empty polls through the service -----------------------------------------------


async def run_profile(dovecot: Dovecot, mailboxes: list[Mailbox], polls: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(settings_for(tmp, dovecot, scheduler_interval_s=3600.0))
        async with (
            app.lifespan(),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://bench",
                headers={"Authorization": f"Bearer {KEY}"},
            ) as client,
        ):
            ids = await create_accounts(client, dovecot, mailboxes[:BARE_CONCURRENCY], False, None)
            service = app.state.retrievals
            accounts = [await app.state.accounts.get("default", i) for i in ids]

            async def one_round() -> None:
                for account in accounts:
                    if hasattr(service, "poll"):  # the scheduler's trigger now
                        await service.poll(account)
                    else:  # before: the scheduler's trigger with its not_after check
                        await service.trigger_scheduled(account, not_after=utcnow())
                await service.wait_idle()

            rounds = max(1, polls // len(accounts))
            await one_round()  # warm-up: connections, caches, imports
            cpu, main = time.process_time(), time.thread_time()
            for _ in range(rounds):
                await one_round()
            cpu, main = time.process_time() - cpu, time.thread_time() - main
            # CPU time of the event-loop thread (the store's threads are not profiled).
            profiler = cProfile.Profile(time.thread_time)
            profiler.enable()
            for _ in range(rounds):
                await one_round()
            profiler.disable()
        stats = pstats.Stats(profiler).sort_stats("tottime")
        print(
            f"  cProfile of {rounds * len(accounts)} empty polls (event-loop thread), by own time:"
        )
        stats.print_stats(int(os.environ.get("BENCH_ROWS", "18")))
        if os.environ.get("BENCH_CUMULATIVE"):
            stats.sort_stats("cumulative").print_stats(os.environ["BENCH_CUMULATIVE"], 40)
        if os.environ.get("BENCH_CALLERS"):
            stats.print_callers(os.environ["BENCH_CALLERS"])
        statuses = dict(
            sqlite3.connect(f"{tmp}/mailroom.db")
            .execute("SELECT status, count(*) FROM retrievals GROUP BY status")
            .fetchall()
        )
    print(f"  retrievals by status: {statuses}")
    polls = rounds * len(accounts)
    print(
        f"  CPU per empty poll: {cpu * 1000 / polls:.3f} ms in all, of which"
        f" {main * 1000 / polls:.3f} ms on the event-loop thread"
    )
    return {"cpu_ms": cpu * 1000 / polls}


async def main_async(args: argparse.Namespace) -> None:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with running_dovecot() as dovecot:
        made = time.perf_counter()
        mailboxes = [dovecot.add_user() for _ in range(args.accounts)]
        print(f"Dovecot: {len(mailboxes)} empty mailboxes ({time.perf_counter() - made:.1f} s)")
        if args.profile:
            bare = await run_bare(dovecot, mailboxes, args.profile, False)
            result = await run_profile(dovecot, mailboxes, args.profile)
            print(
                f"bare empty poll: {bare['cpu_ms']:.3f} CPU ms;"
                f" service: {result['cpu_ms']:.3f} CPU ms"
            )
            print(
                f"profile_cpu_ms={result['cpu_ms']:.3f} bare_cpu_ms={bare['cpu_ms']:.3f}"
                f" vs_bare={result['cpu_ms'] / bare['cpu_ms']:.2f}"
            )
            return
        figures: list[str] = []
        for mode in modes:
            tls = mode == "tls"
            print(
                f"{mode}: {args.accounts} accounts every {args.interval_minutes} min,"
                f" {args.cycles} cycle(s) watched"
            )
            bare = await run_bare(dovecot, mailboxes, min(args.accounts, 2000), tls)
            print(
                f"  bare asyncio empty poll: {bare['cpu_ms']:.3f} CPU ms/poll,"
                f" {bare['polls_per_s']:.0f} polls/s flat out"
            )
            r = await run_service(dovecot, mailboxes, args.interval_minutes, args.cycles, tls)
            print(
                f"  mailroom: {r['polls']:.0f} polls, {r['polls_per_s']:.1f} polls/s"
                f" (ideal {r['ideal_per_s']:.1f}); lateness p50 {r['late_p50_s']:.2f} s,"
                f" p99 {r['late_p99_s']:.2f} s, max {r['late_max_s']:.2f} s,"
                f" {r['late_over_30s']:.0f} over 30 s"
                f" (first cycle max {r['first_cycle_late_max_s']:.2f} s);"
                f" {r['cpu_ms']:.3f} CPU ms/poll ({r['cpu_ms'] / bare['cpu_ms']:.2f}x bare);"
                f" failed {r['failed']:.0f}"
            )
            figures += [
                f"{mode}_polls_per_s={r['polls_per_s']:.2f}",
                f"{mode}_ideal_per_s={r['ideal_per_s']:.2f}",
                f"{mode}_late_p50_s={r['late_p50_s']:.2f}",
                f"{mode}_late_p99_s={r['late_p99_s']:.2f}",
                f"{mode}_late_max_s={r['late_max_s']:.2f}",
                f"{mode}_cpu_ms={r['cpu_ms']:.3f}",
                f"{mode}_bare_cpu_ms={bare['cpu_ms']:.3f}",
                f"{mode}_vs_bare={r['cpu_ms'] / bare['cpu_ms']:.2f}",
                f"{mode}_failed={r['failed']:.0f}",
            ]
        print(" ".join(figures))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--interval-minutes", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--modes", default="plain,tls")
    parser.add_argument("--profile", type=int, default=0, help="profile this many empty polls")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the event loop: uvloop (as python -m service runs), or the standard library's",
    )
    args = parser.parse_args()
    if args.loop == "uvloop":
        uvloop.run(main_async(args))
    else:
        asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
