"""Claims under a lease: two processes never claim one message, an expired claim is taken
back by another, and a heartbeat keeps a long send's claim alive.

The repository tests run on a real SQLite file; the worker tests run the app against a
real SMTP server (aiosmtpd) with a short lease.
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
from service.domain.accounts import SMTPPause
from service.domain.enums import OutgoingStatus, RecipientKind
from service.domain.ids import new_id
from service.domain.outbox import NewOutgoing, NewRecipient
from service.domain.time import from_text, to_text, utcnow
from service.repository.database import Database
from service.repository.outbox import SQLiteOutboxRepository
from tests.outbox.conftest import (
    ClientFactory,
    create_account,
    get_message,
    in_app,
    send,
    wait_status,
)
from tests.servers.smtp import SMTPDServer
from tests.waiting import until

# Short enough that a test sees several renewals and expiries, long enough for a loaded
# machine to renew in time (a renewal every third of it).
SHORT_LEASE_S = 0.6


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[tuple[Database, SQLiteOutboxRepository]]:
    db = Database(str(tmp_path / "leases.db"))
    await db.open()
    try:
        yield db, SQLiteOutboxRepository(db)
    finally:
        await db.close()


async def add_account(db: Database, account_id: str = "acc_1") -> str:
    now = to_text(utcnow())
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO accounts (id, tenant, name, email, in_host, in_port, in_security,"
            " in_username, in_password, out_host, out_port, out_security, created_at,"
            " updated_at) VALUES (?, 't', 'n', 'a@example.com', 'pop.example.com', 995, 'tls',"
            " 'a', 'x', 'smtp.example.com', 587, 'starttls', ?, ?)",
            (account_id, now, now),
        )
    return account_id


async def accept(outbox: SQLiteOutboxRepository, account_id: str, count: int) -> list[str]:
    now = utcnow()
    ids = []
    for i in range(count):
        message = NewOutgoing(
            id=new_id("out"),
            account_id=account_id,
            message_id=f"<{i}@leases.test>",
            mail_from="a@example.com",
            subject=f"m{i}",
            smtputf8=False,
            raw=b"Subject: m\r\n\r\nhi\r\n",
            recipients=(NewRecipient("b@example.org", RecipientKind.TO),),
            idempotency_key=None,
            request_hash=None,
            created_at=now,
            expires_at=now + timedelta(days=1),
        )
        assert await outbox.accept(message) is None
        ids.append(message.id)
    return ids


async def claims(db: Database) -> dict[str, tuple[str, str | None, str | None]]:
    rows = await db.fetch_all("SELECT id, status, claimed_by, lease_until FROM outbox")
    return {r["id"]: (r["status"], r["claimed_by"], r["lease_until"]) for r in rows}


async def test_two_owners_never_claim_the_same_message(
    store: tuple[Database, SQLiteOutboxRepository],
) -> None:
    db, outbox = store
    account = await add_account(db)
    ids = await accept(outbox, account, 40)
    now = utcnow()
    lease = now + timedelta(minutes=1)

    async def claim_all(owner: str) -> list[str]:
        taken: list[str] = []
        while batch := await outbox.claim(account, now, 3, owner=owner, lease_until=lease):
            taken += [m.id for m in batch]
        return taken

    first, second = await asyncio.gather(claim_all("rep_a"), claim_all("rep_b"))
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(ids)
    assert first and second  # both really competed
    stored = await claims(db)
    assert {i for i in first if stored[i][1] == "rep_a"} == set(first)
    assert {i for i in second if stored[i][1] == "rep_b"} == set(second)
    assert all(
        s[0] == OutgoingStatus.SENDING.value and s[2] == to_text(lease) for s in stored.values()
    )


async def test_an_expired_claim_is_taken_back_by_another_owner(
    store: tuple[Database, SQLiteOutboxRepository],
) -> None:
    db, outbox = store
    account = await add_account(db)
    [outgoing_id] = await accept(outbox, account, 1)
    now = utcnow()
    until_ = now + timedelta(seconds=30)
    [claimed] = await outbox.claim(account, now, 10, owner="rep_dead", lease_until=until_)
    # Another process's sweep before the lease ends: nothing to take back.
    assert await outbox.recover_expired(until_ - timedelta(microseconds=1)) == 0
    assert (await claims(db))[outgoing_id][:2] == ("sending", "rep_dead")
    assert await outbox.claim(account, until_, 10, owner="rep_b", lease_until=until_) == []
    # Once it has expired, the sweep makes it due again with an ``interrupted`` attempt.
    later = until_ + timedelta(seconds=1)
    assert await outbox.recover_expired(later) == 1
    assert (await claims(db))[outgoing_id] == ("queued", None, None)
    message = await outbox.get(account, outgoing_id)
    assert message is not None
    [attempt] = message.attempts
    assert (attempt.outcome.value, attempt.error_code) == ("interrupted", "interrupted")
    assert attempt.at == now  # when it was taken
    assert message.error is not None and message.error.code == "interrupted"
    # Another owner takes it over: the same Message-ID goes out again.
    [again] = await outbox.claim(
        account, later, 10, owner="rep_b", lease_until=later + timedelta(seconds=30)
    )
    assert (again.id, again.message_id) == (outgoing_id, claimed.message_id)
    assert (await claims(db))[outgoing_id][1] == "rep_b"
    assert await outbox.recover_expired(later) == 0  # rep_b's lease is alive


async def test_renew_keeps_a_claim_alive_and_only_for_its_owner(
    store: tuple[Database, SQLiteOutboxRepository],
) -> None:
    db, outbox = store
    account = await add_account(db)
    ids = await accept(outbox, account, 2)
    now = utcnow()
    short = now + timedelta(seconds=1)
    await outbox.claim(account, now, 10, owner="rep_a", lease_until=short)
    longer = now + timedelta(seconds=60)
    assert await outbox.renew("rep_b", ids, longer) == 0  # not rep_b's
    assert await outbox.renew("rep_a", ids, longer) == 2
    assert await outbox.recover_expired(short + timedelta(seconds=1)) == 0
    assert {c[2] for c in (await claims(db)).values()} == {to_text(longer)}
    assert await outbox.recover_expired(longer + timedelta(seconds=1)) == 2
    assert await outbox.renew("rep_a", ids, longer) == 0  # taken back: no longer held


async def test_release_and_everything(store: tuple[Database, SQLiteOutboxRepository]) -> None:
    db, outbox = store
    account = await add_account(db)
    ids = await accept(outbox, account, 3)
    now = utcnow()
    lease = now + timedelta(minutes=5)
    await outbox.claim(account, now, 10, owner="rep_a", lease_until=lease)
    await outbox.release(ids[:1], now)
    assert (await claims(db))[ids[0]] == ("queued", None, None)
    # A process alone on its store takes back every claim at start, live leases or not.
    assert await outbox.recover_expired(now) == 0
    assert await outbox.recover_expired(now, everything=True) == 2
    assert all(c == ("queued", None, None) for c in (await claims(db)).values())


# The worker: heartbeat and sweep ------------------------------------------------------------


@pytest.fixture
def short_lease(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(leases_module, "LEASE_S", SHORT_LEASE_S)
    return SHORT_LEASE_S


async def lease_of(client: AsyncTestClient[Any], outgoing_id: str) -> tuple[str | None, str | None]:
    row = await client.app.state.db.fetch_one(
        "SELECT claimed_by, lease_until FROM outbox WHERE id = ?", (outgoing_id,)
    )
    return row["claimed_by"], row["lease_until"]


@pytest.mark.sqlite_only  # reads the lease columns with SQLite SQL
async def test_the_heartbeat_keeps_a_long_send_claimed(
    short_lease: float, client_factory: ClientFactory, smtpd_factory: Any
) -> None:
    smtpd: SMTPDServer = await smtpd_factory(pause_before="DATA")
    client = await client_factory()
    account = await create_account(client, smtpd)
    message = await send(client, account)
    await smtpd.recorder.paused.wait()  # the send is under way and held at DATA
    owner, first_lease = await lease_of(client, message["id"])
    assert owner is not None and owner.startswith("rep_") and first_lease is not None
    # Held over several lease lengths: renewed each time, never taken back by a sweep.
    deadline = from_text(first_lease) + timedelta(seconds=3 * short_lease)
    outbox = client.app.state.store.outbox
    for _ in range(3):
        before = (await lease_of(client, message["id"]))[1]
        assert before is not None
        renewed = await until(
            functools.partial(lease_of, client, message["id"]),
            lambda held, before=before: held[1] is not None and held[1] > before,
        )
        assert renewed[0] == owner
        # Another process's sweep, now: the claim is alive.
        now = utcnow()
        assert await in_app(client, functools.partial(outbox.recover_expired, now)) == 0
    await until(
        functools.partial(lease_of, client, message["id"]),
        lambda held: held[1] is not None and from_text(held[1]) > deadline,
    )
    assert (await get_message(client, account, message["id"]))["status"] == "sending"
    smtpd.recorder.resume.set()
    done = await wait_status(client, account, message["id"])
    assert done["status"] == "sent"
    assert [a["outcome"] for a in done["attempts"]] == ["sent"]  # never interrupted
    assert len(smtpd.messages) == 1
    assert await lease_of(client, message["id"]) == (None, None)


async def test_a_dead_process_claim_is_taken_over_and_delivered(
    short_lease: float, client_factory: ClientFactory, smtpd: SMTPDServer
) -> None:
    client = await client_factory()
    account = await create_account(client, smtpd)
    # Paused, so this process leaves the message alone while "another process" claims it.
    accounts = client.app.state.store.accounts
    current = await in_app(client, functools.partial(accounts.get_any, account))
    pause = SMTPPause(code="auth_failed", detail="paused by the test", since=utcnow())
    pausing = functools.partial(accounts.pause_smtp, account, pause, settings_of=current.updated_at)
    assert await in_app(client, pausing)
    message = await send(client, account)
    outbox = client.app.state.store.outbox
    now = utcnow()
    claim = functools.partial(
        outbox.claim,
        account,
        now,
        10,
        owner="rep_dead",
        lease_until=now + timedelta(seconds=short_lease),
    )
    [claimed] = await in_app(client, claim)  # and that process dies holding it
    assert claimed.id == message["id"]
    # The pause ends: this process would deliver at once, but the message is claimed.
    response = await client.patch(f"/v1/accounts/{account}", json={"outgoing": {}})
    assert response.status_code == 200, response.text
    # This process's periodic sweep finds the expired lease and takes the message over.
    done = await wait_status(client, account, message["id"])
    assert done["status"] == "sent"
    outcomes = [(a["outcome"], a["error_code"]) for a in done["attempts"]]
    assert outcomes == [("interrupted", "interrupted"), ("sent", None)]
    [received] = smtpd.messages
    assert f"Message-ID: {claimed.message_id}".encode() in received.data
