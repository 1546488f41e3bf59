"""The outbox, its claims and leases: the same behaviour on both stores."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from service.codes import ErrorCode
from service.domain.accounts import Account, SMTPPause
from service.domain.enums import OutgoingStatus, RecipientStatus
from service.domain.outbox import (
    Attempt,
    AttemptOutcome,
    DeliveryOutcome,
    OutgoingError,
    RecipientUpdate,
)
from service.domain.time import utcnow
from service.repository.errors import DuplicateError
from service.repository.outbox import ExistingKey
from service.repository.store import Store
from tests.repository.conftest import T0, make_account, new_outgoing

LEASE = timedelta(minutes=1)


async def test_accepted_message_reads_back(store: Store, account: Account) -> None:
    message = new_outgoing(account.id)
    assert await store.outbox.accept(message) is None
    got = await store.outbox.get(account.id, message.id)
    assert got == message.as_message()
    assert await store.outbox.raw(account.id, message.id) == message.raw
    assert await store.outbox.get("acc_other", message.id) is None
    assert await store.stats.outbox_by_status() == {"queued": 1}


async def test_scheduled_messages_are_counted_apart_until_due(
    store: Store, account: Account
) -> None:
    ahead = utcnow() + timedelta(hours=1)
    await store.outbox.accept(new_outgoing(account.id, send_at=ahead))
    await store.outbox.accept(new_outgoing(account.id, send_at=T0))  # already due: queued
    await store.outbox.accept(new_outgoing(account.id))
    assert await store.stats.outbox_by_status() == {"scheduled": 1, "queued": 2}


async def test_idempotency_key_names_the_first_message(store: Store, account: Account) -> None:
    first = new_outgoing(account.id, idempotency_key="k1", request_hash="h1")
    assert await store.outbox.accept(first) is None
    again = new_outgoing(account.id, idempotency_key="k1", request_hash="h2")
    assert await store.outbox.accept(again) == ExistingKey(first.id, "h1")
    assert await store.outbox.find_key(account.id, "k1") == ExistingKey(first.id, "h1")
    assert await store.outbox.find_key(account.id, "k2") is None
    # Concurrent acceptances with one key: exactly one message is stored.
    racing = [new_outgoing(account.id, idempotency_key="k2", request_hash="h") for _ in range(8)]
    results = await asyncio.gather(*(store.outbox.accept(m) for m in racing))
    winners = [m.id for m, r in zip(racing, results, strict=True) if r is None]
    assert len(winners) == 1
    assert all(r == ExistingKey(winners[0], "h") for r in results if r is not None)
    page = await store.outbox.page(account.id, None, after=None, limit=50)
    assert len(page.items) == 2


async def test_acceptance_for_a_deleted_account_fails_alone(store: Store, account: Account) -> None:
    gone = make_account()
    good = [new_outgoing(account.id) for _ in range(3)]
    results = await asyncio.gather(
        *(store.outbox.accept(m) for m in good),
        store.outbox.accept(new_outgoing(gone.id)),
        return_exceptions=True,
    )
    assert results[:3] == [None, None, None]
    assert isinstance(results[3], DuplicateError)
    for message in good:
        assert await store.outbox.get(account.id, message.id) is not None


async def test_pages_newest_first_by_status(store: Store, account: Account) -> None:
    messages = [new_outgoing(account.id) for _ in range(4)]
    for message in messages:
        await store.outbox.accept(message)
    assert await store.outbox.cancel(account.id, messages[1].id, T0)
    assert not await store.outbox.cancel(account.id, messages[1].id, T0)
    ids = [m.id for m in reversed(messages)]
    first = await store.outbox.page(account.id, None, after=None, limit=3)
    assert [m.id for m in first.items] == ids[:3] and first.next_after == ids[2]
    rest = await store.outbox.page(account.id, None, after=first.next_after, limit=3)
    assert [m.id for m in rest.items] == ids[3:] and rest.next_after is None
    queued = await store.outbox.page(account.id, OutgoingStatus.QUEUED, after=None, limit=10)
    assert [m.id for m in queued.items] == [ids[0], ids[1], ids[3]]
    cancelled = await store.outbox.page(account.id, OutgoingStatus.CANCELLED, after=None, limit=10)
    assert [m.id for m in cancelled.items] == [messages[1].id]


async def test_two_owners_claiming_at_once_never_share(store: Store, account: Account) -> None:
    messages = [new_outgoing(account.id) for _ in range(40)]
    for message in messages:
        await store.outbox.accept(message)

    async def claim_all(owner: str) -> list[str]:
        taken: list[str] = []
        while batch := await store.outbox.claim(
            account.id, T0, 3, owner=owner, lease_until=T0 + LEASE
        ):
            taken += [m.id for m in batch]
            await asyncio.sleep(0)
        return taken

    claims = await asyncio.gather(*(claim_all(f"rep_{n}") for n in range(4)))
    every = [i for taken in claims for i in taken]
    assert sorted(every) == sorted(m.id for m in messages)  # each exactly once
    one = await store.outbox.get(account.id, messages[0].id)
    assert one is not None and one.status == OutgoingStatus.SENDING


async def test_claim_takes_due_messages_with_bodies_and_recipients(
    store: Store, account: Account
) -> None:
    message = new_outgoing(account.id)
    await store.outbox.accept(message)
    assert (
        await store.outbox.claim(
            account.id, T0 - timedelta(seconds=1), 10, owner="a", lease_until=T0 + LEASE
        )
        == []
    )  # not due yet
    [claimed] = await store.outbox.claim(account.id, T0, 10, owner="a", lease_until=T0 + LEASE)
    assert (claimed.id, claimed.raw, claimed.attempt_count) == (message.id, message.raw, 0)
    assert [(r.position, r.address, r.status) for r in claimed.recipients] == [
        (0, "bob@example.com", RecipientStatus.PENDING),
        (1, "carol@example.com", RecipientStatus.PENDING),
    ]
    assert claimed.created_at == T0 and claimed.expires_at == message.expires_at
    # A claimed message cannot be cancelled behind the sender's back.
    assert not await store.outbox.cancel(account.id, message.id, T0)


async def test_expired_leases_are_recovered_with_an_interrupted_attempt(
    store: Store, account: Account
) -> None:
    a, b = new_outgoing(account.id), new_outgoing(account.id)
    await store.outbox.accept(a)
    await store.outbox.accept(b)
    [got_a] = await store.outbox.claim(account.id, T0, 1, owner="rep_a", lease_until=T0 + LEASE)
    [got_b] = await store.outbox.claim(account.id, T0, 1, owner="rep_b", lease_until=T0 + LEASE)
    assert {got_a.id, got_b.id} == {a.id, b.id}
    assert await store.outbox.renew("rep_a", [got_a.id, got_b.id], T0 + 3 * LEASE) == 1
    assert await store.outbox.recover_expired(T0 + LEASE / 2) == 0  # nothing expired yet
    later = T0 + 2 * LEASE
    assert await store.outbox.recover_expired(later) == 1  # rep_b's
    recovered = await store.outbox.get(account.id, got_b.id)
    assert recovered is not None
    assert (recovered.status, recovered.next_attempt_at) == (OutgoingStatus.QUEUED, later)
    assert recovered.error == OutgoingError(ErrorCode.INTERRUPTED, recovered.error.detail)  # type: ignore[union-attr]
    assert [(x.outcome, x.error_code, x.at) for x in recovered.attempts] == [
        (AttemptOutcome.INTERRUPTED, ErrorCode.INTERRUPTED, T0)
    ]
    assert await store.outbox.renew("rep_b", [got_b.id], T0 + 5 * LEASE) == 0  # lost it
    # Another owner takes it over.
    [again] = await store.outbox.claim(account.id, later, 5, owner="rep_c", lease_until=later)
    assert again.id == got_b.id
    # At the start of the only process of a store: everything, leases or not.
    assert await store.outbox.recover_expired(T0, everything=True) == 2


async def test_outcomes_releases_and_interruptions(store: Store, account: Account) -> None:
    sent, deferred, released, cut = (new_outgoing(account.id) for _ in range(4))
    for message in (sent, deferred, released, cut):
        await store.outbox.accept(message)
    claimed = await store.outbox.claim(account.id, T0, 10, owner="a", lease_until=T0 + LEASE)
    assert len(claimed) == 4
    at = T0 + timedelta(seconds=5)
    attempt = Attempt(
        at=at, outcome=AttemptOutcome.SENT, smtp_code=250, smtp_message="ok", error_code=None
    )
    retry = Attempt(
        at=at, outcome=AttemptOutcome.DEFERRED, smtp_code=451, smtp_message="later",
        error_code="server_busy",
    )  # fmt: skip
    await store.outbox.record(
        [
            DeliveryOutcome(
                outgoing_id=sent.id,
                status=OutgoingStatus.SENT,
                at=at,
                next_attempt_at=None,
                sent_at=at,
                attempt=attempt,
                count_attempt=True,
                recipients=(
                    RecipientUpdate(0, RecipientStatus.SENT, 250, "ok"),
                    RecipientUpdate(1, RecipientStatus.SENT, 250, "ok"),
                ),
                error=None,
            ),
            DeliveryOutcome(
                outgoing_id=deferred.id,
                status=OutgoingStatus.DEFERRED,
                at=at,
                next_attempt_at=at + timedelta(minutes=5),
                sent_at=None,
                attempt=retry,
                count_attempt=True,
                recipients=(RecipientUpdate(0, RecipientStatus.DEFERRED, 451, "later"),),
                error=OutgoingError("server_busy", "later"),
            ),
        ]
    )
    await store.outbox.release([released.id], at)
    await store.outbox.interrupt({cut.id: T0 + timedelta(seconds=1)}, at)
    got = {m.id: m for m in (await store.outbox.page(account.id, None, after=None, limit=9)).items}
    assert got[sent.id].status == OutgoingStatus.SENT and got[sent.id].sent_at == at
    assert [r.status for r in got[sent.id].recipients] == [RecipientStatus.SENT] * 2
    assert got[sent.id].attempts == [attempt] and got[sent.id].attempt_count == 1
    assert got[deferred.id].status == OutgoingStatus.DEFERRED
    assert got[deferred.id].next_attempt_at == at + timedelta(minutes=5)
    assert got[deferred.id].error == OutgoingError("server_busy", "later")
    assert got[released.id].status == OutgoingStatus.QUEUED
    assert (got[released.id].next_attempt_at, got[released.id].attempts) == (at, [])
    assert got[cut.id].status == OutgoingStatus.QUEUED and got[cut.id].attempt_count == 0
    assert [(x.outcome, x.at) for x in got[cut.id].attempts] == [
        (AttemptOutcome.INTERRUPTED, T0 + timedelta(seconds=1))
    ]
    # Nothing is left claimed: a sweep at the end of time finds nothing.
    assert await store.outbox.recover_expired(T0 + timedelta(days=999)) == 0
    assert await store.stats.outbox_by_status() == {"sent": 1, "deferred": 1, "queued": 2}


async def test_due_accounts_next_due_pauses_and_expiry(store: Store) -> None:
    a, b, c = make_account(), make_account(tenant="other"), make_account()
    for account in (a, b, c):
        await store.accounts.add(account)
    await store.outbox.accept(new_outgoing(a.id, created_at=T0 + timedelta(seconds=2)))
    await store.outbox.accept(new_outgoing(a.id, created_at=T0 + timedelta(seconds=3)))
    await store.outbox.accept(new_outgoing(b.id, created_at=T0 + timedelta(seconds=1)))
    old = new_outgoing(c.id, created_at=T0, expires_at=T0 + timedelta(seconds=10))
    await store.outbox.accept(old)
    now = T0 + timedelta(seconds=5)
    due = await store.outbox.due_accounts(now, 10)
    assert [(d.account_id, d.due, d.tenant) for d in due] == [
        (c.id, 1, "default"),
        (b.id, 1, "other"),
        (a.id, 2, "default"),
    ]
    assert due[0].updated_at == T0
    assert [d.account_id for d in await store.outbox.due_accounts(now, 1)] == [c.id]
    other_only = await store.outbox.due_accounts(now, 10, exclude_tenants=["default"])
    assert [d.account_id for d in other_only] == [b.id]
    assert await store.outbox.next_due([c.id]) == T0 + timedelta(seconds=1)
    assert await store.outbox.next_due([c.id], exclude_tenants=["other"]) == T0 + timedelta(
        seconds=2
    )
    # A paused account has nothing due, and its messages show why.
    pause = SMTPPause(code="auth_failed", detail="refused", since=now)
    assert await store.accounts.pause_smtp(c.id, pause, settings_of=T0)
    await store.outbox.note_hold(c.id, OutgoingError("auth_failed", "refused"), now)
    assert c.id not in [d.account_id for d in await store.outbox.due_accounts(now, 10)]
    held = await store.outbox.get(c.id, old.id)
    assert held is not None and held.next_attempt_at is None
    assert held.error == OutgoingError("auth_failed", "refused")
    # Expiry fails it (paused or not), with every open recipient.
    assert await store.outbox.expire_overdue(T0 + timedelta(seconds=10)) == 1
    expired = await store.outbox.get(c.id, old.id)
    assert expired is not None and expired.status == OutgoingStatus.FAILED
    assert expired.error is not None and expired.error.code == ErrorCode.EXPIRED
    assert expired.error.detail.endswith("the last attempt: refused")
    assert [r.status for r in expired.recipients] == [RecipientStatus.FAILED] * 2
    assert await store.outbox.next_due([a.id, b.id]) is None


@pytest.mark.parametrize("n", [1])
async def test_bytes_of_every_value_survive(store: Store, account: Account, n: int) -> None:
    raw = bytes(range(256)) * 64 + b"\r\n.\r\n"
    message = new_outgoing(account.id, raw=raw)
    await store.outbox.accept(message)
    assert await store.outbox.raw(account.id, message.id) == raw
    [claimed] = await store.outbox.claim(account.id, T0, n, owner="a", lease_until=T0 + LEASE)
    assert claimed.raw == raw
