"""The message store: the same behaviour on both stores."""

from __future__ import annotations

from datetime import timedelta

import pytest

from service.domain.accounts import Account
from service.domain.enums import RetrievalStatus, RetrievalTrigger, ServerMessageState
from service.domain.ids import new_id
from service.domain.retrievals import MessageFilter, Retrieval, RetrievalProgress
from service.repository.errors import DuplicateError
from service.repository.store import Store
from tests.repository.conftest import T0, new_message

NO_PROGRESS = RetrievalProgress(
    messages_on_server=None,
    messages_downloaded=0,
    bytes_downloaded=0,
    messages_deleted=0,
    messages_skipped=0,
)


async def running(store: Store, account: Account) -> Retrieval:
    retrieval = Retrieval(
        id=new_id("ret"),
        account_id=account.id,
        trigger=RetrievalTrigger.API,
        status=RetrievalStatus.QUEUED,
        created_at=T0,
    )
    assert await store.retrievals.add(
        retrieval, owner="rep_a", lease_until=T0 + timedelta(minutes=1)
    )
    return retrieval


async def test_batch_stores_summaries_bytes_uidls_and_progress(
    store: Store, account: Account
) -> None:
    retrieval = await running(store, account)
    batch = [new_message(account.id, n) for n in range(3)]
    progress = RetrievalProgress(
        messages_on_server=3,
        messages_downloaded=3,
        bytes_downloaded=303,
        messages_deleted=0,
        messages_skipped=0,
    )
    await store.messages.store_batch(account.id, batch, retrieval.id, progress)
    for message in batch:
        assert await store.messages.get(account.id, message.summary.id) == message.summary
        assert await store.messages.raw(account.id, message.summary.id) == message.raw
    assert await store.messages.count(account.id) == 3
    known = await store.messages.known(account.id)
    assert {u: k.state for u, k in known.items()} == {
        f"uidl-{n}": ServerMessageState.STORED for n in range(3)
    }
    assert known["uidl-1"].seen_at == batch[1].summary.retrieved_at
    stored = await store.retrievals.get(account.id, retrieval.id)
    assert stored is not None and (stored.messages_on_server, stored.bytes_downloaded) == (3, 303)


async def test_a_uidl_twice_rolls_back_the_whole_batch(store: Store, account: Account) -> None:
    retrieval = await running(store, account)
    await store.messages.store_batch(
        account.id, [new_message(account.id, 1)], retrieval.id, NO_PROGRESS
    )
    again = [new_message(account.id, 2), new_message(account.id, 1)]
    with pytest.raises(DuplicateError):
        await store.messages.store_batch(account.id, again, retrieval.id, NO_PROGRESS)
    assert await store.messages.count(account.id) == 1
    assert set(await store.messages.known(account.id)) == {"uidl-1"}


async def test_newest_first_pages_and_filters(store: Store, account: Account) -> None:
    retrieval = await running(store, account)
    batch = [new_message(account.id, n) for n in range(5)]
    await store.messages.store_batch(account.id, batch, retrieval.id, NO_PROGRESS)
    ids = [m.summary.id for m in reversed(batch)]
    first = await store.messages.page(account.id, MessageFilter(), after=None, limit=3)
    assert [m.id for m in first.items] == ids[:3] and first.next_after == ids[2]
    rest = await store.messages.page(account.id, MessageFilter(), after=first.next_after, limit=3)
    assert [m.id for m in rest.items] == ids[3:] and rest.next_after is None

    async def matching(flt: MessageFilter) -> list[str]:
        page = await store.messages.page(account.id, flt, after=None, limit=50)
        return [m.uidl for m in page.items]

    assert await matching(MessageFilter(since=T0 + timedelta(minutes=3))) == ["uidl-4", "uidl-3"]
    assert await matching(MessageFilter(from_contains="S3@EXAMPLE")) == ["uidl-3"]
    assert await matching(MessageFilter(subject_contains="subject 2")) == ["uidl-2"]
    assert await matching(MessageFilter(has_attachments=True)) == ["uidl-4", "uidl-2", "uidl-0"]
    # A filter character that means something in LIKE patterns is taken literally.
    assert await matching(MessageFilter(subject_contains="%")) == []


async def test_local_delete_keeps_the_uidl_known(store: Store, account: Account) -> None:
    retrieval = await running(store, account)
    message = new_message(account.id, 1)
    await store.messages.store_batch(account.id, [message], retrieval.id, NO_PROGRESS)
    assert await store.messages.delete(account.id, message.summary.id)
    assert not await store.messages.delete(account.id, message.summary.id)
    assert await store.messages.get(account.id, message.summary.id) is None
    assert "uidl-1" in await store.messages.known(account.id)


async def test_skipped_and_forgotten_uidls(store: Store, account: Account) -> None:
    retrieval = await running(store, account)
    await store.messages.store_batch(
        account.id, [new_message(account.id, 1)], retrieval.id, NO_PROGRESS
    )
    # Recording a skip never downgrades a stored UIDL.
    await store.messages.record_skipped(account.id, [("uidl-1", 5), ("big", 9_000_000_000)], T0)
    known = await store.messages.known(account.id)
    assert known["uidl-1"].state == ServerMessageState.STORED
    assert known["big"].state == ServerMessageState.SKIPPED
    await store.messages.forget(account.id, ["big", "never-seen"])
    assert set(await store.messages.known(account.id)) == {"uidl-1"}
    assert await store.messages.count(account.id) == 1  # forgetting keeps stored mail
