"""``python -m service migrate-store``: copy a SQLite store into an empty PostgreSQL store.

Usage::

    python -m service migrate-store --from sqlite:///data/mailroom.db --to postgresql://...

What it does, in order:

1. Brings the SQLite file to this Mailroom's schema version (as starting the service on it
   would) and creates or upgrades the PostgreSQL schema (the store's own migrations).
2. In ONE PostgreSQL transaction, with the target tables locked against writers: refuses a
   target that already holds rows (exit code 2), copies every table of the source (parents
   before children, by the target's foreign keys) with binary ``COPY`` in batches bounded
   in rows and bytes, converting each value to the target column's type (read from
   ``information_schema``: TEXT timestamps become ``timestamptz``, 0/1 become booleans, JSON
   text becomes ``jsonb``...), checks every table's row count, and verifies every byte
   column (raw messages, outbox bodies) by SHA-256 against the source. Any failure rolls
   everything back: the target is either complete or untouched.
3. Reports the rows copied per table.

The source is read in one read transaction, so the copy is a consistent snapshot; stop the
service on the SQLite file first, or whatever it writes afterwards stays behind.

Credentials are copied as stored, still encrypted: every replica on the PostgreSQL store
must run with the key that encrypted them (``MAILROOM_SECRET_KEY``; a store that used the
generated key file has it in ``mailroom.key`` beside the database). When
``MAILROOM_SECRET_KEY`` is set, every stored credential is decrypted with it before
anything is written, and a key that cannot decrypt them stops the migration (exit code 2).

Exit codes: 0 copied; 2 refused (bad arguments, unknown scheme, missing source, non-empty
target, wrong key, a source table or value the target has no place for); 1 the copy
failed (nothing was committed).
"""

# SQL text here is assembled from table and column names read from the two schemas
# (quoted); values are always bound.
# ruff: noqa: S608

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from service.config import ConfigError, Settings, database_kind, decode_secret_key
from service.crypto import CredentialCipher, CredentialError, key_id
from service.domain.time import from_text
from service.repository.database import Database
from service.repository.errors import RepositoryError, SchemaTooNewError
from service.repository.migrations import MIGRATIONS
from service.repository.postgres.migrations import migrate as migrate_postgres
from service.services.accounts import IN_PASSWORD, OUT_PASSWORD
from service.services.oauth import GRANT_FIELDS

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2

# One COPY batch holds at most this many rows or this many bytes of values, whichever
# comes first: message bodies may be tens of megabytes each.
BATCH_ROWS = 1_000
BATCH_BYTES = 32 * 1024 * 1024
# Rows whose digests are compared in one query.
VERIFY_BATCH_ROWS = 500
# How long to wait for the target's tables to be free of writers before giving up.
LOCK_TIMEOUT = "30s"
CONNECT_TIMEOUT_S = 30.0
# Bookkeeping of each store's own migrations: never copied, never checked for rows.
# The SQLite trigram index (FTS5 and its shadow tables): PostgreSQL builds its own.
SKIPPED_TABLES = frozenset(
    {"schema_version", "messages_fts"}
    | {f"messages_fts_{part}" for part in ("data", "idx", "docsize", "config")}
)
# Stored credentials: (table, column, the field bound into each ciphertext with the row's id).
CREDENTIAL_COLUMNS = (
    ("accounts", "in_password", IN_PASSWORD),
    ("accounts", "out_password", OUT_PASSWORD),
)
KEY_VARIABLE = "MAILROOM_SECRET_KEY"
OAUTH_FIELDS = {"in_password": GRANT_FIELDS["in"], "out_password": GRANT_FIELDS["out"]}


def _auth_column(src: sqlite3.Connection, table: str, column: str) -> str:
    """The column saying how ``column`` is used (``in_auth``), or NULL before version 11."""
    name = column.split("_", 1)[0] + "_auth"
    present = {str(row[1]) for row in src.execute(f'PRAGMA table_info("{table}")')}
    return f'"{name}"' if name in present else "NULL"


