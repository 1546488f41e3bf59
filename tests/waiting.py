"""Bounded polling for tests: wait for a state, never assert on time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
WAIT_S = 60.0  # upper bound only: keeps a broken test from hanging


def wait_for(predicate: Callable[[], T], timeout: float = WAIT_S, interval: float = 0.01) -> T:
    """Call ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached")


async def until(
    fetch: Callable[[], Awaitable[T]],
    done: Callable[[T], Any],
    timeout: float = WAIT_S,
    interval: float = 0.05,
) -> T:
    """Await ``fetch()`` until ``done`` accepts its value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not reached: {value}")
        await asyncio.sleep(interval)


async def feed_until(
    client: Any, done: Callable[[list[dict[str, Any]]], Any], **params: Any
) -> list[dict[str, Any]]:
    """The event feed's items (``GET /v1/events`` with ``params``) once ``done`` accepts
    them. On PostgreSQL the feed serves an event only when every transaction older than its
    own has ended, so an event may come a moment after the change that wrote it."""
    response = await until(
        lambda: client.get("/v1/events", params=params), lambda r: done(r.json()["items"])
    )
    items: list[dict[str, Any]] = response.json()["items"]
    return items
