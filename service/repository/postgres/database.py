"""PostgreSQL over an asyncpg pool: transactions, bounded waits, error translation.

Every operation waits at most ``timeout_s`` for a connection and then for each statement;
past that, or when the database cannot be reached (down, restarting, the connection lost
mid-statement), it raises ``StoreUnavailableError`` (the API answers 503
``storage_unavailable``), never hangs. The pool replaces a broken connection on the next
acquire, so the store recovers by itself once the database is back.

Durability: every commit is durable (``synchronous_commit`` stays on, the server default);
PostgreSQL shares one WAL flush among the commits that wait for it (group commit).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import asyncpg

from service.repository.errors import (
    DuplicateError,
    RepositoryError,
    StorageFullError,
    StoreUnavailableError,
)
from service.repository.postgres.migrations import latest_version, migrate, schema_version

logger = logging.getLogger("mailroom.storage")

# Connections kept open while idle: a replica answers its first requests without a connect.
POOL_MIN_SIZE = 1
# SQLSTATE classes and codes: integrity (23: unique, foreign key, not null...), disk full,
# and those that mean the server cannot serve now (connection exceptions, shutdown, a
# statement cancelled by the server, too many connections).
_INTEGRITY_CLASS = "23"
_DISK_FULL = "53100"
_UNAVAILABLE_CLASS = "08"
_UNAVAILABLE_CODES = frozenset({"57P01", "57P02", "57P03", "57014", "53300", "40001", "40P01"})


class Record(Protocol):
    """A result row (``asyncpg.Record``): by column name or position."""

    def __getitem__(self, key: str | int, /) -> Any: ...


def translate(exc: BaseException, context: str = "") -> RepositoryError:
    """The repository error for an asyncpg (or socket) error."""
    message = f"{context}: {exc}" if context else str(exc) or type(exc).__name__
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state.startswith(_INTEGRITY_CLASS):
            return DuplicateError(message)
        if state == _DISK_FULL:
            return StorageFullError(message)
        if state.startswith(_UNAVAILABLE_CLASS) or state in _UNAVAILABLE_CODES:
            return StoreUnavailableError(message)
        return RepositoryError(message)
    lost = (
        OSError,
        TimeoutError,
        asyncpg.exceptions.ConnectionDoesNotExistError,
        # The protocol state broken by a connection the server ended mid-operation.
        asyncpg.exceptions.InternalClientError,
    )
    if isinstance(exc, lost):
        return StoreUnavailableError(message)
    if isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc):
        # "connection is closed" / "pool is closing": the connection went away.
        return StoreUnavailableError(message)
    return RepositoryError(message)


# What ``translate`` turns into repository errors; anything else passes through untouched.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


class PgDatabase:
    """A pool of connections to one PostgreSQL database."""

    def __init__(self, dsn: str, *, pool_size: int, timeout_s: float) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.timeout_s = timeout_s
        self._pool: asyncpg.Pool | None = None
        self._storage_full = False

    @property
    def storage_full(self) -> bool:
        """Whether the last write failed for lack of space, and none succeeded since."""
        return self._storage_full

    def _note(self, error: RepositoryError) -> RepositoryError:
        if isinstance(error, StorageFullError):
            self._storage_full = True
        return error

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RepositoryError("database is not open")
        return self._pool

    async def open(self) -> None:
        """Create the pool and apply pending migrations (under an advisory lock, so
        replicas starting together migrate once).

        :raises StoreUnavailableError: the database cannot be reached.
        :raises SchemaTooNewError: a newer Mailroom migrated it.
        """
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=min(POOL_MIN_SIZE, self.pool_size),
                max_size=self.pool_size,
                timeout=self.timeout_s,  # connecting
                command_timeout=self.timeout_s,  # each statement
            )
            async with self._pool.acquire(timeout=self.timeout_s) as conn:
                await migrate(conn)
        except DRIVER_ERRORS as exc:
            await self.close()
            raise self._note(translate(exc, "cannot open database")) from exc
        except BaseException:
            await self.close()
            raise
        self._storage_full = False

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await pool.close()
            except Exception:  # a pool with broken connections: drop them
                pool.terminate()

    async def schema_version(self) -> int:
        async with self.connection() as conn:
            try:
                return await schema_version(conn)
            except DRIVER_ERRORS as exc:
                raise translate(exc) from exc

    @property
    def latest_version(self) -> int:
        return latest_version()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (autocommit), waiting at most ``timeout_s`` for one."""
        try:
            async with self.pool.acquire(timeout=self.timeout_s) as conn:
                yield conn
        except DRIVER_ERRORS as exc:
            raise self._note(translate(exc)) from exc

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """One transaction on a pooled connection; committed when the block ends.

        Driver errors inside the block, or at the commit, become repository errors and
        roll the transaction back.
        """
        try:
            async with self.pool.acquire(timeout=self.timeout_s) as conn, conn.transaction():
                yield conn
        except DRIVER_ERRORS as exc:
            raise self._note(translate(exc)) from exc
        self._storage_full = False

    async def probe_write(self) -> None:
        """Commit one tiny real write (the schema version row, unchanged)."""
        async with self.transaction() as conn:
            await conn.execute("UPDATE schema_version SET version = version")

    async def fetch_all(self, sql: str, *args: Any) -> list[Record]:
        async with self.connection() as conn:
            rows: list[Record] = await conn.fetch(sql, *args)
            return rows

    async def fetch_one(self, sql: str, *args: Any) -> Record | None:
        async with self.connection() as conn:
            row: Record | None = await conn.fetchrow(sql, *args)
            return row

    async def fetch_value(self, sql: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(sql, *args)


def rowcount(status: str) -> int:
    """The row count of a command status such as ``UPDATE 3`` or ``INSERT 0 1``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def ids_param(values: Sequence[str] | set[str] | frozenset[str]) -> list[str]:
    """A text[] parameter (``= ANY($n)``)."""
    return list(values)
