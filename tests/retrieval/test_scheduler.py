"""Scheduled polling (app level, both stores): the schedule kept in the store across a
restart, due polls started as slots free up (not once per tick), first polls spread at a
stable per-account offset, the LOGIN-DELAY floor, a locked mailbox retried sooner, and a
tenant at its share of slots not holding back the others' due polls.

No timing is asserted: where "not once per tick" matters, the tick is an hour, so a poll
that waited for one would never come within the suite's bounded waits.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.config import Settings
from service.domain.accounts import Account, RetrievalPolicy
from service.domain.enums import RetrievalStatus, RetrievalTrigger
from service.domain.ids import new_id
from service.domain.retrievals import Retrieval
from service.domain.time import utcnow
from service.repository.store import Store, create_store
from service.services.scheduler import (
    LOCKED_RETRY_S,
    first_poll_at,
    next_poll_at,
    spread_fraction,
)
from tests.api.conftest import API_KEY, OTHER_TENANT_KEY, make_settings
from tests.pop3.fault_server import MiniPOP3, ScriptedServer, Session
from tests.retrieval.conftest import (
    LOOPBACK,
    account_json,
    create_account,
    held_at_pass,
    scripted_account,
)
from tests.waiting import feed_until, until

HOUR_S = 3600.0


def settings_for(tmp_path: Path, dovecot: Any, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "allowed_networks": LOOPBACK,
        "ca_file": dovecot.ca_file,
        "scheduler_interval_s": 0.1,
        "poll_spread_s": 0.0,
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield client


@asynccontextmanager
async def own_store(settings: Settings) -> AsyncIterator[Store]:
    """The app's store, opened on the test's own event loop (the app runs on another)."""
    store = create_store(settings)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def next_poll(settings: Settings, account: str) -> datetime | None:
    async with own_store(settings) as store:
        return await store.accounts.next_poll_at(account)


async def retrievals_of(
    client: AsyncTestClient[Any], account: str, key: str = API_KEY
) -> list[dict[str, Any]]:
    response = await client.get(
        f"/v1/accounts/{account}/retrievals", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def polled(
    client: AsyncTestClient[Any], account: str, count: int = 1, key: str = API_KEY
) -> list[dict[str, Any]]:
    """The account's retrievals once ``count`` have ended (bounded wait)."""
    return await until(
        lambda: retrievals_of(client, account, key),
        lambda items: sum(1 for i in items if i["status"] != "running") >= count,
    )


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def polled_account(minutes: int | None = 5, login_delay_s: int | None = None) -> Account:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    return Account(
        id="acc_01sched",
        tenant="default",
        name="n",
        email="a@b.c",
        display_name=None,
        incoming=None,  # type: ignore[arg-type]
        outgoing=None,  # type: ignore[arg-type]
        retrieval=RetrievalPolicy(poll_interval_minutes=minutes),
        created_at=now,
        updated_at=now,
        login_delay_s=login_delay_s,
    )


# The rule ------------------------------------------------------------------------------------


def test_next_poll_follows_the_end_the_interval_and_the_login_delay_floor() -> None:
    end = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    five = polled_account(5)
    assert next_poll_at(five, end, None) == end + timedelta(minutes=5)
    assert next_poll_at(five, end, "auth_failed") == end + timedelta(minutes=5)
    # A locked mailbox is tried again sooner, never sooner than LOGIN-DELAY allows.
    assert next_poll_at(five, end, "mailbox_locked") == end + timedelta(seconds=LOCKED_RETRY_S)
    slow = polled_account(5, login_delay_s=900)
    assert next_poll_at(slow, end, None) == end + timedelta(seconds=900)
    assert next_poll_at(slow, end, "mailbox_locked") == end + timedelta(seconds=900)
    # The delay the server announced in this session wins over the one stored.
    assert next_poll_at(five, end, None, login_delay_s=600) == end + timedelta(seconds=600)
    assert next_poll_at(polled_account(None), end, None) is None


def test_first_polls_spread_at_a_stable_offset_within_the_interval() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    account = polled_account(60)
    first = first_poll_at(account, now, 300.0)
    assert first == now + timedelta(seconds=spread_fraction(account.id) * 300.0)
    assert first_poll_at(account, now + timedelta(hours=1), 300.0) == first + timedelta(hours=1)
    # A shorter interval bounds the spread; no spread: at once; not polled: none.
    assert first_poll_at(polled_account(1), now, 300.0) == now + timedelta(
        seconds=spread_fraction(account.id) * 60.0
    )
    assert first_poll_at(account, now, 0.0) == now
    assert first_poll_at(polled_account(None), now, 300.0) is None
    fractions = [spread_fraction(f"acc_{i:05d}") for i in range(1000)]
    assert all(0.0 <= f < 1.0 for f in fractions)
    # Uniform enough: every tenth of the window holds a fair share of 1,000 accounts.
    tenths = collections.Counter(int(f * 10) for f in fractions)
    assert sorted(tenths) == list(range(10)) and min(tenths.values()) > 60, tenths