class MigrationRefused(Exception):
    """The migration will not start (or must stop): the reason is for the operator."""


@dataclass(frozen=True)
class Column:
    """A column of the target table and how a SQLite value becomes its value."""

    name: str
    type_name: str
    convert: Callable[[Any], Any]
    is_bytes: bool


@dataclass
class TableCopy:
    """One table to copy: its columns on both sides and what the copy did."""

    name: str
    columns: list[Column]
    primary_key: list[str]
    rows: int = 0
    verified: int = 0
    dropped_columns: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------ store locations


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///relative`` / ``sqlite:////absolute`` URL or a plain path."""
    try:
        kind = database_kind(url)
    except ConfigError:
        kind = None
    if kind != "sqlite":
        raise MigrationRefused(
            f"--from: {url_for_display(url)!r} is not a SQLite store"
            " (give sqlite:///path/to/mailroom.db or a path)"
        )
    return Settings(database=url).database_path


def postgres_dsn(url: str) -> str:
    """A ``postgresql://`` or ``postgres://`` URL as given, after checking its scheme."""
    try:
        kind = database_kind(url)
    except ConfigError:
        kind = None
    if kind != "postgres":
        raise MigrationRefused(
            f"--to: {url_for_display(url)!r} is not a PostgreSQL store"
            " (give postgresql://user@host:port/database)"
        )
    return url


