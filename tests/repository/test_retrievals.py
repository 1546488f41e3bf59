"""Retrieval records and their leases: the same behaviour on both stores."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from service.codes import ErrorCode
from service.domain.accounts import Account
from service.domain.enums import RetrievalStatus, RetrievalTrigger
from service.domain.ids import new_id
from service.domain.retrievals import Retrieval, RetrievalError, RetrievalProgress
from service.repository.errors import DuplicateError
from service.repository.store import Store
from tests.repository.conftest import T0, make_account

LEASE = timedelta(minutes=1)
PROGRESS = RetrievalProgress(
    messages_on_server=4,
    messages_downloaded=2,
    bytes_downloaded=2_000,
    messages_deleted=1,
    messages_skipped=1,
)


def retrieval_of(
    account: Account, created_at: datetime = T0, trigger: RetrievalTrigger = RetrievalTrigger.API
) -> Retrieval:
    return Retrieval(
        id=new_id("ret"),
        account_id=account.id,
        trigger=trigger,
        status=RetrievalStatus.QUEUED,
        created_at=created_at,
    )


async def test_one_active_retrieval_per_account(store: Store, account: Account) -> None:
    first = retrieval_of(account)
    assert await store.retrievals.add(first, owner="rep_a", lease_until=T0 + LEASE)
    with pytest.raises(DuplicateError):
        await store.retrievals.add(retrieval_of(account), owner="rep_b", lease_until=T0 + LEASE)
    active = await store.retrievals.active(account.id)
    assert active is not None and active.id == first.id
    await store.retrievals.start(first.id, T0 + timedelta(seconds=1))
    await store.retrievals.progress(first.id, PROGRESS)
    error = RetrievalError(code="auth_failed", detail="no")
    await store.retrievals.finish(
        first.id, RetrievalStatus.FAILED, T0 + timedelta(seconds=2), PROGRESS, error
    )
    done = await store.retrievals.get(account.id, first.id)
    assert done == Retrieval(
        id=first.id,
        account_id=account.id,
        trigger=RetrievalTrigger.API,
        status=RetrievalStatus.FAILED,
        created_at=T0,
        started_at=T0 + timedelta(seconds=1),
        finished_at=T0 + timedelta(seconds=2),
        messages_on_server=4,
        messages_downloaded=2,
        bytes_downloaded=2_000,
        messages_deleted=1,
        messages_skipped=1,
        error=error,
    )
    assert await store.retrievals.active(account.id) is None
    # Finished: the next one may start.
    assert await store.retrievals.add(
        retrieval_of(account, T0 + timedelta(seconds=3)), owner="rep_b", lease_until=T0 + LEASE
    )
    latest = await store.retrievals.latest()
    assert latest[account.id].created_at == T0 + timedelta(seconds=3)
    assert latest[account.id].error_code is None


async def test_a_scheduled_poll_is_started_once(store: Store, account: Account) -> None:
    due = T0 - timedelta(minutes=5)  # when the previous poll was seen
    scheduled = retrieval_of(account, T0, RetrievalTrigger.SCHEDULE)
    assert await store.retrievals.add(
        scheduled, owner="rep_a", lease_until=T0 + LEASE, not_after=due
    )
    await store.retrievals.finish(
        scheduled.id, RetrievalStatus.SUCCEEDED, T0 + timedelta(seconds=1), PROGRESS, None
    )
    # Another replica saw the same schedule: a retrieval was created after its view.
    late = retrieval_of(account, T0 + timedelta(seconds=2), RetrievalTrigger.SCHEDULE)
    assert not await store.retrievals.add(
        late, owner="rep_b", lease_until=T0 + LEASE, not_after=due
    )
    assert await store.retrievals.get(account.id, late.id) is None
    # Seen up to date, the next poll goes in.
    assert await store.retrievals.add(late, owner="rep_b", lease_until=T0 + LEASE, not_after=T0)


async def test_pages_newest_first_and_counts(store: Store) -> None:
    a, b = make_account(), make_account(tenant="other")
    await store.accounts.add(a)
    await store.accounts.add(b)
    made = []
    for n in range(3):
        r = retrieval_of(a, T0 + timedelta(seconds=n))
        await store.retrievals.add(r, owner="rep_a", lease_until=T0 + LEASE)
        made.append(r.id)
        if n < 2:
            await store.retrievals.finish(r.id, RetrievalStatus.SUCCEEDED, T0, PROGRESS, None)
    await store.retrievals.add(retrieval_of(b), owner="rep_a", lease_until=T0 + LEASE)
    first = await store.retrievals.page(a.id, after=None, limit=2)
    assert [r.id for r in first.items] == made[::-1][:2] and first.next_after == made[1]
    rest = await store.retrievals.page(a.id, after=first.next_after, limit=2)
    assert [r.id for r in rest.items] == [made[0]] and rest.next_after is None
    assert await store.retrievals.count_active() == 2
    assert await store.retrievals.count_active_for_tenant("default") == 1
    assert await store.retrievals.count_active_for_tenant("other") == 1
    assert await store.retrievals.count_active_for_tenant("nobody") == 0


async def test_leases_renew_and_expire(store: Store) -> None:
    accounts = [make_account() for _ in range(4)]
    held = []
    for n, account in enumerate(accounts):
        await store.accounts.add(account)
        r = retrieval_of(account)
        owner = "rep_a" if n < 2 else "rep_b"
        await store.retrievals.add(r, owner=owner, lease_until=T0 + LEASE)
        held.append(r.id)
    # Only the owner renews, and only what it still holds.
    assert await store.retrievals.renew("rep_a", held, T0 + 3 * LEASE) == 2
    assert await store.retrievals.renew("rep_b", [held[2]], T0 + 3 * LEASE) == 1
    assert await store.retrievals.renew("rep_c", held, T0 + 3 * LEASE) == 0
    # At T0 + 2 leases only rep_b's unrenewed retrieval (held[3]) has expired.
    assert await store.retrievals.interrupt_expired(T0 + 2 * LEASE) == 1
    gone = await store.retrievals.get(accounts[3].id, held[3])
    assert gone is not None and gone.status == RetrievalStatus.FAILED
    assert gone.error is not None and gone.error.code == ErrorCode.INTERRUPTED
    assert gone.finished_at == T0 + 2 * LEASE
    assert await store.retrievals.renew("rep_b", [held[3]], T0 + 5 * LEASE) == 0
    # Everything but what this process keeps running.
    assert await store.retrievals.interrupt_expired(T0, everything=True, keep=[held[0]]) == 2
    assert await store.retrievals.count_active() == 1
    kept = await store.retrievals.active(accounts[0].id)
    assert kept is not None and kept.id == held[0]
