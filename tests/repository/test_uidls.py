"""The server's UIDL list compared with the known UIDLs in the store, on both stores."""

from __future__ import annotations

from datetime import timedelta

from service.domain.accounts import Account
from service.domain.enums import ServerMessageState
from service.repository.store import Store
from tests.repository.conftest import T0, new_message
from tests.repository.test_messages import NO_PROGRESS, running


async def stored(store: Store, account: Account, numbers: range) -> None:
    retrieval = await running(store, account)
    batch = [new_message(account.id, n) for n in numbers]  # uidl-n, seen at T0 + n minutes
    await store.messages.store_batch(account.id, batch, retrieval.id, NO_PROGRESS)


async def test_new_and_deletable_come_back_and_unlisted_are_forgotten(
    store: Store, account: Account
) -> None:
    await stored(store, account, range(4))
    await store.messages.record_skipped(account.id, [("big", 10**9), ("gone-big", 10**9)], T0)
    listed = ["uidl-0", "uidl-1", "uidl-2", "big", "fresh-1", "fresh-2"]  # uidl-3 is gone

    kept = await store.messages.compare_uidls(account.id, listed)
    assert kept.new == {"fresh-1", "fresh-2"}  # skipped ones are known, not new
    assert kept.deletable == frozenset()
    assert kept.unlisted == 2  # uidl-3 and gone-big
    # Gone from the server: forgotten afterwards (the stored message stays), in rounds.
    assert len(await store.messages.known(account.id)) == 6
    after = T0 + timedelta(days=1)
    rounds = [await store.messages.forget_unlisted(account.id, listed, seen_before=after, limit=1)]
    while rounds[-1] >= 1:  # as the retrieval calls it: until a round falls short
        rounds.append(
            await store.messages.forget_unlisted(account.id, listed, seen_before=after, limit=1)
        )
    assert sum(rounds) == 2 and rounds[-1] == 0
    assert set(await store.messages.known(account.id)) == {"uidl-0", "uidl-1", "uidl-2", "big"}
    assert await store.messages.count(account.id) == 4

    everything = await store.messages.compare_uidls(account.id, listed, delete_stored=True)
    assert everything.new == {"fresh-1", "fresh-2"}
    assert everything.deletable == {"uidl-0", "uidl-1", "uidl-2"}  # never a skipped one

    older = await store.messages.compare_uidls(
        account.id, listed, delete_seen_until=T0 + timedelta(minutes=1)
    )
    assert older.deletable == {"uidl-0", "uidl-1"}  # seen at or before the time
    known = await store.messages.known(account.id)
    assert known["big"].state == ServerMessageState.SKIPPED


async def test_an_empty_server_forgets_everything(store: Store, account: Account) -> None:
    await stored(store, account, range(3))
    compared = await store.messages.compare_uidls(account.id, [], delete_stored=True)
    assert (compared.new, compared.deletable) == (frozenset(), frozenset())
    after = T0 + timedelta(days=1)
    assert await store.messages.forget_unlisted(account.id, [], seen_before=after, limit=10) == 3
    assert await store.messages.known(account.id) == {}


async def test_uidls_seen_after_the_listing_are_not_forgotten(
    store: Store, account: Account
) -> None:
    """A later retrieval's UIDLs (seen after the listing being acted on) stay known."""
    await stored(store, account, range(4))  # seen at T0 + 0..3 minutes
    listed_at = T0 + timedelta(minutes=2)
    forgotten = await store.messages.forget_unlisted(
        account.id, [], seen_before=listed_at, limit=100
    )
    assert forgotten == 2
    assert set(await store.messages.known(account.id)) == {"uidl-2", "uidl-3"}


async def test_many_known_uidls_only_the_difference_comes_back(
    store: Store, account: Account
) -> None:
    await stored(store, account, range(2_000))
    listed = [f"uidl-{n}" for n in range(1_000, 2_000)] + [f"new-{n}" for n in range(500)]
    compared = await store.messages.compare_uidls(account.id, listed)
    assert compared.new == {f"new-{n}" for n in range(500)}
    assert compared.unlisted == 1_000
    after = T0 + timedelta(days=10)
    while await store.messages.forget_unlisted(account.id, listed, seen_before=after, limit=300):
        pass
    assert len(await store.messages.known(account.id)) == 1_000
    assert await store.messages.count(account.id) == 2_000