def url_for_display(url: str) -> str:
    """The URL without its password, for messages and the report."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


# ------------------------------------------------------------------------ value conversion


def _to_timestamptz(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return from_text(str(value))


def _to_timestamp(value: Any) -> datetime:
    return _to_timestamptz(value).astimezone(UTC).replace(tzinfo=None)


def _to_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "t", "yes")
    return bool(value)


def _to_bytes(value: Any) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _to_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _to_json_text(value: Any) -> str:
    text = _to_text(value)
    json.loads(text)  # fail here, with the table and column named, not inside COPY
    return text


def _to_text_array(value: Any) -> list[str]:
    items = json.loads(_to_text(value))
    if not isinstance(items, list):
        raise ValueError(f"expected a JSON list, got {type(items).__name__}")
    return [str(item) for item in items]


def _nullable(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def wrapped(value: Any) -> Any:
        return None if value is None else convert(value)

    return wrapped


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "timestamp with time zone": _to_timestamptz,
    "timestamp without time zone": _to_timestamp,
    "date": lambda v: v if isinstance(v, date) else date.fromisoformat(str(v)[:10]),
    "boolean": _to_bool,
    "smallint": int,
    "integer": int,
    "bigint": int,
    "double precision": float,
    "real": float,
    "numeric": lambda v: Decimal(str(v)),
    "bytea": _to_bytes,
    "json": _to_json_text,
    "jsonb": _to_json_text,
    "text": _to_text,
    "character varying": _to_text,
    "character": _to_text,
}


def converter(data_type: str, udt_name: str) -> Callable[[Any], Any]:
    """How a SQLite value becomes a value of the PostgreSQL type (NULL stays NULL)."""
    if data_type == "ARRAY" and udt_name in ("_text", "_varchar"):
        return _nullable(_to_text_array)
    convert = _CONVERTERS.get(data_type)
    if convert is None:
        raise MigrationRefused(f"the target uses a column type this tool cannot fill: {data_type}")
    return _nullable(convert)


def _value_bytes(value: Any) -> int:
    return len(value) if isinstance(value, bytes | str) else 8


# ------------------------------------------------------------------------ the copy


class StoreMigration:
    """One run of migrate-store: source file, target DSN, where the report goes."""

    def __init__(self, source: Path, target_dsn: str, *, out: TextIO, err: TextIO) -> None:
        self.source = source
        self.target_dsn = target_dsn
        self.out = out
        self.err = err

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def run(self) -> list[TableCopy]:
        """Copy everything; returns what was copied per table.

        :raises MigrationRefused: nothing was written; the reason is in the message.
        :raises RepositoryError, asyncpg.PostgresError, OSError: the copy failed and was
            rolled back.
        """
        if not self.source.is_file():
            raise MigrationRefused(f"--from: no SQLite store at {self.source}")
        await self._upgrade_source()
        await self._prepare_target()
        with contextlib.closing(sqlite3.connect(self.source, isolation_level=None)) as src:
            src.execute("PRAGMA query_only=ON")
            # One read transaction: every table is read from the same snapshot.
            src.execute("BEGIN")
            self._check_credentials(src)
            conn = await asyncpg.connect(self.target_dsn, timeout=CONNECT_TIMEOUT_S)
            try:
                async with conn.transaction():
                    tables = await self._plan(src, conn)
                    for table in tables:
                        await self._copy_table(src, conn, table)
                    for table in tables:
                        await self._verify_table(src, conn, table)
                    await self._reset_sequences(conn, tables)
            finally:
                await conn.close()
            src.execute("COMMIT")
        return tables

    async def _upgrade_source(self) -> None:
        with contextlib.closing(sqlite3.connect(self.source)) as src:
            try:
                version = int(src.execute("PRAGMA user_version").fetchone()[0])
                names = {
                    row[0]
                    for row in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                }
            except sqlite3.DatabaseError as exc:
                raise MigrationRefused(
                    f"--from: {self.source} is not a SQLite store: {exc}"
                ) from None
        latest = MIGRATIONS[-1][0]
        if version > latest:
            raise MigrationRefused(
                f"the SQLite store is schema version {version}, newer than this Mailroom"
                f" ({latest}): upgrade Mailroom first"
            )
        if version == 0 or "accounts" not in names:
            raise MigrationRefused(f"--from: {self.source} is not a Mailroom store")
        if version < latest:
            # What starting the service on it would do first.
            db = Database(str(self.source))
            await db.open()
            await db.close()
            self.say(f"source: brought the SQLite schema from version {version} to {latest}")

    async def _prepare_target(self) -> None:
        """Create or upgrade the PostgreSQL schema with the store's own migrations."""
        conn = await asyncpg.connect(self.target_dsn, timeout=CONNECT_TIMEOUT_S)
        try:
            await migrate_postgres(conn)
        except SchemaTooNewError as exc:
            raise MigrationRefused(f"--to: {exc}") from None
        finally:
            await conn.close()

    def _check_credentials(self, src: sqlite3.Connection) -> None:
        """Decrypt every stored credential with MAILROOM_SECRET_KEY (or the key file beside
        the source, the key a single-machine service generated), when there is one."""
        key_ids: set[str] = set()
        stored: list[tuple[str, str, str]] = []
        for table, column, bound_field in CREDENTIAL_COLUMNS:
            for row_id, value, kind in src.execute(
                f'SELECT id, "{column}", {_auth_column(src, table, column)} FROM "{table}"'
                f' WHERE "{column}" IS NOT NULL'
            ):
                # An OAuth2 side seals its grant under its own field (migration 11).
                field_name = OAUTH_FIELDS[column] if kind == "oauth2" else bound_field
                stored.append((str(row_id), field_name, str(value)))
                parts = str(value).split(".", 2)
                if len(parts) == 3:
                    key_ids.add(parts[1])
        if not stored:
            return
        configured = os.environ.get(KEY_VARIABLE, "").strip()
        source_of_keys = KEY_VARIABLE
        key_file = Settings(database=str(self.source)).key_file
        if not configured and key_file.is_file():
            # The generated key the single-machine service used; replicas need it as the
            # variable, since a key file beside a remote database makes no sense.
            configured, source_of_keys = key_file.read_text(), f"the key file {key_file}"
        if not configured:
            self.say(
                f"credentials: {len(stored)} copied still encrypted (key id"
                f" {', '.join(sorted(key_ids))}); not checked, {KEY_VARIABLE} is not set"
            )
            return
        try:
            keys = tuple(
                decode_secret_key(part, source_of_keys)
                for part in configured.split(",")
                if part.strip()
            )
        except ConfigError as exc:
            raise MigrationRefused(str(exc)) from None
        cipher = CredentialCipher(keys)
        for row_id, bound_field, value in stored:
            try:
                cipher.decrypt(value, account_id=row_id, field=bound_field)
            except CredentialError as exc:
                known = ", ".join(key_id(key) for key in keys)
                raise MigrationRefused(
                    f"{source_of_keys} cannot decrypt the stored credentials ({exc};"
                    f" they use key id {', '.join(sorted(key_ids))}, it has {known}):"
                    f" set {KEY_VARIABLE} to the key the SQLite store was used with"
                ) from None
        self.say(f"credentials: {len(stored)} decrypt with {source_of_keys}, copied as stored")
        if source_of_keys != KEY_VARIABLE:
            self.say(
                f"  set {KEY_VARIABLE} on every replica to the content of {key_file}"
                " (the replicas cannot read that file)"
            )

    async def _plan(self, src: sqlite3.Connection, conn: Any) -> list[TableCopy]:
        """The tables to copy, parents first; refuses a non-empty target."""
        source_tables = [
            str(row[0])
            for row in src.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        target_columns: dict[str, list[Any]] = {}
        for record in await conn.fetch(
            "SELECT table_name, column_name, data_type, udt_name,"
            " is_generated = 'ALWAYS' AS generated"
            " FROM information_schema.columns WHERE table_schema = current_schema()"
            " ORDER BY table_name, ordinal_position"
        ):
            target_columns.setdefault(record["table_name"], []).append(record)
        copies: dict[str, TableCopy] = {}
        for name in source_tables:
            if name in SKIPPED_TABLES:
                continue
            count = int(src.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0])
            if name not in target_columns:
                if count:
                    raise MigrationRefused(
                        f"the target has no table {name!r} for the {count} rows of the source:"
                        " is the target's Mailroom older than the source's?"
                    )
                continue
            source_cols = [str(row[1]) for row in src.execute(f'PRAGMA table_info("{name}")')]
            by_name = {r["column_name"]: r for r in target_columns[name]}
            table = TableCopy(name=name, columns=[], primary_key=[])
            for column in source_cols:
                target = by_name.get(column)
                if target is None or target["generated"]:
                    non_null = src.execute(
                        f'SELECT count(*) FROM "{name}" WHERE "{column}" IS NOT NULL'
                    ).fetchone()[0]
                    if non_null:
                        raise MigrationRefused(
                            f"the target has no column {name}.{column} for the source's values"
                        )
                    table.dropped_columns.append(column)
                    continue
                table.columns.append(
                    Column(
                        name=column,
                        type_name=target["data_type"],
                        convert=converter(target["data_type"], target["udt_name"]),
                        is_bytes=target["data_type"] == "bytea",
                    )
                )
            copies[name] = table
        if not copies:
            raise MigrationRefused("the source has no tables to copy")
        names = list(copies)
        # Writers wait until the copy commits (or roll back); readers are not blocked.
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        await conn.execute(
            f"LOCK TABLE {', '.join(_quote(n) for n in names)} IN SHARE ROW EXCLUSIVE MODE"
        )
        occupied = []
        for name in names:
            if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {_quote(name)})"):
                rows = await conn.fetchval(f"SELECT count(*) FROM {_quote(name)}")
                occupied.append(f"{name} ({rows} rows)")
        if occupied:
            raise MigrationRefused(
                "the target is not empty: "
                + ", ".join(occupied)
                + ". migrate-store only copies into an empty store (a new database that no"
                " Mailroom has served yet)"
            )
        for record in await conn.fetch(
            "SELECT c.relname AS table_name, a.attname AS column_name"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
            " WHERE i.indisprimary AND c.relnamespace = current_schema()::regnamespace"
            " ORDER BY c.relname, array_position(i.indkey::int2[], a.attnum)"
        ):
            if record["table_name"] in copies:
                copies[record["table_name"]].primary_key.append(record["column_name"])
        edges: dict[str, set[str]] = {name: set() for name in names}
        for record in await conn.fetch(
            "SELECT c.relname AS child, p.relname AS parent FROM pg_constraint k"
            " JOIN pg_class c ON c.oid = k.conrelid JOIN pg_class p ON p.oid = k.confrelid"
            " WHERE k.contype = 'f' AND c.relnamespace = current_schema()::regnamespace"
        ):
            child, parent = record["child"], record["parent"]
            if child in edges and parent in edges and child != parent:
                edges[child].add(parent)
        return [copies[name] for name in _parents_first(edges)]

    async def _copy_table(self, src: sqlite3.Connection, conn: Any, table: TableCopy) -> None:
        if not table.columns:
            return
        select = ", ".join(f'"{c.name}"' for c in table.columns)
        order = ", ".join(f'"{c}"' for c in table.primary_key) or "rowid"
        cursor = src.execute(f'SELECT {select} FROM "{table.name}" ORDER BY {order}')
        names = [c.name for c in table.columns]
        for batch in _batches(cursor, table):
            await conn.copy_records_to_table(table.name, records=batch, columns=names)
            table.rows += len(batch)
        copied = await conn.fetchval(f"SELECT count(*) FROM {_quote(table.name)}")
        if copied != table.rows:
            raise RepositoryError(
                f"{table.name}: copied {table.rows} rows, the target has {copied}"
            )
        self.say(f"  {table.name:<20} {table.rows:>10} rows")

    async def _verify_table(self, src: sqlite3.Connection, conn: Any, table: TableCopy) -> None:
        """Compare the SHA-256 of every byte column, row by row, with the source's."""
        blobs = [c for c in table.columns if c.is_bytes]
        if not blobs or not table.rows:
            return
        if not table.primary_key:
            raise RepositoryError(f"{table.name}: no primary key to verify its bytes by")
        keys = [next(c for c in table.columns if c.name == k) for k in table.primary_key]
        select = ", ".join(f'"{c.name}"' for c in (*keys, *blobs))
        cursor = src.execute(f'SELECT {select} FROM "{table.name}"')
        arrays = ", ".join(f"${i + 1}::{_array_type(c)}" for i, c in enumerate(keys))
        aliases = ", ".join(f"k{i}" for i in range(len(keys)))
        join = " AND ".join(
            f"t.{_quote(c.name)} = k.k{i}{_TEXT_EQUALITY if c.type_name in _TEXT_TYPES else ''}"
            for i, c in enumerate(keys)
        )
        digests = ", ".join(f"sha256(t.{_quote(c.name)})" for c in blobs)
        query = (
            f"SELECT {', '.join(f'k.k{i}' for i in range(len(keys)))}, {digests}"
            f" FROM {_quote(table.name)} t JOIN unnest({arrays}) AS k({aliases}) ON {join}"
        )
        while rows := cursor.fetchmany(VERIFY_BATCH_ROWS):
            expected: dict[tuple[Any, ...], list[bytes | None]] = {}
            for row in rows:
                key = tuple(c.convert(v) for c, v in zip(keys, row, strict=False))
                expected[key] = [
                    None if v is None else hashlib.sha256(c.convert(v)).digest()
                    for c, v in zip(blobs, row[len(keys) :], strict=True)
                ]
            columns = [list(values) for values in zip(*expected, strict=True)]
            found = await conn.fetch(query, *columns)
            for record in found:
                key = tuple(record[i] for i in range(len(keys)))
                got = [record[len(keys) + j] for j in range(len(blobs))]
                if expected.pop(key, None) != [None if g is None else bytes(g) for g in got]:
                    raise RepositoryError(f"{table.name}: the bytes of row {key} differ")
            if expected:
                raise RepositoryError(f"{table.name}: rows missing in the target: {list(expected)}")
            table.verified += len(rows)

    async def _reset_sequences(self, conn: Any, tables: Sequence[TableCopy]) -> None:
        """Move any sequence behind a copied column past the copied values."""
        for table in tables:
            for column in table.columns:
                sequence = await conn.fetchval(
                    "SELECT pg_get_serial_sequence($1, $2)", _quote(table.name), column.name
                )
                if sequence and table.rows:
                    await conn.execute(
                        f"SELECT setval($1::text::regclass, (SELECT max({_quote(column.name)})"
                        f" FROM {_quote(table.name)}))",
                        sequence,
                    )