# In the app ----------------------------------------------------------------------------------


async def test_the_schedule_is_kept_in_the_store_across_a_restart(
    tmp_path: Path, dovecot: Any, mailbox: Any
) -> None:
    settings = settings_for(tmp_path, dovecot)
    mailbox.deliver(b"Subject: first\n\nhi\n")
    async with running(settings) as client:
        account = await create_account(client, dovecot, mailbox, poll_interval_minutes=60)
        (done,) = await polled(client, account)
        assert (done["trigger"], done["status"]) == ("schedule", "succeeded"), done
        due = await next_poll(settings, account)
        # The next poll: the end of this one plus the interval.
        assert due == at(done["finished_at"]) + timedelta(minutes=60), (due, done)
    other = dovecot.add_user()
    async with running(settings) as client:
        # The restarted scheduler polls an account that is due (a new one) ...
        fresh = await create_account(client, dovecot, other, poll_interval_minutes=60)
        await polled(client, fresh)
        # ... and leaves the first alone: its schedule came back from the store.
        assert len(await retrievals_of(client, account)) == 1
        assert await next_poll(settings, account) == due


async def test_due_polls_start_as_slots_free_not_once_per_tick(
    tmp_path: Path, dovecot: Any
) -> None:
    # One slot and a tick of an hour: five due polls can only all run within the suite's
    # wait if each end starts the next.
    settings = settings_for(tmp_path, dovecot, scheduler_interval_s=HOUR_S)
    mailboxes = [dovecot.add_user() for _ in range(5)]
    async with running(settings) as client:
        accounts = [
            await create_account(client, dovecot, m, poll_interval_minutes=60) for m in mailboxes
        ]
    # All five due now, whether or not that first process got to poll any before it
    # stopped (its scheduler looks for new accounts at start, then once an hour).
    async with own_store(settings) as store:
        await store.accounts.schedule_polls([(account, utcnow()) for account in accounts])
    # Restarted with one slot (the same store and keys).
    async with running(msgspec.structs.replace(settings, max_concurrent_retrievals=1)) as client:
        for account in accounts:
            await until(
                lambda: retrievals_of(client, account),
                lambda items: any(
                    (i["trigger"], i["status"]) == ("schedule", "succeeded") for i in items
                ),
            )


async def test_first_polls_of_many_accounts_are_spread(tmp_path: Path, dovecot: Any) -> None:
    settings = settings_for(tmp_path, dovecot, scheduler_interval_s=HOUR_S)
    accounts = []
    async with running(settings) as client:
        for i in range(40):
            body = account_json(dovecot, dovecot.add_user(), poll_interval_minutes=5)
            body["name"] = f"spread {i}"
            response = await client.post("/v1/accounts", json=body)
            assert response.status_code == 201, response.text
            accounts.append(response.json()["id"])
    # Scheduled together at the start: each at its own stable offset within 5 minutes.
    started = utcnow()
    async with running(msgspec.structs.replace(settings, poll_spread_s=300.0)) as client:
        await client.get("/health")
        async with own_store(settings) as store:

            async def schedule() -> dict[str, datetime | None]:
                return {a: await store.accounts.next_poll_at(a) for a in accounts}

            due = await until(schedule, lambda found: all(found.values()))
            read = utcnow()
    # An account whose offset had passed when the schedule was read may have been claimed
    # by then (its next poll moved to the claim's lease): only the others show the spread.
    elapsed_s = (read - started).total_seconds()
    times = {
        a: t for a, t in due.items() if t is not None and spread_fraction(a) * 300.0 > elapsed_s
    }
    assert len(times) >= 30, (elapsed_s, len(times))
    origins = {t - timedelta(seconds=spread_fraction(a) * 300.0) for a, t in times.items()}
    # One scheduling time for all: the offsets are exactly the accounts' own.
    assert max(origins) - min(origins) < timedelta(milliseconds=1), origins
    offsets = sorted((t - min(origins)).total_seconds() for t in times.values())
    assert 0 <= offsets[0] and offsets[-1] < 300.0
    per_second = collections.Counter(int(o) for o in offsets)
    assert max(per_second.values()) <= 4, per_second
    assert offsets[-1] - offsets[0] > 150.0, offsets


