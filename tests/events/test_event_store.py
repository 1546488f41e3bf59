"""The event store: events inserted in the caller's transaction, read back by the feed in
commit order, never missed and never repeated; on PostgreSQL also when transactions
commit out of the order of their positions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from service.domain.events import EventType, NewEvent, new_event
from service.domain.webhooks import Webhook
from service.repository import events as sqlite_events
from service.repository.events import InvalidEventCursor
from service.repository.notify import Topic
from service.repository.postgres import events as pg_events
from service.repository.store import Store, create_store
from tests.repository.conftest import store_settings
from tests.waiting import until

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def event(
    n: int,
    *,
    tenant: str = "default",
    account_id: str | None = "acc_1",
    type: EventType = EventType.MESSAGE_RECEIVED,
) -> NewEvent:
    return new_event(
        type,
        tenant=tenant,
        account_id=account_id,
        created_at=T0 + timedelta(seconds=n),
        data={"n": n, "subject": f"s{n}"},
    )


async def insert(store: Store, events: list[NewEvent]) -> None:
    db: Any = store.db  # type: ignore[attr-defined]
    if store.kind == "postgres":
        async with db.transaction() as conn:
            await pg_events.insert_events(conn, events)
        # The feed serves an event once every older transaction in the cluster has ended;
        # other tests share the server: wait (bounded) for the horizon to pass.
        await until(
            lambda: db.fetch_value(
                "SELECT count(*) FROM events WHERE xid >= pg_snapshot_xmin(pg_current_snapshot())"
            ),
            lambda n: n == 0,
            interval=0.01,
        )
    else:
        async with db.transaction() as conn:
            await sqlite_events.insert_events(conn, events)


async def test_events_come_back_in_commit_order_and_page_by_cursor(store: Store) -> None:
    first = [event(n) for n in range(3)]
    await insert(store, first)
    await insert(store, [event(3, account_id="acc_2", type=EventType.OUTGOING_SENT)])
    await insert(store, [event(9, tenant="other")])
    page = await store.events.feed("default", after=None, types=None, account_id=None, limit=2)
    assert [e.id for e in page] == [e.id for e in first[:2]]
    assert page[0].data == {"n": 0, "subject": "s0"}
    assert page[0].type == "message.received" and page[0].account_id == "acc_1"
    assert page[0].created_at == T0
    rest = await store.events.feed(
        "default", after=page[-1].cursor, types=None, account_id=None, limit=10
    )
    assert [e.data["n"] for e in rest] == [2, 3]
    assert (
        await store.events.feed(
            "default", after=rest[-1].cursor, types=None, account_id=None, limit=10
        )
        == []
    )
    sent = await store.events.feed(
        "default", after=None, types=["outgoing.sent"], account_id=None, limit=10
    )
    assert [e.data["n"] for e in sent] == [3]
    of_acc2 = await store.events.feed(
        "default", after=None, types=None, account_id="acc_2", limit=10
    )
    assert [e.data["n"] for e in of_acc2] == [3]
    got = await store.events.get(first[1].id)
    assert got is not None and got.data["n"] == 1


async def test_a_rolled_back_transaction_leaves_no_event(store: Store) -> None:
    class Boom(Exception):
        pass

    db: Any = store.db  # type: ignore[attr-defined]
    module: Any = pg_events if store.kind == "postgres" else sqlite_events
    with pytest.raises(Boom):
        async with db.transaction() as conn:
            await module.insert_events(conn, [event(1)])
            raise Boom
    assert (
        await store.events.feed("default", after=None, types=None, account_id=None, limit=10) == []
    )


async def test_a_cursor_not_issued_here_is_refused(store: Store) -> None:
    # The documented form, but numbers past what a store counts (64-bit): found by fuzzing.
    for cursor in ("c1.abc", "e1.1.99600161970040711403", f"e1.{2**63}.1"):
        with pytest.raises(InvalidEventCursor):
            await store.events.feed("default", after=cursor, types=None, account_id=None, limit=10)
    last = f"e1.{2**63 - 1}.{2**63 - 1}"
    assert (
        await store.events.feed("default", after=last, types=None, account_id=None, limit=10) == []
    )


async def test_the_wake_up_comes_after_the_commit(store: Store) -> None:
    seen: list[str] = []
    visible: list[int] = []

    def woken(tenant: str) -> None:
        seen.append(tenant)

    unsubscribe = sqlite_events.subscribe_committed(woken)
    store.notifier.subscribe(Topic.EVENTS, woken)
    await store.notifier.start()
    try:
        if store.kind == "postgres":
            await asyncio.wait_for(store.notifier.connected.wait(), 10)  # type: ignore[attr-defined]
        await insert(store, [event(1, tenant="t1")])
        await until(lambda: asyncio.sleep(0.01, list(seen)), lambda s: s == ["t1"])
        visible.append(
            len(await store.events.feed("t1", after=None, types=None, account_id=None, limit=10))
        )
        assert visible == [1]
    finally:
        unsubscribe()
        await store.notifier.stop()


async def test_the_webhook_dispatcher_is_woken_only_for_events_an_endpoint_takes(
    store: Store,
) -> None:
    """A listener with ``deliveries_only`` (the webhook dispatcher on SQLite) hears of a
    commit only when its events queued deliveries; the feed's listener hears of every one."""
    if store.kind == "postgres":
        pytest.skip("SQLite's in-process wake-ups; PostgreSQL notifies through the server")
    every: list[str] = []
    delivering: list[str] = []
    unsubscribe_every = sqlite_events.subscribe_committed(every.append)
    unsubscribe_delivering = sqlite_events.subscribe_committed(
        delivering.append, deliveries_only=True
    )
    try:
        await insert(store, [event(1, tenant="t1")])
        await store.webhooks.add(
            Webhook(
                id="wh_1",
                tenant="t2",
                url="https://hooks.example.test/in",
                description=None,
                events=["message.received"],
                account_ids=None,
                enabled=True,
                secret_encrypted="x",
                previous_secret_encrypted=None,
                previous_secret_until=None,
                disabled_reason=None,
                failing_since=None,
                created_at=T0,
                updated_at=T0,
            )
        )
        # t2's endpoint takes only message.received: an outgoing event queues nothing.
        await insert(store, [event(2, tenant="t2", type=EventType.OUTGOING_SENT)])
        await insert(store, [event(3, tenant="t2"), event(4, tenant="t1")])
        assert every[:2] == ["t1", "t2"] and sorted(every[2:]) == ["t1", "t2"]
        assert delivering == ["t2"]
    finally:
        unsubscribe_every()
        unsubscribe_delivering()