def _batches(cursor: sqlite3.Cursor, table: TableCopy) -> Iterator[list[tuple[Any, ...]]]:
    """Converted rows in batches bounded by BATCH_ROWS and BATCH_BYTES."""
    batch: list[tuple[Any, ...]] = []
    size = 0
    for row in cursor:
        try:
            converted = tuple(c.convert(v) for c, v in zip(table.columns, row, strict=True))
        except (ValueError, TypeError) as exc:
            raise MigrationRefused(
                f"{table.name}: a value does not fit the target's column type: {exc}"
            ) from None
        batch.append(converted)
        size += sum(_value_bytes(v) for v in row)
        if len(batch) >= BATCH_ROWS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _parents_first(edges: dict[str, set[str]]) -> list[str]:
    """Tables ordered so that every referenced table comes before the ones referring to it."""
    ordered: list[str] = []
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in path:
            raise MigrationRefused(f"the target's foreign keys form a cycle: {path}")
        for parent in sorted(edges[name]):
            visit(parent, (*path, name))
        done.add(name)
        ordered.append(name)

    for name in sorted(edges):
        visit(name, ())
    return ordered


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


# Byte-wise equality for text keys: the target's ids have their own collation ("C"), and
# a comparison between two implicit collations would be an error.
_TEXT_EQUALITY = ' COLLATE "C"'
_TEXT_TYPES = frozenset({"text", "character varying", "character"})


