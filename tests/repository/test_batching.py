"""GroupCommit: concurrent submissions share batches; a rule broken by one item fails
only its caller; any other failure reaches every caller of the batch."""

from __future__ import annotations

import asyncio

import pytest

from service.repository.batching import GroupCommit
from service.repository.errors import DuplicateError, RepositoryError


async def test_concurrent_items_share_batches_and_get_their_own_results() -> None:
    batches: list[list[int]] = []

    async def commit(items: list[int]) -> list[int]:
        batches.append(list(items))
        await asyncio.sleep(0)
        return [item * 10 for item in items]

    group: GroupCommit[int, int] = GroupCommit(commit, max_batch=3)
    results = await asyncio.gather(*(group.submit(i) for i in range(7)))
    assert results == [i * 10 for i in range(7)]
    assert [len(b) for b in batches] == [3, 3, 1]  # all queued before the first commit
    assert sorted(i for b in batches for i in b) == list(range(7))


async def test_a_broken_rule_fails_only_its_own_caller() -> None:
    async def commit(items: list[int]) -> list[int]:
        if 2 in items:
            raise DuplicateError("item 2 breaks a rule")
        return items

    ones: list[int] = []

    async def one(item: int) -> int:
        ones.append(item)
        [result] = await commit([item])
        return result

    group: GroupCommit[int, int] = GroupCommit(commit, max_batch=10, commit_one=one)
    outcomes = await asyncio.gather(*(group.submit(i) for i in range(4)), return_exceptions=True)
    assert outcomes[0] == 0 and outcomes[1] == 1 and outcomes[3] == 3
    assert isinstance(outcomes[2], DuplicateError)
    assert ones == [0, 1, 2, 3]  # the failed batch, retried item by item


async def test_another_failure_reaches_every_caller_of_the_batch() -> None:
    async def commit(items: list[int]) -> list[int]:
        raise RepositoryError("disk I/O error")

    group: GroupCommit[int, int] = GroupCommit(commit, max_batch=10)
    outcomes = await asyncio.gather(*(group.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, RepositoryError) for o in outcomes)
    # The committer is gone, so a later submission starts a new one.
    with pytest.raises(RepositoryError):
        await group.submit(9)
