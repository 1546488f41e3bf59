"""Retrievals under a lease: one active per account whoever runs it, a dead process's
retrieval ended ``interrupted`` by another's sweep, a heartbeat that keeps a long retrieval
held, and a scheduled poll started once among processes (``not_after``).

The repository tests run on a real SQLite file; the service tests run the app against a
scripted POP3 server (to hold a session open at a chosen point) with a short lease.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

import service.services.leases as leases_module
from service.app import create_app
from service.domain.enums import RetrievalStatus, RetrievalTrigger
from service.domain.ids import new_id
from service.domain.retrievals import Retrieval, RetrievalProgress
from service.domain.time import from_text, to_text, utcnow
from service.repository.database import Database
from service.repository.errors import DuplicateError
from service.repository.retrievals import SQLiteRetrievalRepository
from service.services.scheduler import NEVER
from tests.api.conftest import API_KEY, make_settings
from tests.pop3.fault_server import MiniPOP3, ScriptedServer, Session
from tests.retrieval.conftest import LOOPBACK, scripted_account, wait_done
from tests.waiting import until

SHORT_LEASE_S = 0.6


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[tuple[Database, SQLiteRetrievalRepository]]:
    db = Database(str(tmp_path / "leases.db"))
    await db.open()
    try:
        yield db, SQLiteRetrievalRepository(db)
    finally:
        await db.close()


async def add_account(db: Database, account_id: str, tenant: str = "t") -> str:
    now = to_text(utcnow())
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO accounts (id, tenant, name, email, in_host, in_port, in_security,"
            " in_username, in_password, out_host, out_port, out_security, created_at,"
            " updated_at) VALUES (?, ?, 'n', 'a@example.com', 'pop.example.com', 995, 'tls',"
            " 'a', 'x', 'smtp.example.com', 587, 'starttls', ?, ?)",
            (account_id, tenant, now, now),
        )
    return account_id


def new_retrieval(account_id: str, trigger: RetrievalTrigger = RetrievalTrigger.API) -> Retrieval:
    return Retrieval(
        id=new_id("ret"),
        account_id=account_id,
        trigger=trigger,
        status=RetrievalStatus.QUEUED,
        created_at=utcnow(),
    )


async def test_one_active_retrieval_per_account_whoever_holds_it(
    store: tuple[Database, SQLiteRetrievalRepository],
) -> None:
    db, retrievals = store
    account = await add_account(db, "acc_1")
    other = await add_account(db, "acc_2", tenant="u")
    lease = utcnow() + timedelta(minutes=1)
    assert await retrievals.add(new_retrieval(account), owner="rep_a", lease_until=lease)
    with pytest.raises(DuplicateError):
        await retrievals.add(new_retrieval(account), owner="rep_b", lease_until=lease)
    assert await retrievals.add(new_retrieval(other), owner="rep_b", lease_until=lease)
    assert await retrievals.count_active_for_tenant("t") == 1
    assert await retrievals.count_active_for_tenant("u") == 1
    assert await retrievals.count_active_for_tenant("nobody") == 0


async def test_an_expired_retrieval_is_ended_by_another_process_sweep(
    store: tuple[Database, SQLiteRetrievalRepository],
) -> None:
    db, retrievals = store
    dead = await add_account(db, "acc_dead")
    alive = await add_account(db, "acc_alive")
    now = utcnow()
    short = now + timedelta(seconds=5)
    first = new_retrieval(dead)
    second = new_retrieval(alive)
    await retrievals.add(first, owner="rep_dead", lease_until=short)
    await retrievals.add(second, owner="rep_alive", lease_until=short)
    await retrievals.start(first.id, now)
    assert await retrievals.interrupt_expired(short - timedelta(microseconds=1)) == 0
    # rep_alive renews; rep_dead does not.
    assert await retrievals.renew("rep_dead", [second.id], now + timedelta(minutes=5)) == 0
    assert await retrievals.renew("rep_alive", [second.id], now + timedelta(minutes=5)) == 1
    later = short + timedelta(seconds=1)
    assert await retrievals.interrupt_expired(later) == 1
    ended = await retrievals.get(dead, first.id)
    assert ended is not None and ended.status is RetrievalStatus.FAILED
    assert ended.error is not None and ended.error.code == "interrupted"
    assert ended.finished_at == later
    assert (await retrievals.active(alive)) is not None
    assert await retrievals.renew("rep_dead", [first.id], later) == 0  # over: not held
    # The account is free again for any process.
    assert await retrievals.add(new_retrieval(dead), owner="rep_alive", lease_until=later)
    # A process alone on its store ends every active one at start, except those it keeps.
    assert await retrievals.interrupt_expired(now, everything=True, keep=[second.id]) == 1
    assert (await retrievals.active(alive)) is not None
    assert (await retrievals.active(dead)) is None


async def test_not_after_skips_a_poll_another_process_made(
    store: tuple[Database, SQLiteRetrievalRepository],
) -> None:
    db, retrievals = store
    account = await add_account(db, "acc_1")
    lease = utcnow() + timedelta(minutes=1)
    # Two processes' schedulers saw no retrieval of the account and both poll it.
    polls = [new_retrieval(account, RetrievalTrigger.SCHEDULE) for _ in range(2)]
    first = await retrievals.add(polls[0], owner="rep_a", lease_until=lease, not_after=NEVER)
    assert first
    # The first poll already ended (a quick one): the second is still skipped.
    await retrievals.finish(polls[0].id, RetrievalStatus.SUCCEEDED, utcnow(), _no_progress(), None)
    second = await retrievals.add(polls[1], owner="rep_b", lease_until=lease, not_after=NEVER)
    assert not second
    assert [r.id for r in (await retrievals.page(account, after=None, limit=10)).items] == [
        polls[0].id
    ]
    # A scheduler that saw that poll (it is the latest) polls next time.
    seen = (await retrievals.latest())[account].created_at
    third = new_retrieval(account, RetrievalTrigger.SCHEDULE)
    assert await retrievals.add(third, owner="rep_b", lease_until=lease, not_after=seen)


def _no_progress() -> RetrievalProgress:
    return RetrievalProgress(
        messages_on_server=0,
        messages_downloaded=0,
        bytes_downloaded=0,
        messages_deleted=0,
        messages_skipped=0,
    )


# The service: sweep, heartbeat, scheduled trigger -------------------------------------------


@pytest.fixture
async def client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AsyncTestClient[Any]]:
    monkeypatch.setattr(leases_module, "LEASE_S", SHORT_LEASE_S)
    # No transfer-rate floor: a test holds a session still on purpose.
    settings = make_settings(tmp_path, allowed_networks=LOOPBACK, min_transfer_rate=0)
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield test_client


async def in_app(client: AsyncTestClient[Any], call: Any) -> Any:
    """Run ``call()`` in the app's own loop (the test client runs it in a thread)."""
    return await asyncio.to_thread(client.blocking_portal.call, call)