async def test_retention_prunes_old_events_only(store: Store) -> None:
    await insert(store, [event(0), event(100)])
    assert await store.events.prune(T0 + timedelta(seconds=50)) == 1
    left = await store.events.feed("default", after=None, types=None, account_id=None, limit=10)
    assert [e.data["n"] for e in left] == [100]


async def test_out_of_order_commits_are_neither_missed_nor_repeated(tmp_path: Path) -> None:
    """Two transactions take positions 1 and 2; the second commits first. A reader never
    gets position 2 before position 1 is visible, so a stored cursor misses nothing."""
    settings = store_settings("postgres", tmp_path)
    store = create_store(settings)
    await store.open()
    conn_a = await asyncpg.connect(settings.database)
    conn_b = await asyncpg.connect(settings.database)
    try:
        tx_a = conn_a.transaction()
        await tx_a.start()
        first = event(1)
        await pg_events.insert_events(conn_a, [first])
        tx_b = conn_b.transaction()
        await tx_b.start()
        second = event(2)
        await pg_events.insert_events(conn_b, [second])
        await tx_b.commit()
        # B committed, A has not: B is held back (serving it now would let the cursor
        # pass A's earlier transaction).
        early = await store.events.feed(
            "default", after=None, types=None, account_id=None, limit=10
        )
        assert early == []
        await tx_a.commit()
        # (Polled: another transaction in the cluster may hold the horizon back a moment.)
        both = await until(
            lambda: store.events.feed("default", after=None, types=None, account_id=None, limit=10),
            lambda found: len(found) == 2,
        )
        assert [e.id for e in both] == [first.id, second.id]
        # A cursor taken between the two never skips nor repeats.
        later = await store.events.feed(
            "default", after=both[0].cursor, types=None, account_id=None, limit=10
        )
        assert [e.id for e in later] == [second.id]
    finally:
        await conn_a.close()
        await conn_b.close()
        await store.close()


async def test_a_long_poll_returns_the_event_committed_while_it_waits(store: Store) -> None:
    from service.services.events import EventFeed

    feed = EventFeed(store.events, store.notifier)
    await store.notifier.start()
    try:
        assert (
            await feed.read("t", after=None, types=None, account_id=None, limit=10, wait_s=0.2)
            == []
        )
        waiting = asyncio.create_task(
            feed.read("t", after=None, types=None, account_id=None, limit=10, wait_s=30)
        )
        await asyncio.sleep(0.1)
        assert not waiting.done()
        first = event(1, tenant="t")
        await insert(store, [first])
        found = await waiting
        assert [e.id for e in found] == [first.id]
    finally:
        feed.close()
        await store.notifier.stop()


async def test_an_expired_message_reports_outgoing_failed(store: Store) -> None:
    from tests.repository.conftest import make_account, new_outgoing

    account = make_account(tenant="t-exp")
    await store.accounts.add(account)
    message = new_outgoing(account.id, expires_at=T0 + timedelta(minutes=1))
    await store.outbox.accept(message)
    assert await store.outbox.expire_overdue(T0 + timedelta(hours=1)) == 1
    if store.kind == "postgres":
        await insert(store, [])  # waits for the feed's horizon
    [failed] = await until(
        lambda: store.events.feed("t-exp", after=None, types=None, account_id=None, limit=10),
        lambda found: len(found) == 1,
    )
    assert failed.type == "outgoing.failed" and failed.account_id == account.id
    assert failed.data["outgoing_id"] == message.id
    assert failed.data["error_code"] == "expired"
    assert [r["status"] for r in failed.data["recipients"]] == ["failed", "failed"]


async def test_an_interrupted_retrieval_reports_retrieval_failed(store: Store) -> None:
    from service.domain.enums import RetrievalStatus, RetrievalTrigger
    from service.domain.ids import new_id
    from service.domain.retrievals import Retrieval
    from tests.repository.conftest import make_account

    account = make_account(tenant="t-int")
    await store.accounts.add(account)
    retrieval = Retrieval(
        id=new_id("ret"),
        account_id=account.id,
        trigger=RetrievalTrigger.API,
        status=RetrievalStatus.RUNNING,
        created_at=T0,
    )
    await store.retrievals.add(retrieval, owner="rep_gone", lease_until=T0)
    assert await store.retrievals.interrupt_expired(T0 + timedelta(minutes=5)) == 1
    if store.kind == "postgres":
        await insert(store, [])  # waits for the feed's horizon
    [failed] = await until(
        lambda: store.events.feed("t-int", after=None, types=None, account_id=None, limit=10),
        lambda found: len(found) == 1,
    )
    assert failed.type == "retrieval.failed" and failed.account_id == account.id
    assert failed.data["retrieval_id"] == retrieval.id
    assert failed.data["error_code"] == "interrupted"
