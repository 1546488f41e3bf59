"""Group commit: concurrent callers' writes share one transaction (one fsync).

Each caller submits one item and waits for the transaction that holds it; while one batch
commits, the next callers queue, and their items go together in the next batch. Both
stores accept outgoing mail this way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from service.repository.errors import DuplicateError, RepositoryError

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Commits submitted items in batches of at most ``max_batch``.

    ``commit_batch(items)`` writes the items in one transaction and returns one result per
    item. When a batch breaks a uniqueness rule (``DuplicateError``: one row's account was
    just deleted, say), its items are committed one by one with ``commit_one`` so only that
    caller fails.
    """

    def __init__(
        self,
        commit_batch: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_batch: int,
        commit_one: Callable[[T], Awaitable[R]] | None = None,
        name: str = "group commit",
    ) -> None:
        self._commit_batch = commit_batch
        self._commit_one = commit_one
        self._max_batch = max_batch
        self._name = name
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Return ``item``'s result once the transaction holding it has committed.

        A cancelled caller does not undo the commit.
        """
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_pending(), name=self._name)
        return await future

    async def _commit_pending(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    results = await self._commit_batch([item for item, _ in batch])
                except DuplicateError:
                    await self._one_by_one(batch)
                    continue
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(
                                exc if isinstance(exc, Exception) else RepositoryError(str(exc))
                            )
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._committer = None

    async def _one_by_one(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        for item, future in batch:
            try:
                if self._commit_one is not None:
                    result = await self._commit_one(item)
                else:
                    [result] = await self._commit_batch([item])
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)