async def test_the_login_delay_is_a_floor_for_the_next_poll(tmp_path: Path, dovecot: Any) -> None:
    mini = MiniPOP3(
        messages=[b"Subject: hi\r\n\r\nhi\r\n"],
        capabilities=("USER", "UIDL", "PIPELINING", "LOGIN-DELAY 900"),
    )
    settings = settings_for(tmp_path, dovecot)
    async with ScriptedServer(mini) as server, running(settings) as client:
        body = scripted_account(server.port, poll_interval_minutes=1)
        account = (await client.post("/v1/accounts", json=body)).json()["id"]
        (done,) = await polled(client, account)
        assert done["status"] == "succeeded", done
        due = await next_poll(settings, account)
        assert due == at(done["finished_at"]) + timedelta(seconds=900), (due, done)


async def test_a_locked_mailbox_is_polled_again_sooner(tmp_path: Path, dovecot: Any) -> None:
    async def locked(session: Session, line: bytes) -> bool:
        session.send(b"-ERR [IN-USE] Mailbox is locked by another session\r\n")
        return False

    mini = MiniPOP3(replies={"PASS": locked})
    settings = settings_for(tmp_path, dovecot)
    async with ScriptedServer(mini) as server, running(settings) as client:
        body = scripted_account(server.port, poll_interval_minutes=60)
        account = (await client.post("/v1/accounts", json=body)).json()["id"]
        (done,) = await polled(client, account)
        assert done["error"]["code"] == "mailbox_locked", done
        due = await next_poll(settings, account)
        assert due == at(done["finished_at"]) + timedelta(seconds=LOCKED_RETRY_S), (due, done)


async def test_a_tenant_at_its_share_does_not_hold_back_other_tenants(
    tmp_path: Path, dovecot: Any
) -> None:
    # Two slots, two tenants: a share of one each. Sessions hang at PASS until released.
    settings = settings_for(tmp_path, dovecot, max_concurrent_retrievals=2)
    async with held_at_pass() as (server, release), running(settings) as client:
        # The default tenant's three accounts fall due first.
        mine = []
        for i in range(3):
            body = scripted_account(server.port, poll_interval_minutes=60)
            body["name"] = f"mine {i}"
            mine.append((await client.post("/v1/accounts", json=body)).json()["id"])
        other_headers = {"Authorization": f"Bearer {OTHER_TENANT_KEY}"}
        body = scripted_account(server.port, poll_interval_minutes=60)
        theirs = (await client.post("/v1/accounts", json=body, headers=other_headers)).json()["id"]

        async def running_now() -> list[str]:
            found = [a for a in mine if await retrievals_of(client, a)]
            if await retrievals_of(client, theirs, OTHER_TENANT_KEY):
                found.append(theirs)
            return found

        # Both slots taken: one by each tenant, though three of mine were due first.
        started = await until(running_now, lambda found: len(found) == 2)
        assert theirs in started and len(set(started) & set(mine)) == 1, started
        release.set()
        for account in mine:
            (done,) = await polled(client, account)
            assert done["status"] == "succeeded", done
        (done,) = await polled(client, theirs, key=OTHER_TENANT_KEY)
        assert done["status"] == "succeeded", done


async def test_a_poll_stored_at_its_end_has_its_record_and_event(
    tmp_path: Path, dovecot: Any
) -> None:
    # ``add_ended`` (both stores): the row as it ended, its event, in one transaction; an
    # account deleted meanwhile gets neither.
    settings = settings_for(tmp_path, dovecot, scheduler_interval_s=HOUR_S)
    async with running(settings) as client:
        account = await create_account(client, dovecot, dovecot.add_user())
        now = utcnow()
        ended = Retrieval(
            id=new_id("ret"),
            account_id=account,
            trigger=RetrievalTrigger.SCHEDULE,
            status=RetrievalStatus.SUCCEEDED,
            created_at=now,
            started_at=now,
            finished_at=now + timedelta(milliseconds=5),
            messages_on_server=3,
        )
        async with own_store(settings) as store:
            stored = await store.retrievals.add_ended(
                ended, tenant="default", next_poll_at=now + timedelta(hours=1)
            )
            assert stored
            # Not polled: the next poll is left unset.
            assert await store.accounts.next_poll_at(account) is None
            gone = msgspec.structs.replace(ended, id=new_id("ret"), account_id="acc_gone")
            assert not await store.retrievals.add_ended(gone, tenant="default")
        (listed,) = await retrievals_of(client, account)
        assert (listed["id"], listed["status"], listed["trigger"]) == (
            ended.id,
            "succeeded",
            "schedule",
        )
        assert listed["messages_on_server"] == 3 and listed["finished_at"] is not None
        events = await feed_until(client, bool, types="retrieval.succeeded")
        assert [e["data"]["retrieval_id"] for e in events] == [ended.id]