async def test_a_dead_process_retrieval_is_ended_without_a_restart(
    client: AsyncTestClient[Any],
) -> None:
    mini = MiniPOP3(messages=[b"Subject: one\r\n\r\nhi\r\n"])
    async with ScriptedServer(mini) as server:
        response = await client.post("/v1/accounts", json=scripted_account(server.port))
        account = response.json()["id"]
        # As a replica on a shared store (a SQLite process is alone on its file, and would
        # take any active row no task of its own runs for an orphan at once).
        client.app.state.retrievals._exclusive = False
        # Another process started a retrieval of this account, then died holding it.
        retrievals = client.app.state.store.retrievals
        orphan = new_retrieval(account)
        lease = utcnow() + timedelta(seconds=SHORT_LEASE_S)
        add = functools.partial(retrievals.add, orphan, owner="rep_dead", lease_until=lease)
        assert await in_app(client, add)
        # While its lease lasts, the account is busy for every process.
        busy = await client.post(f"/v1/accounts/{account}/retrievals")
        assert busy.status_code == 409, busy.text
        assert busy.json()["code"] == "retrieval_running"
        # This process's periodic sweep ends it once the lease has expired.
        ended = await wait_done(client, account, orphan.id)
        assert (ended["status"], ended["error"]["code"]) == ("failed", "interrupted")
        started = await client.post(f"/v1/accounts/{account}/retrievals")
        assert started.status_code == 202, started.text
        done = await wait_done(client, account, started.json()["id"])
        assert (done["status"], done["messages_downloaded"]) == ("succeeded", 1)


