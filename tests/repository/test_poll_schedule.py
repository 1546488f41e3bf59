"""The poll schedule in the store (``accounts.next_poll_at``, migration 7), on both stores:
claims of due accounts are atomic across processes, the end of a retrieval sets the next
poll in its own transaction, and a new poll interval (or none) drops the schedule."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import msgspec

from service.config import Settings
from service.domain.accounts import Account, RetrievalPolicy
from service.domain.enums import RetrievalStatus, RetrievalTrigger
from service.domain.ids import new_id
from service.domain.retrievals import Retrieval, RetrievalProgress
from service.domain.time import opt_to_text, to_text
from service.repository.store import Store, create_store
from tests.repository.conftest import T0, make_account
from tests.servers.postgres import new_database

POLLED = RetrievalPolicy(poll_interval_minutes=5)
PROGRESS = RetrievalProgress(
    messages_on_server=0,
    messages_downloaded=0,
    bytes_downloaded=0,
    messages_deleted=0,
    messages_skipped=0,
)


async def test_due_accounts_are_claimed_once_among_processes(
    store: Store, store_kind: str, tmp_path: Path
) -> None:
    accounts = [make_account(retrieval=POLLED) for _ in range(40)]
    for account in accounts:
        await store.accounts.add(account)
    assert {a.id for a in await store.accounts.unscheduled(100)} == {a.id for a in accounts}
    due = {a.id: T0 + timedelta(seconds=i) for i, a in enumerate(accounts)}
    await store.accounts.schedule_polls(list(due.items()), unscheduled_only=True)
    assert await store.accounts.unscheduled(100) == []
    assert await store.accounts.next_poll_due() == T0
    # A second process on the same database (a second pool, or a second SQLite connection).
    database = store.db.dsn if store_kind == "postgres" else str(tmp_path / "mailroom.db")
    other = create_store(Settings(database=database, secret_keys=(os.urandom(32),)))
    await other.open()
    try:
        now = T0 + timedelta(seconds=30)  # 31 of the 40 are due
        lease = now + timedelta(seconds=60)
        claims = await asyncio.gather(
            *(
                s.accounts.claim_due_polls(now, lease, 8, skip_tenants=())
                for s in (store, other, store, other, store, other)
            )
        )
    finally:
        await other.close()
    claimed = [account.id for batch in claims for account, _ in batch]
    assert len(claimed) == len(set(claimed)) == 31, claims
    assert set(claimed) == {a for a, at in due.items() if at <= now}
    # Each with the time it was due, most overdue first within a claim.
    for batch in claims:
        assert [at for _, at in batch] == sorted(at for _, at in batch)
        assert all(at == due[account.id] for account, at in batch)
    # Claimed accounts wait for their poll's end (or the lease); the rest are still due later.
    assert await store.accounts.next_poll_at(claimed[0]) == lease
    assert await store.accounts.next_poll_due() == T0 + timedelta(seconds=31)


async def test_claims_leave_out_tenants_at_their_share(store: Store) -> None:
    full = make_account(tenant="full", retrieval=POLLED)
    free = make_account(tenant="free", retrieval=POLLED)
    for account in (full, free):
        await store.accounts.add(account)
    await store.accounts.schedule_polls([(full.id, T0), (free.id, T0 + timedelta(seconds=1))])
    now = T0 + timedelta(minutes=1)
    claimed = await store.accounts.claim_due_polls(
        now, now + timedelta(minutes=1), 8, skip_tenants={"full"}
    )
    assert [(a.id, at) for a, at in claimed] == [(free.id, T0 + timedelta(seconds=1))]
    assert await store.accounts.next_poll_at(full.id) == T0


async def test_the_end_of_a_retrieval_sets_the_next_poll(store: Store) -> None:
    account = make_account(retrieval=POLLED)
    unpolled = make_account()
    for a in (account, unpolled):
        await store.accounts.add(a)
    ends = T0 + timedelta(seconds=2)
    for a in (account, unpolled):
        retrieval = Retrieval(
            id=new_id("ret"),
            account_id=a.id,
            trigger=RetrievalTrigger.SCHEDULE,
            status=RetrievalStatus.RUNNING,
            created_at=T0,
            started_at=T0,
        )
        assert await store.retrievals.add(retrieval, owner="rep_a", lease_until=ends)
        stored = await store.retrievals.get(a.id, retrieval.id)
        assert stored is not None and stored.status is RetrievalStatus.RUNNING
        assert stored.started_at == T0
        await store.retrievals.finish(
            retrieval.id,
            RetrievalStatus.SUCCEEDED,
            ends,
            PROGRESS,
            None,
            next_poll_at=ends + timedelta(minutes=5),
        )
        done = await store.retrievals.get(a.id, retrieval.id)
        assert done is not None and done.status is RetrievalStatus.SUCCEEDED
        assert (done.finished_at, done.messages_on_server) == (ends, 0)
    assert await store.accounts.next_poll_at(account.id) == ends + timedelta(minutes=5)
    # An account that is not polled gets no schedule.
    assert await store.accounts.next_poll_at(unpolled.id) is None


async def test_a_new_interval_or_none_drops_the_schedule(store: Store) -> None:
    account = make_account(retrieval=POLLED)
    await store.accounts.add(account)
    await store.accounts.schedule_polls([(account.id, T0)])
    # Other changes keep it.
    await store.accounts.replace(msgspec.structs.replace(account, name="Renamed"))
    assert await store.accounts.next_poll_at(account.id) == T0
    # Another interval: scheduled anew by the scheduler (spread from then).
    hourly = msgspec.structs.replace(account, retrieval=RetrievalPolicy(poll_interval_minutes=60))
    await store.accounts.replace(hourly)
    assert await store.accounts.next_poll_at(account.id) is None
    assert [a.id for a in await store.accounts.unscheduled(10)] == [account.id]
    await store.accounts.schedule_polls([(account.id, T0)], unscheduled_only=True)
    # Polling off: no schedule, and none can be set.
    await store.accounts.replace(msgspec.structs.replace(account, retrieval=RetrievalPolicy()))
    assert await store.accounts.next_poll_at(account.id) is None
    await store.accounts.schedule_polls([(account.id, T0)])
    assert await store.accounts.next_poll_at(account.id) is None
    assert await store.accounts.unscheduled(10) == []


# Migration 7: the schedule backfilled from each polled account's latest retrieval --------


async def test_migration_backfills_the_schedule_from_the_latest_retrieval(
    store_kind: str, tmp_path: Path
) -> None:
    polled = make_account(retrieval=POLLED)
    slow = make_account(retrieval=POLLED, login_delay_s=900)
    never = make_account(retrieval=POLLED)
    unpolled = make_account()
    retrievals = [
        # (account, created, finished): the latest one counts, by its end (else its start).
        (polled, T0, T0 + timedelta(seconds=1)),
        (polled, T0 + timedelta(seconds=5), T0 + timedelta(seconds=10)),
        (slow, T0, None),
        (unpolled, T0, T0 + timedelta(seconds=1)),
    ]
    accounts = [polled, slow, never, unpolled]
    if store_kind == "sqlite":
        database = str(tmp_path / "mailroom.db")
        _sqlite_at_version_6(database, accounts, retrievals)
    else:
        database = new_database()
        await _postgres_at_version_6(database, accounts, retrievals)
    store = create_store(Settings(database=database, secret_keys=(os.urandom(32),)))
    await store.open()
    try:
        assert await store.schema_version() >= 7
        found = {a.id: await store.accounts.next_poll_at(a.id) for a in accounts}
    finally:
        await store.close()
    assert found == {
        polled.id: T0 + timedelta(seconds=10) + timedelta(minutes=5),
        slow.id: T0 + timedelta(seconds=900),
        never.id: None,  # scheduled by the scheduler, with a spread
        unpolled.id: None,
    }


# The accounts columns that exist at schema version 6 (the first ones of the row).
V6_ACCOUNT_COLUMNS = 26


def _retrieval_rows(
    retrievals: list[tuple[Account, datetime, datetime | None]],
) -> list[tuple[str, str, str, str, datetime, datetime | None]]:
    return [
        (new_id("ret"), a.id, "schedule", "running" if end is None else "succeeded", at, end)
        for a, at, end in retrievals
    ]


def _sqlite_at_version_6(
    path: str, accounts: list[Account], retrievals: list[tuple[Account, datetime, datetime | None]]
) -> None:
    from service.repository import accounts as sqlite_accounts
    from service.repository.database import _statements
    from service.repository.migrations import MIGRATIONS

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for version, script in MIGRATIONS:
            if version <= 6:
                for statement in _statements(script):
                    conn.execute(statement)
        conn.execute("PRAGMA user_version=6")
        # Version 6's columns: later migrations (11: OAuth2) add more, at the end.
        names = [n.strip() for n in sqlite_accounts._COLUMNS.split(",")][:V6_ACCOUNT_COLUMNS]
        marks = ", ".join("?" * len(names))
        for account in accounts:
            conn.execute(
                f"INSERT INTO accounts ({', '.join(names)}) VALUES ({marks})",
                sqlite_accounts._params(account)[: len(names)],
            )
        for rid, account_id, trigger, status, at, end in _retrieval_rows(retrievals):
            conn.execute(
                "INSERT INTO retrievals (id, account_id, trigger, status, created_at,"
                " finished_at) VALUES (?, ?, ?, ?, ?, ?)",
                (rid, account_id, trigger, status, to_text(at), opt_to_text(end)),
            )
    finally:
        conn.close()


async def _postgres_at_version_6(
    dsn: str, accounts: list[Account], retrievals: list[tuple[Account, datetime, datetime | None]]
) -> None:
    import asyncpg

    from service.repository.postgres import accounts as pg_accounts
    from service.repository.postgres.migrations import MIGRATIONS

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, script in MIGRATIONS:
            if version <= 6:
                await conn.execute(script)
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
        names = pg_accounts._NAMES[:V6_ACCOUNT_COLUMNS]  # version 6's columns
        marks = ", ".join(f"${n}" for n in range(1, len(names) + 1))
        for account in accounts:
            await conn.execute(
                f"INSERT INTO accounts ({', '.join(names)}) VALUES ({marks})",
                *pg_accounts._params(account)[: len(names)],
            )
        for row in _retrieval_rows(retrievals):
            await conn.execute(
                "INSERT INTO retrievals (id, account_id, trigger, status, created_at,"
                " finished_at) VALUES ($1, $2, $3, $4, $5, $6)",
                *row,
            )
    finally:
        await conn.close()
