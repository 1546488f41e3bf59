"""``Database.write``: a whole SQLite write transaction in one round trip to the writer's
thread, with the same guarantees as ``Database.transaction``."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.repository.database import Database
from service.repository.errors import DuplicateError


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(str(tmp_path / "write.db"))
    await database.open()
    async with database.transaction() as conn:
        await conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)")
    try:
        yield database
    finally:
        await database.close()


async def rows(db: Database) -> list[tuple[str, int]]:
    return [(row[0], row[1]) for row in await db.fetch_all("SELECT k, v FROM t ORDER BY k")]


async def test_commits_and_returns_what_fn_returns(db: Database) -> None:
    def write(raw: sqlite3.Connection) -> int:
        raw.execute("INSERT INTO t VALUES ('a', 1)")
        raw.execute("INSERT INTO t VALUES ('b', 2)")
        return int(raw.execute("SELECT sum(v) FROM t").fetchone()[0])

    assert await db.write(write) == 3
    assert await rows(db) == [("a", 1), ("b", 2)]


async def test_an_exception_rolls_everything_back(db: Database) -> None:
    class Boom(Exception):
        pass

    def write(raw: sqlite3.Connection) -> None:
        raw.execute("INSERT INTO t VALUES ('a', 1)")
        raise Boom

    with pytest.raises(Boom):
        await db.write(write)
    assert await rows(db) == []
    # The writer is usable again (no transaction left open).
    await db.write(lambda raw: raw.execute("INSERT INTO t VALUES ('c', 3)"))
    assert await rows(db) == [("c", 3)]


async def test_driver_errors_become_repository_errors(db: Database) -> None:
    await db.write(lambda raw: raw.execute("INSERT INTO t VALUES ('a', 1)"))

    def duplicate(raw: sqlite3.Connection) -> None:
        raw.execute("INSERT INTO t VALUES ('b', 2)")
        raw.execute("INSERT INTO t VALUES ('a', 9)")

    with pytest.raises(DuplicateError):
        await db.write(duplicate)
    assert await rows(db) == [("a", 1)]


async def test_it_is_serialized_with_transactions_and_not_durable(db: Database) -> None:
    """A transaction open on the writer holds ``write`` back until it commits; ``write``
    commits at ``synchronous=NORMAL`` even after a durable transaction."""
    order: list[str] = []

    async def open_transaction() -> None:
        async with db.transaction(durable=True) as conn:
            await conn.execute("INSERT INTO t VALUES ('first', 1)")
            await asyncio.sleep(0.05)
            order.append("transaction")

    def write(raw: sqlite3.Connection) -> int:
        order.append("write")
        raw.execute("INSERT INTO t VALUES ('second', 2)")
        return int(raw.execute("PRAGMA synchronous").fetchone()[0])

    holder = asyncio.create_task(open_transaction())
    await asyncio.sleep(0.01)
    synchronous = await db.write(write)
    await holder
    assert order == ["transaction", "write"]
    assert synchronous == 1  # NORMAL
    assert await rows(db) == [("first", 1), ("second", 2)]