@pytest.mark.sqlite_only  # reads the lease columns with SQLite SQL
async def test_the_heartbeat_keeps_a_long_retrieval_held(client: AsyncTestClient[Any]) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def held_uidl(session: Session, line: bytes) -> bool:
        arrived.set()
        await release.wait()
        session.send(b"+OK\r\n1 uid-1\r\n.\r\n")
        return False

    mini = MiniPOP3(messages=[b"Subject: one\r\n\r\nhi\r\n"], replies={"UIDL": held_uidl})
    async with ScriptedServer(mini) as server:
        response = await client.post("/v1/accounts", json=scripted_account(server.port))
        account = response.json()["id"]
        trigger = await client.post(f"/v1/accounts/{account}/retrievals")
        assert trigger.status_code == 202, trigger.text
        retrieval_id = trigger.json()["id"]
        await arrived.wait()
        db = client.app.state.db

        async def lease() -> tuple[str, str]:
            row = await db.fetch_one(
                "SELECT owner, lease_until FROM retrievals WHERE id = ?", (retrieval_id,)
            )
            return row["owner"], row["lease_until"]

        owner, first = await lease()
        assert owner.startswith("rep_")
        retrievals = client.app.state.store.retrievals
        for _ in range(3):
            before = (await lease())[1]
            await until(lease, lambda held, before=before: held[1] > before)
            # Another process's sweep, now: the retrieval is alive.
            sweep = functools.partial(retrievals.interrupt_expired, utcnow())
            assert await in_app(client, sweep) == 0
        beyond = from_text(first) + timedelta(seconds=3 * SHORT_LEASE_S)
        await until(lease, lambda held: from_text(held[1]) > beyond)
        state = (await client.get(f"/v1/accounts/{account}/retrievals/{retrieval_id}")).json()
        assert state["status"] == "running"
        release.set()
        done = await wait_done(client, account, retrieval_id)
        assert (done["status"], done["messages_downloaded"]) == ("succeeded", 1)


async def test_a_scheduled_poll_another_process_made_is_not_repeated(
    client: AsyncTestClient[Any],
) -> None:
    mini = MiniPOP3(messages=[b"Subject: one\r\n\r\nhi\r\n"])
    async with ScriptedServer(mini) as server:
        response = await client.post("/v1/accounts", json=scripted_account(server.port))
        account = response.json()["id"]
        # This process's scheduler looked before the poll below (it saw none).
        first = await client.post(f"/v1/accounts/{account}/retrievals")
        await wait_done(client, account, first.json()["id"])
        service = client.app.state.retrievals
        accounts = client.app.state.store.accounts
        current = await in_app(client, functools.partial(accounts.get_any, account))
        skipped = functools.partial(service.trigger_scheduled, current, not_after=NEVER)
        assert await in_app(client, skipped) is None
        page = (await client.get(f"/v1/accounts/{account}/retrievals")).json()
        assert [r["id"] for r in page["items"]] == [first.json()["id"]]
        # Having seen that poll, the next scheduled one starts.
        seen = from_text(page["items"][0]["created_at"])
        made = functools.partial(service.trigger_scheduled, current, not_after=seen)
        polled = await in_app(client, made)
        assert polled is not None and polled.trigger is RetrievalTrigger.SCHEDULE
        await wait_done(client, account, polled.id)
