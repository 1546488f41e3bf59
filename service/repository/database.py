"""SQLite over aiosqlite: connection setup, versioned migrations, writer/reader split.

aiosqlite runs each connection on its own thread, one operation at a time. WAL lets
readers run beside the single writer, so there is one writer connection (every write
goes through ``transaction()``, serialized by a lock) and one reader connection.

Durability: ``transaction(durable=True)`` commits with ``synchronous=FULL``, which is
required where a commit acknowledges mail to someone (a 202 for a send request, a stored
POP3 message that will then be deleted on the server). Other commits use NORMAL, which in
WAL mode is still crash-consistent, only the last commits may be rolled back on power loss.

A full disk: SQLite's ``SQLITE_FULL``, and the I/O errors it reports when the file system
has no space left (growing the WAL index, writing a page), become ``StorageFullError``;
``storage_full`` stays true until a write succeeds again, and ``probe_write`` tests it.

Permissions: the file holds encrypted credentials and all mail, so it is created 0600
(its WAL and SHM files inherit the mode from it) and a directory created for it is 0700.
An existing directory is left as it is (it may be shared, like ``/tmp``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import sqlite3
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from service.domain.threads import SQLITE_FUNCTION, thread_id_of
from service.repository.errors import (
    DuplicateError,
    RepositoryError,
    SchemaTooNewError,
    StorageFullError,
)
from service.repository.migrations import MIGRATIONS

BUSY_TIMEOUT_MS = 10_000
# Page cache per connection. Message bodies pass through the writer once and are rarely
# read again, so a big cache mostly holds bytes already on disk (it set the peak RSS).
CACHE_KIB = 8 * 1024
PAGE_SIZE = 32_768
# SQLite's largest page: a database made by an older version may have it.
MAX_PAGE_SIZE = 65_536
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
# Files SQLite keeps beside the database in WAL mode.
COMPANION_SUFFIXES = ("-wal", "-shm")
# An I/O error while less than this is free on the database's file system is taken for a
# full disk: one WAL frame (a page and its header) no longer fits.
LOW_SPACE_BYTES = 2 * MAX_PAGE_SIZE
# SQLite's I/O errors that a full file system causes (a write, a sync, growing the WAL
# index or truncating a file); other causes of these are told apart by the free space.
_SPACE_IOERRS = frozenset(
    {
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_IOERR_WRITE,
        sqlite3.SQLITE_IOERR_FSYNC,
        sqlite3.SQLITE_IOERR_SHMSIZE,
        sqlite3.SQLITE_IOERR_SHMMAP,
        sqlite3.SQLITE_IOERR_TRUNCATE,
    }
)

logger = logging.getLogger("mailroom.storage")

# Callbacks to run once the transaction open on a writer connection commits (dropped if it
# rolls back): wake-ups for what the transaction wrote (events), which must not be seen
# before the commit.
_after_commit: weakref.WeakKeyDictionary[aiosqlite.Connection, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


T = TypeVar("T")


def run_in_thread(
    conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]
) -> Awaitable[T]:
    """Await ``fn(raw)`` on ``conn``'s own thread with its ``sqlite3`` connection: several
    statements for one round trip to that thread (each ``conn.execute`` is one, and a
    round trip costs more than a small statement). ``fn`` runs in the queue every call on
    ``conn`` goes through (aiosqlite's ``_execute``; the version is pinned), so it is
    ordered with them exactly as an ``execute`` would be."""
    return cast(Awaitable[T], cast(Any, conn)._execute(fn, cast(Any, conn)._conn))


def call_after_commit(conn: aiosqlite.Connection, callback: Callable[[], None]) -> None:
    """Call ``callback`` after the transaction open on ``conn`` commits (never if it rolls
    back); it must be quick and must not raise."""
    _after_commit.setdefault(conn, []).append(callback)


def _run_after_commit(conn: aiosqlite.Connection, committed: bool) -> None:
    callbacks = _after_commit.pop(conn, None)
    if not committed or not callbacks:
        return
    for callback in callbacks:
        try:
            callback()
        except Exception:
            logger.exception("an after-commit callback failed")


class Database:
    """Owns the writer and reader connections of one SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._synchronous_full = True
        self._storage_full = False

    @property
    def storage_full(self) -> bool:
        """Whether the last write (or open) failed for lack of space, and none succeeded since."""
        return self._storage_full

    def _translate(self, exc: sqlite3.Error, context: str = "") -> RepositoryError:
        """The repository error for a driver error; notes a full disk."""
        message = f"{context}: {exc}" if context else str(exc)
        if isinstance(exc, sqlite3.IntegrityError):
            return DuplicateError(message)
        if self._is_out_of_space(exc):
            self._storage_full = True
            return StorageFullError(message)
        return RepositoryError(message)

    def _is_out_of_space(self, exc: sqlite3.Error) -> bool:
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            return True
        if code not in _SPACE_IOERRS or self.path == ":memory:":
            return False
        try:
            return shutil.disk_usage(Path(self.path).parent).free < LOW_SPACE_BYTES
        except OSError:
            return False

    def _prepare_files(self) -> None:
        """Create the directory (0700) and the database file (0600) before SQLite does.

        SQLite creates the WAL and SHM files with the mode of the database file, so making
        the database 0600 first covers all three. Existing files are tightened too.
        """
        path = Path(self.path)
        if not path.parent.exists():
            path.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        elif path.parent.stat().st_mode & 0o077:
            logger.warning(
                "the database directory %s is readable by other users; consider mode 0700",
                path.parent,
            )
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        os.close(fd)
        for file in (path, *(Path(f"{path}{suffix}") for suffix in COMPANION_SUFFIXES)):
            with contextlib.suppress(FileNotFoundError):
                if file.stat().st_mode & 0o777 != FILE_MODE:
                    file.chmod(FILE_MODE)

    async def open(self) -> None:
        """Open both connections and apply pending migrations.

        :raises StorageFullError: the disk is full (the WAL index or a migration needs
            space); the service retries later.
        :raises RepositoryError: the file cannot be opened or migrated.
        """
        if self.path != ":memory:":
            try:
                self._prepare_files()
            except OSError as exc:
                raise RepositoryError(f"cannot create the database file: {exc}") from exc
        try:
            self._writer = await self._connect()
            # Only takes effect on a new file (before its first table). Large pages suit a
            # store of message blobs: a 10 KB message fits one page instead of a chain of
            # overflow pages, which cut the cost of storing 2,000 messages by two thirds
            # against 4 KiB pages. Not the largest (64 KiB): every commit writes each page
            # it changed whole to the WAL, and a poll that finds nothing new changes about
            # a dozen; 32 KiB halves those bytes and stores messages as fast.
            await self._writer.execute(f"PRAGMA page_size={PAGE_SIZE}")
            await self._writer.execute("PRAGMA journal_mode=WAL")
            await self._writer.execute("PRAGMA synchronous=FULL")
            await self._migrate(self._writer)
            self._reader = await self._connect()
            await self._reader.execute("PRAGMA query_only=ON")
            for conn in (self._writer, self._reader):
                # Sized only now that the page size is known: SQLite turns a size in KiB
                # into pages of the size current when it is set, and 4 KiB pages counted
                # at 32 KiB each would make the cache 8 times the intended size.
                await conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        except sqlite3.Error as exc:
            await self.close()
            raise self._translate(exc, "cannot open database") from exc
        except SchemaTooNewError:
            await self.close()
            raise
        self._storage_full = False

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA foreign_keys=ON")
        # Migration 13 names old rows' threads with the service's own digest.
        await conn.create_function(SQLITE_FUNCTION, 1, thread_id_of, deterministic=True)
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
        if current > self.latest_version:
            # Written by a newer Mailroom: its data may mean things this code does not know.
            raise SchemaTooNewError(current, self.latest_version)
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
                raise self._translate(exc, "cannot begin transaction") from exc
            try:
                yield conn
            except BaseException as exc:
                _run_after_commit(conn, committed=False)
                with contextlib.suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._translate(exc) from exc
                raise
            try:
                await conn.execute("COMMIT")
            except BaseException as exc:
                _run_after_commit(conn, committed=False)
                if not isinstance(exc, sqlite3.Error):
                    raise
                with contextlib.suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")
                raise self._translate(exc, "commit failed") from exc
            _run_after_commit(conn, committed=True)
            self._storage_full = False

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One write transaction (as :meth:`transaction`, not durable) whose statements
        ``fn`` runs on the writer's thread: BEGIN, ``fn``, COMMIT in one round trip. What
        ``fn`` returns comes back once it committed; its wake-ups are the caller's to call
        then (``call_after_commit`` is for :meth:`transaction`)."""

        def run(raw: sqlite3.Connection, *, to_normal: bool) -> T:
            if to_normal:
                raw.execute("PRAGMA synchronous=NORMAL")
            raw.execute("BEGIN IMMEDIATE")
            try:
                result = fn(raw)
                raw.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    raw.execute("ROLLBACK")
                raise
            return result

        async with self._write_lock:
            to_normal = self._synchronous_full
            # Cleared first: the PRAGMA runs before anything else (if it failed, FULL
            # stays, which is only slower).
            self._synchronous_full = False
            try:
                result = await run_in_thread(
                    self.writer, functools.partial(run, to_normal=to_normal)
                )
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc
            self._storage_full = False
            return result

    async def probe_write(self) -> None:
        """Commit one tiny real write (the schema version, unchanged) to test for space.

        :raises StorageFullError: there is still no space for it.
        """
        async with self.transaction() as conn:
            row = await (await conn.execute("PRAGMA user_version")).fetchone()
            await conn.execute(f"PRAGMA user_version={int(row[0]) if row else 0}")

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
            raise self._translate(exc) from exc


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";\n") if part.strip()]
