"""Linking DSNs on both stores: once, only within the account, after a restart, and with
two processes (replicas) linking at the same time."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest

from service.domain.accounts import Account
from service.domain.enums import OutgoingStatus, RecipientStatus
from service.domain.outbox import (
    Attempt,
    AttemptOutcome,
    DeliveryOutcome,
    NewOutgoing,
    OutgoingMessage,
    RecipientUpdate,
)
from service.domain.retrievals import NewMessage, RetrievalProgress
from service.repository.errors import StoreUnavailableError
from service.repository.store import Store
from service.services.bounces import BounceService
from tests.bounces.conftest import dsn_bytes, open_store
from tests.repository.conftest import T0, make_account, new_message, new_outgoing

PROGRESS = RetrievalProgress(
    messages_on_server=None,
    messages_downloaded=0,
    bytes_downloaded=0,
    messages_deleted=0,
    messages_skipped=0,
)
_counter = iter(range(1_000_000))


async def add_account(store: Store, tenant: str = "default") -> Account:
    account = make_account(tenant)
    await store.accounts.add(account)
    return account


async def sent(store: Store, account: Account, *, deliver: bool = True) -> NewOutgoing:
    """An accepted message to bob and carol; ``deliver``: the server took both."""
    message = new_outgoing(account.id)
    assert await store.outbox.accept(message) is None
    if deliver:
        at = T0 + timedelta(seconds=1)
        await store.outbox.record(
            [
                DeliveryOutcome(
                    outgoing_id=message.id,
                    status=OutgoingStatus.SENT,
                    at=at,
                    next_attempt_at=None,
                    sent_at=at,
                    attempt=Attempt(
                        at=at,
                        outcome=AttemptOutcome.SENT,
                        smtp_code=250,
                        smtp_message="2.0.0 Ok",
                        error_code=None,
                    ),
                    count_attempt=True,
                    recipients=(
                        RecipientUpdate(0, RecipientStatus.SENT, 250, "2.0.0 Ok"),
                        RecipientUpdate(1, RecipientStatus.SENT, 250, "2.0.0 Ok"),
                    ),
                    error=None,
                )
            ]
        )
    return message


async def retrieve(store: Store, account: Account, *raws: bytes) -> list[str]:
    """Store ``raws`` as one retrieval batch; their message ids."""
    batch = []
    for raw in raws:
        summary = new_message(account.id, next(_counter)).summary
        batch.append(NewMessage(summary=summary, raw=raw))
    await store.messages.store_batch(account.id, batch, "ret_none", PROGRESS)
    return [m.summary.id for m in batch]


async def outgoing(store: Store, account: Account, outgoing_id: str) -> OutgoingMessage:
    found = await store.outbox.get(account.id, outgoing_id)
    assert found is not None
    return found


async def bounced_events(store: Store, tenant: str = "default") -> list[dict[str, object]]:
    """The tenant's ``outgoing.bounced`` rows in the event table, in insertion order.

    Read from the table, not the feed: on PostgreSQL the feed serves an event only once no
    older transaction runs anywhere on the server, which a busy shared server may delay.
    """
    db: Any = store.db  # type: ignore[attr-defined]
    if store.kind == "postgres":
        rows = await db.fetch_all(
            "SELECT data, account_id FROM events WHERE tenant = $1 AND type = $2 ORDER BY position",
            tenant,
            "outgoing.bounced",
        )
    else:
        rows = await db.fetch_all(
            "SELECT data, account_id FROM events WHERE tenant = ? AND type = ? ORDER BY position",
            (tenant, "outgoing.bounced"),
        )
    return [dict(json.loads(row[0]), account_id_of_event=row[1]) for row in rows]


async def test_a_dsn_marks_the_reported_recipient_once(store: Store) -> None:
    account = await add_account(store)
    message = await sent(store, account)
    dsn = dsn_bytes(["Bob@Example.com"], original_message_id=message.message_id)
    plain = b"Subject: hello\r\nContent-Type: text/plain\r\n\r\nnot a report\r\n"
    dsn_id, plain_id = await retrieve(store, account, dsn, plain)
    # Only the DSN is queued: the cheap header test leaves plain mail alone.
    assert [c.message_id for c in await store.bounces.candidates(10)] == [dsn_id]

    service = BounceService(store.bounces)
    assert await service.process() == 1
    got = await outgoing(store, account, message.id)
    bob, carol = got.recipients
    assert bob.status is RecipientStatus.BOUNCED
    assert bob.smtp_code == 250  # what the server said at delivery stays
    assert bob.bounce is not None
    assert bob.bounce.status == "5.1.1"
    assert bob.bounce.diagnostic_code == (
        "smtp; 550 5.1.1 <Bob@Example.com>: Recipient address rejected: User unknown"
    )
    assert bob.bounce.remote_mta == "mx.example.org"
    assert bob.bounce.message_id == dsn_id
    assert carol.status is RecipientStatus.SENT and carol.bounce is None
    assert got.status is OutgoingStatus.SENT
    assert got.bounces == [dsn_id]
    assert await store.bounces.bounce_of(account.id, [dsn_id, plain_id]) == {dsn_id: message.id}
    [event] = await bounced_events(store)
    assert event == {
        "outgoing_id": message.id,
        "account_id_of_event": account.id,
        "internet_message_id": message.message_id,
        "bounce_message_id": dsn_id,
        "recipients": [
            {
                "address": "bob@example.com",
                "status": "bounced",
                "smtp_code": 550,
                "dsn_status": "5.1.1",
                "diagnostic": bob.bounce.diagnostic_code,
                "remote_mta": "mx.example.org",
            }
        ],
    }
    # Done: nothing queued, and running again changes nothing and emits nothing.
    assert await store.bounces.candidates(10) == []
    assert await service.process() == 0
    assert len(await bounced_events(store)) == 1
    # Listed with the others, the links are there too.
    [listed] = [m for m in (await store.outbox.page(account.id, None, after=None, limit=10)).items]
    assert listed.bounces == [dsn_id] and listed.recipients[0].bounce == bob.bounce


async def test_matched_by_envelope_id_without_returned_headers(store: Store) -> None:
    account = await add_account(store)
    message = await sent(store, account)
    [dsn_id] = await retrieve(
        store,
        account,
        dsn_bytes(["carol@example.com"], original_message_id=None, envelope_id=message.id),
    )
    assert await BounceService(store.bounces).process() == 1
    got = await outgoing(store, account, message.id)
    assert [r.status for r in got.recipients] == [RecipientStatus.SENT, RecipientStatus.BOUNCED]
    assert got.bounces == [dsn_id]


async def test_only_the_accounts_own_messages_are_linked(store: Store) -> None:
    sender = await add_account(store)
    other = await add_account(store, tenant="other")
    message = await sent(store, sender)
    # The other account receives a DSN naming the sender's message (by both ids).
    [dsn_id] = await retrieve(
        store,
        other,
        dsn_bytes(
            ["bob@example.com"], original_message_id=message.message_id, envelope_id=message.id
        ),
    )
    assert await BounceService(store.bounces).process() == 0
    got = await outgoing(store, sender, message.id)
    assert [r.status for r in got.recipients] == [RecipientStatus.SENT] * 2
    assert got.bounces == []
    assert await store.bounces.bounce_of(other.id, [dsn_id]) == {}
    assert await store.bounces.candidates(10) == []
    assert await bounced_events(store, "other") == []


async def test_a_delay_report_links_without_bouncing(store: Store) -> None:
    """A DSN about the message that reports no failure (only a delay), and one about a
    recipient the server never accepted: linked, nobody marked, no event."""
    account = await add_account(store)
    message = await sent(store, account)
    pending = await sent(store, account, deliver=False)
    delay_id, early_id = await retrieve(
        store,
        account,
        dsn_bytes([], delayed=["bob@example.com"], original_message_id=message.message_id),
        dsn_bytes(["bob@example.com"], original_message_id=pending.message_id),
    )
    assert await BounceService(store.bounces).process() == 2
    got = await outgoing(store, account, message.id)
    assert [r.status for r in got.recipients] == [RecipientStatus.SENT] * 2
    assert got.bounces == [delay_id]
    waiting = await outgoing(store, account, pending.id)
    assert [r.status for r in waiting.recipients] == [RecipientStatus.PENDING] * 2
    assert waiting.bounces == [early_id]
    assert await bounced_events(store) == []


async def test_a_dsn_stored_before_a_crash_is_linked_at_the_next_start(
    store: Store, store_database: str
) -> None:
    account = await add_account(store)
    message = await sent(store, account)
    # Stored, then the process "dies" before linking: nothing but the queue knows.
    [dsn_id] = await retrieve(
        store, account, dsn_bytes(["bob@example.com"], original_message_id=message.message_id)
    )
    await store.close()
    restarted = open_store(store_database)
    await restarted.open()
    try:
        service = BounceService(restarted.bounces)
        await service.start()
        await service.stop()
        got = await outgoing(restarted, account, message.id)
        assert got.recipients[0].status is RecipientStatus.BOUNCED
        assert got.bounces == [dsn_id]
        assert len(await bounced_events(restarted)) == 1
    finally:
        await restarted.close()
        await store.open()  # the fixture closes it again


async def test_two_processes_linking_at_once_link_each_dsn_once(
    store: Store, store_database: str
) -> None:
    account = await add_account(store)
    messages = [await sent(store, account) for _ in range(5)]
    await retrieve(
        store,
        account,
        *(dsn_bytes(["bob@example.com"], original_message_id=m.message_id) for m in messages),
    )
    other = open_store(store_database)
    await other.open()
    try:
        counts = await asyncio.gather(
            BounceService(store.bounces, batch=2).process(),
            BounceService(other.bounces, batch=2).process(),
        )
    finally:
        await other.close()
    assert sum(counts) == 5
    events = await bounced_events(store)
    assert sorted(str(e["outgoing_id"]) for e in events) == sorted(m.id for m in messages)
    for m in messages:
        got = await outgoing(store, account, m.id)
        assert got.recipients[0].status is RecipientStatus.BOUNCED
        assert len(got.bounces) == 1


async def test_a_link_that_fails_stays_queued_for_the_sweep(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store fails while linking right after the batch: the retrieval is not
    disturbed (nothing raised) and the DSN is linked by the next sweep."""
    account = await add_account(store)
    message = await sent(store, account)
    [dsn_id] = await retrieve(
        store, account, dsn_bytes(["bob@example.com"], original_message_id=message.message_id)
    )

    async def unavailable(*args: object, **kwargs: object) -> None:
        raise StoreUnavailableError("the database cannot be reached")

    service = BounceService(store.bounces)
    with monkeypatch.context() as patched:
        patched.setattr(store.bounces, "link", unavailable)
        await service.after_batch(account.id)
    assert [c.message_id for c in await store.bounces.candidates(10)] == [dsn_id]
    assert (await outgoing(store, account, message.id)).bounces == []

    assert await service.process() == 1
    assert (await outgoing(store, account, message.id)).bounces == [dsn_id]
    assert len(await bounced_events(store)) == 1