def _array_type(column: Column) -> str:
    return f"{column.type_name}[]"


# ------------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service migrate-store",
        description="Copy a Mailroom SQLite store into an empty PostgreSQL store.",
    )
    parser.add_argument("--from", dest="source", required=True, metavar="sqlite:///PATH")
    parser.add_argument("--to", dest="target", required=True, metavar="postgresql://...")
    return parser


def main(argv: Sequence[str], *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run migrate-store with command-line arguments ``argv``; returns the exit code."""
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse has printed the usage
        return EXIT_REFUSED if exc.code else EXIT_OK
    try:
        source = sqlite_path(args.source)
        target = postgres_dsn(args.target)
    except MigrationRefused as exc:
        print(f"mailroom migrate-store: {exc}", file=err)
        return EXIT_REFUSED
    migration = StoreMigration(source, target, out=out, err=err)
    migration.say(f"migrate-store: {source} -> {url_for_display(target)}")
    try:
        tables = asyncio.run(migration.run())
    except MigrationRefused as exc:
        print(f"mailroom migrate-store: refused: {exc}", file=err)
        return EXIT_REFUSED
    except (RepositoryError, asyncpg.PostgresError, OSError, sqlite3.Error) as exc:
        print(
            f"mailroom migrate-store: failed, nothing was committed: {type(exc).__name__}: {exc}",
            file=err,
        )
        return EXIT_FAILED
    total = sum(t.rows for t in tables)
    verified = ", ".join(f"{t.verified} {t.name}" for t in tables if t.verified)
    migration.say(
        f"copied {total} rows in {len(tables)} tables in one transaction;"
        f" bytes verified by SHA-256: {verified or 'none to verify'}"
    )
    migration.say(
        "credentials were copied encrypted: run every replica on the new store with the key"
        f" the SQLite store used ({KEY_VARIABLE}; a store that used the generated key"
        " file has it in mailroom.key beside the database)"
    )
    return EXIT_OK
