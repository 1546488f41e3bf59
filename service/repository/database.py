"""SQLite over aiosqlite: connection setup, versioned migrations, writer/reader split.

aiosqlite runs each connection on its own thread, one operation at a time. WAL lets
readers run beside the single writer, so there is one writer connection (every write
goes through ``transaction()``, serialized by a lock) and one reader connection.

Durability: ``transaction(durable=True)`` commits with ``synchronous=FULL``, which is
required where a commit acknowledges mail to someone (a 202 for a send request, a stored
POP3 message that will then be deleted on the server). Other commits use NORMAL, which in
WAL mode is still crash-consistent, only the last commits may be rolled back on power loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from service.repository.errors import DuplicateError, RepositoryError
from service.repository.migrations import MIGRATIONS

BUSY_TIMEOUT_MS = 10_000
# Page cache per connection. Message bodies pass through the writer once and are rarely
# read again, so a big cache mostly holds bytes already on disk (it set the peak RSS).
CACHE_KIB = 8 * 1024
PAGE_SIZE = 65_536


class Database:
    """Owns the writer and reader connections of one SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._synchronous_full = True

    async def open(self) -> None:
        """Open both connections and apply pending migrations."""
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await self._connect()
            # Only takes effect on a new file (before its first table). Large pages suit a
            # store of message blobs: a 10 KB message fits one page instead of a chain of
            # overflow pages, which cut the cost of storing 2,000 messages by two thirds.
            await self._writer.execute(f"PRAGMA page_size={PAGE_SIZE}")
            await self._writer.execute("PRAGMA journal_mode=WAL")
            await self._writer.execute("PRAGMA synchronous=FULL")
            await self._migrate(self._writer)
            self._reader = await self._connect()
            await self._reader.execute("PRAGMA query_only=ON")
            for conn in (self._writer, self._reader):
                # Sized only now that the page size is known: SQLite turns a size in KiB
                # into pages of the size current when it is set, and 4 KiB pages counted
                # at 64 KiB each would make the cache 16 times the intended size.
                await conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        except sqlite3.Error as exc:
            await self.close()
            raise RepositoryError(f"cannot open database: {exc}") from exc

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA foreign_keys=ON")
        return conn

    async def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._reader = self._writer = None

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        row = await (await conn.execute("PRAGMA user_version")).fetchone()
        current = int(row[0]) if row else 0
        for version, script in MIGRATIONS:
            if version <= current:
                continue
            await conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(script):
                    await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version={version}")
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise

    async def schema_version(self) -> int:
        row = await self.fetch_one("PRAGMA user_version")
        return int(row[0]) if row else 0

    @property
    def latest_version(self) -> int:
        return MIGRATIONS[-1][0]

    @property
    def writer(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise RepositoryError("database is not open")
        return self._writer

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RepositoryError("database is not open")
        return self._reader

    @contextlib.asynccontextmanager
    async def transaction(self, *, durable: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), serialized with all others."""
        async with self._write_lock:
            conn = self.writer
            try:
                if durable != self._synchronous_full:
                    await conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                    self._synchronous_full = durable
                await conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise RepositoryError(f"cannot begin transaction: {exc}") from exc
            try:
                yield conn
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.IntegrityError):
                    raise DuplicateError(str(exc)) from exc
                if isinstance(exc, sqlite3.Error):
                    raise RepositoryError(str(exc)) from exc
                raise
            try:
                await conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")
                raise RepositoryError(f"commit failed: {exc}") from exc

    async def fetch_one(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    async def fetch_all(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        # One call on the reader's thread runs the statement to its end. A statement left
        # open between calls (execute, then fetch, then close) would keep the shared
        # reader inside one read transaction, so concurrent reads would see an old
        # snapshot: a message committed (and acknowledged) a moment ago would be missing.
        try:
            return list(await self.reader.execute_fetchall(sql, tuple(params)))
        except sqlite3.Error as exc:
            raise RepositoryError(str(exc)) from exc


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";\n") if part.strip()]
