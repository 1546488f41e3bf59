"""A page of a keyset-paginated list."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_after: str | None  # the sort key to continue after, None on the last page


def page_of(rows: Sequence[T], limit: int, *, key: Callable[[T], str]) -> Page[T]:
    """Rows were fetched with ``LIMIT limit + 1``: one extra row means there is more."""
    items = list(rows[:limit])
    more = len(rows) > limit
    return Page(items=items, next_after=key(items[-1]) if more and items else None)
