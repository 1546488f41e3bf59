"""Filters benchmark: every documented message filter at 100,000 messages in one account.

One run, one store (``--store sqlite``, the default, or ``--store postgres``):

1. The service (``python -m service``) creates three accounts over HTTP: ``big``, ``small``
   and ``fresh``, each with its own Dovecot mailbox; then it is stopped.
2. ``--messages`` (100,000) summaries with small raw bodies are stored into ``big``, and
   ``--baseline`` (1,000) into ``small``, through the repository's own ingest path
   (``MessageRepository.store_batch``, 2,000 per transaction: the statement a retrieval
   runs, trigram index rows and UIDLs included), from this process (on PostgreSQL then
   ``ANALYZE``, as autovacuum would soon after). Subjects, senders,
   ``to`` lists, attachment flags and ``retrieved_at`` (spread over 100 days) vary;
   a tenth of a percent of the messages carry rare words, so each filter has a rare and
   a common case.
3. Each filter of ``GET /v1/accounts/{id}/messages`` (``subject``, ``from``, ``to``,
   ``q``, ``since``, ``has_attachments``, ``message_id``, combinations, a second page) is timed
   ``--repeat`` times at the repository (``page(limit=50)``, in this process) and over
   HTTP against the restarted service (``limit=50``); median and p95 in ms, for ``big``
   and, as the baseline of the same run, for ``small`` (the ratio says how much 100 times
   the rows cost).
4. A retrieval of ``--retrieve`` (2,000) messages of about 10 KB from Dovecot into
   ``big`` (which knows 100,000 UIDLs the server no longer lists: the retrieval compares
   and forgets them) and into ``fresh``, over HTTP (trigger, long-poll); the ratio.
5. The service's peak RSS (VmHWM) after all of that.

Run from the repository root: ``.venv/bin/python bench/filters.py [--store postgres]
[--messages N] [--baseline N] [--repeat R] [--postgres DSN]``. PostgreSQL: ``--postgres``
(a role that may create databases), else ``MAILROOM_TEST_POSTGRES``, else the local server
at 127.0.0.1:5432 with trust authentication; a throw-away database is created and dropped.
Needs ``dovecot-pop3d``. The last line is machine-readable::

    filters: store=... messages=... worst_repo_p95_ms=... worst_http_p95_ms=... ...
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.retrieval import make_message
from service.config import Settings
from service.domain.enums import RetrievalStatus, RetrievalTrigger
from service.domain.ids import new_id
from service.domain.retrievals import (
    MessageFilter,
    MessageSummary,
    NewMessage,
    Retrieval,
    RetrievalProgress,
)
from service.repository.store import Store, create_store
from tests.process import start, stop
from tests.servers.dovecot import Mailbox, running_dovecot

KEY = "bench-key-0123456789abcdef"
BATCH = 2000
PAGE = 50
TARGET_MS = 10.0
SECOND_PAGE = "_second_page"  # a case that times the page after the first one
T0 = datetime(2026, 8, 1, tzinfo=UTC)
SPAN = timedelta(days=100)
WORDS = (
    "invoice meeting report weekly update order shipping receipt travel booking"
    " newsletter offer project status review draft contract payment reminder agenda"
).split()
DOMAINS = ["example.com", "example.org", "corp.example", "mail.example.net", "shop.example"]
NO_PROGRESS = RetrievalProgress(
    messages_on_server=None,
    messages_downloaded=0,
    bytes_downloaded=0,
    messages_deleted=0,
    messages_skipped=0,
)


def summary(account_id: str, i: int, total: int) -> NewMessage:
    """Message ``i`` of ``total``: rare words on one message in a thousand."""
    rare = i % 1000 == 999
    words = f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]}"
    subject = f"Quarterly zqx audit {i}" if rare else f"{words.title()} #{i}"
    sender = (
        f"Rare Sender <rare.sender{i}@vendor.example>"
        if rare
        else f"Person {i % 3000} <person{i % 3000}@{DOMAINS[i % len(DOMAINS)]}>"
    )
    to = [f"team{i % 200}@corp.example", "you@example.com"]
    if rare:
        to.append("Auditor <auditor@audit.example>")
    retrieved = T0 + SPAN * i / total
    raw = f"Subject: {subject}\r\nFrom: {sender}\r\n\r\nbody {i}\r\n".encode()
    return NewMessage(
        summary=MessageSummary(
            id=new_id("msg"),
            account_id=account_id,
            uidl=f"bench-{i}",
            size=len(raw),
            retrieved_at=retrieved,
            message_id=f"<{i}@bench.example>",
            from_=sender,
            to=to,
            cc=[],
            subject=subject,
            date=retrieved - timedelta(minutes=5),
            has_attachments=i % 7 == 3,
        ),
        raw=raw,
    )


def cases(total: int) -> list[tuple[str, dict[str, str]]]:
    """(name, query parameters): every documented filter, rare and common."""
    recent = (T0 + SPAN * (total - total // 200) / total).isoformat()
    old = (T0 + SPAN / 10).isoformat()
    return [
        ("none", {}),
        ("subject rare", {"subject": "zqx"}),
        ("subject common", {"subject": "invoice"}),
        ("subject none match", {"subject": "no such words"}),
        ("subject 2 chars", {"subject": "in"}),
        ("from rare", {"from": "rare.sender"}),
        ("from common", {"from": "@example.org"}),
        ("to rare", {"to": "auditor@"}),
        ("to common", {"to": "you@example"}),
        ("q rare", {"q": "zqx"}),
        ("q common", {"q": "weekly"}),
        ("since recent", {"since": recent}),
        ("since old", {"since": old}),
        ("has_attachments=true", {"has_attachments": "true"}),
        ("has_attachments=false", {"has_attachments": "false"}),
        ("subject rare + since old", {"subject": "zqx", "since": old}),
        ("from common + attachments", {"from": "@example.org", "has_attachments": "true"}),
        ("q rare + attachments", {"q": "zqx", "has_attachments": "true"}),
        # Two common filters that never match together: every candidate is read.
        ("subject + from, disjoint", {"subject": "invoice", "from": "@example.org"}),
        ("subject common, page 2", {"subject": "invoice", SECOND_PAGE: "1"}),
        ("none, page 2", {SECOND_PAGE: "1"}),
        # An exact Message-ID, of an old message (outside any newest-first window).
        ("message_id", {"message_id": f"<{total // 3}@bench.example>"}),
        ("message_id none match", {"message_id": "<no-such-id@bench.example>"}),
    ]


def message_filter(params: dict[str, str]) -> MessageFilter:
    since = params.get("since")
    attachments = params.get("has_attachments")
    return MessageFilter(
        since=None if since is None else datetime.fromisoformat(since),
        subject_contains=params.get("subject"),
        from_contains=params.get("from"),
        to_contains=params.get("to"),
        text_contains=params.get("q"),
        has_attachments=None if attachments is None else attachments == "true",
        message_id=params.get("message_id"),
    )


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


# Building ---------------------------------------------------------------------------


def account_body(name: str, host: str, port: int, mailbox: Mailbox) -> dict[str, Any]:
    return {
        "name": name,
        "email": f"{name}@example.com",
        "incoming": {
            "host": host,
            "port": port,
            "security": "none",
            "username": mailbox.user,
            "password": mailbox.password,
        },
        "outgoing": {"host": host, "port": 25, "security": "none"},
    }


async def fill(store: Store, account_id: str, total: int) -> float:
    """Store ``total`` messages through the repository; seconds taken."""
    retrieval = Retrieval(
        id=new_id("ret"),
        account_id=account_id,
        trigger=RetrievalTrigger.API,
        status=RetrievalStatus.QUEUED,
        created_at=T0,
    )
    now = datetime.now(UTC)
    await store.retrievals.add(retrieval, owner="bench", lease_until=now + timedelta(hours=1))
    started = time.perf_counter()
    for first in range(0, total, BATCH):
        batch = [summary(account_id, i, total) for i in range(first, min(total, first + BATCH))]
        await store.messages.store_batch(account_id, batch, retrieval.id, NO_PROGRESS)
    elapsed = time.perf_counter() - started
    await store.retrievals.finish(
        retrieval.id, RetrievalStatus.SUCCEEDED, datetime.now(UTC), NO_PROGRESS, None
    )
    return elapsed


# Timing -----------------------------------------------------------------------------


async def time_repository(
    store: Store, account_id: str, params: dict[str, str], repeat: int
) -> tuple[float, float, int]:
    flt = message_filter(params)
    after = None
    if SECOND_PAGE in params:
        after = (await store.messages.page(account_id, flt, after=None, limit=PAGE)).next_after
    samples = []
    count = 0
    for _ in range(repeat):
        started = time.perf_counter()
        page = await store.messages.page(account_id, flt, after=after, limit=PAGE)
        samples.append((time.perf_counter() - started) * 1000)
        count = len(page.items)
    return (*percentiles(samples), count)


def time_http(
    client: httpx.Client, account_id: str, params: dict[str, str], repeat: int
) -> tuple[float, float, int]:
    url = f"/v1/accounts/{account_id}/messages"
    query: dict[str, str | int] = {k: v for k, v in params.items() if k != SECOND_PAGE}
    query["limit"] = PAGE
    if SECOND_PAGE in params:
        cursor = client.get(url, params=query).json()["next_cursor"]
        if cursor:
            query["cursor"] = cursor
    samples = []
    count = 0
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(url, params=query)
        samples.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        count = len(response.json()["items"])
    return (*percentiles(samples), count)


def retrieve(client: httpx.Client, account_id: str, expect: int) -> float:
    started = time.perf_counter()
    retrieval = client.post(f"/v1/accounts/{account_id}/retrievals").json()["id"]
    while True:
        state = client.get(
            f"/v1/accounts/{account_id}/retrievals/{retrieval}",
            params={"wait": 60},
            timeout=70,
        ).json()
        if state["status"] not in ("queued", "running"):
            break
    elapsed = time.perf_counter() - started
    if state["status"] != "succeeded" or state["messages_downloaded"] != expect:
        raise SystemExit(f"retrieval did not succeed as expected: {state}")
    return elapsed


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# The run ----------------------------------------------------------------------------


def run(args: argparse.Namespace, database: str, env: dict[str, str]) -> str:
    with running_dovecot(ssl="no") as dovecot:
        boxes = {name: dovecot.add_user() for name in ("big", "small", "fresh", "fresh2")}
        for name in ("big", "fresh", "fresh2"):
            boxes[name].deliver_many(make_message(i) for i in range(args.retrieve))
        proc, base = start(env)
        try:
            client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"})
            ids = {}
            for name, box in boxes.items():
                response = client.post(
                    "/v1/accounts", json=account_body(name, dovecot.host, dovecot.pop3_port, box)
                )
                response.raise_for_status()
                ids[name] = response.json()["id"]
        finally:
            stop(proc)

        async def build() -> tuple[float, float]:
            store = create_store(Settings(database=database, secret_keys=(os.urandom(32),)))
            await store.open()
            try:
                big_s = await fill(store, ids["big"], args.messages)
                small_s = await fill(store, ids["small"], args.baseline)
                if args.store == "postgres":
                    # What autovacuum does within a minute of such a bulk insert: the
                    # planner's statistics (the trigram indexes' selectivity).
                    await store.db.fetch_all("ANALYZE")  # type: ignore[attr-defined]
            finally:
                await store.close()
            return big_s, small_s

        big_s, small_s = asyncio.run(build())
        print(
            f"built: {args.messages} messages in {big_s:.1f} s"
            f" ({args.messages / big_s:,.0f}/s through store_batch),"
            f" {args.baseline} in {small_s:.2f} s"
        )

        async def repository_times() -> dict[str, dict[str, tuple[float, float, int]]]:
            store = create_store(Settings(database=database, secret_keys=(os.urandom(32),)))
            await store.open()
            try:
                result: dict[str, dict[str, tuple[float, float, int]]] = {}
                for name, params in cases(args.messages):
                    result[name] = {
                        "big": await time_repository(store, ids["big"], params, args.repeat),
                        "small": await time_repository(store, ids["small"], params, args.repeat),
                    }
                return result
            finally:
                await store.close()

        repo = asyncio.run(repository_times())

        proc, base = start(env)
        try:
            client = httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
            )
            http = {
                name: {
                    "big": time_http(client, ids["big"], params, args.repeat),
                    "small": time_http(client, ids["small"], params, args.repeat),
                }
                for name, params in cases(args.messages)
            }
            fresh_s = retrieve(client, ids["fresh"], args.retrieve)
            big_retrieval_s = retrieve(client, ids["big"], args.retrieve)
            fresh2_s = retrieve(client, ids["fresh2"], args.retrieve)
            rss = peak_rss_mb(proc.pid)
        finally:
            stop(proc)

    print(
        f"\n{'filter':<28} {'repo big med/p95':>18} {'repo 1k med/p95':>17}"
        f" {'http big med/p95':>18} {'http 1k med/p95':>17} {'rows':>5}"
    )
    worst_repo = worst_http = 0.0
    missed = []
    for name, _ in cases(args.messages):
        rb, rs, hb, hs = (
            repo[name]["big"],
            repo[name]["small"],
            http[name]["big"],
            http[name]["small"],
        )
        worst_repo = max(worst_repo, rb[1])
        worst_http = max(worst_http, hb[1])
        if rb[1] >= TARGET_MS:
            missed.append(name)
        print(
            f"{name:<28} {rb[0]:8.2f} / {rb[1]:7.2f} {rs[0]:7.2f} / {rs[1]:7.2f}"
            f" {hb[0]:8.2f} / {hb[1]:7.2f} {hs[0]:7.2f} / {hs[1]:7.2f} {rb[2]:5d}"
        )
    fresh = statistics.mean([fresh_s, fresh2_s])
    print(
        f"\nretrieval of {args.retrieve} messages: fresh account {fresh_s:.3f} s and"
        f" {fresh2_s:.3f} s, account with {args.messages} known UIDLs {big_retrieval_s:.3f} s"
        f" ({big_retrieval_s / fresh:.2f}x)"
    )
    print(f"service peak RSS: {rss:.1f} MB")
    print(f"filters over {TARGET_MS:.0f} ms at p95 (repository): {', '.join(missed) or 'none'}")
    return (
        f"filters: store={args.store} messages={args.messages} worst_repo_p95_ms={worst_repo:.2f}"
        f" worst_http_p95_ms={worst_http:.2f} over_target={len(missed)}"
        f" retrieval_big_vs_fresh={big_retrieval_s / fresh:.2f} peak_rss_mb={rss:.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=1_000)
    parser.add_argument("--retrieve", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--postgres", help="DSN of a role that may create databases")
    args = parser.parse_args()
    secret = base64.urlsafe_b64encode(os.urandom(32)).decode()
    env = {
        "MAILROOM_API_KEYS": KEY,
        "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
        "MAILROOM_SECRET_KEY": secret,
    }
    if args.store == "postgres":
        if args.postgres:
            os.environ["MAILROOM_TEST_POSTGRES"] = args.postgres
        from tests.servers.postgres import drop_database, new_database

        database = new_database()
        try:
            line = run(args, database, {**env, "MAILROOM_DATABASE": database})
        finally:
            drop_database(database)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            database = f"{tmp}/mailroom.db"
            line = run(args, database, {**env, "MAILROOM_DATABASE": database})
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
