"""The SQLite page size: 32 KiB for a new database; an older database keeps its own."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from service.repository.database import PAGE_SIZE, Database


async def page_size(db: Database) -> int:
    row = await db.fetch_one("PRAGMA page_size")
    assert row is not None
    return int(row[0])


async def test_a_new_database_gets_32_kib_pages(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "new.db"))
    await db.open()
    try:
        assert PAGE_SIZE == 32_768
        assert await page_size(db) == PAGE_SIZE
    finally:
        await db.close()


async def test_a_database_with_64_kib_pages_keeps_them_and_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA page_size=65536")
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("CREATE TABLE kept (v TEXT)")
    raw.execute("INSERT INTO kept VALUES ('old row')")
    raw.commit()
    raw.close()

    db = Database(str(path))
    await db.open()
    try:
        assert await page_size(db) == 65_536
        # Migrated and writable like a new one.
        assert await db.fetch_one("SELECT count(*) FROM accounts") is not None
        await db.write(lambda conn: conn.execute("INSERT INTO kept VALUES ('new row')"))
        rows = await db.fetch_all("SELECT v FROM kept ORDER BY v")
        assert [row[0] for row in rows] == ["new row", "old row"]
    finally:
        await db.close()
