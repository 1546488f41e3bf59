"""Driver errors become the same repository errors on both stores; a store that cannot be
reached answers StoreUnavailableError within the timeout; a newer schema is refused."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from service.config import ConfigError, Settings
from service.repository.errors import SchemaTooNewError, StoreUnavailableError
from service.repository.store import Store, create_store
from tests.repository.conftest import make_account, store_settings
from tests.servers.postgres import new_database


async def _bump_version(kind: str, settings: Settings, version: int) -> None:
    if kind == "sqlite":
        with sqlite3.connect(settings.database_path) as conn:
            conn.execute(f"PRAGMA user_version={version}")
        return
    conn = await asyncpg.connect(settings.database)
    try:
        await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
    finally:
        await conn.close()


async def test_a_newer_schema_is_refused(store_kind: str, tmp_path: Path) -> None:
    settings = store_settings(store_kind, tmp_path)
    store = create_store(settings)
    await store.open()
    latest = store.latest_version
    assert await store.schema_version() == latest
    await store.close()
    # Opening again (another replica, a restart) migrates nothing and works.
    await store.open()
    assert await store.schema_version() == latest
    await store.close()
    await _bump_version(store_kind, settings, latest + 1)
    with pytest.raises(SchemaTooNewError) as caught:
        await create_store(settings).open()
    assert str(caught.value) == (
        f"the database schema is version {latest + 1}, newer than this Mailroom ({latest}):"
        " upgrade Mailroom"
    )


async def test_replicas_starting_together_migrate_once(tmp_path: Path) -> None:
    settings = store_settings("postgres", tmp_path)
    stores = [create_store(settings) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        versions = [await s.schema_version() for s in stores]
        assert versions == [stores[0].latest_version] * 4
        await stores[0].accounts.add(make_account())
    finally:
        for s in stores:
            await s.close()


def _dead_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_database_is_unavailable_not_a_crash() -> None:
    settings = Settings(
        database=f"postgresql://postgres@127.0.0.1:{_dead_port()}/none",
        secret_keys=(b"k" * 32,),
        db_timeout_s=2.0,
    )
    with pytest.raises(StoreUnavailableError):
        await create_store(settings).open()


async def test_no_free_connection_within_the_timeout(tmp_path: Path) -> None:
    settings = store_settings("postgres", tmp_path, db_pool_size=1, db_timeout_s=0.3)
    store: Store = create_store(settings)
    await store.open()
    try:
        held = asyncio.Event()
        release = asyncio.Event()

        async def hold() -> None:
            db = store.db  # type: ignore[attr-defined]
            async with db.transaction():
                held.set()
                await release.wait()

        holder = asyncio.create_task(hold())
        await held.wait()
        with pytest.raises(StoreUnavailableError):
            await store.accounts.get_any("acc_x")
        release.set()
        await holder
        assert await store.accounts.get_any("acc_x") is None  # and it recovers
    finally:
        await store.close()


async def test_connections_killed_by_the_server_are_replaced(tmp_path: Path) -> None:
    dsn = new_database()
    settings = Settings(database=dsn, secret_keys=(b"k" * 32,), db_pool_size=3)
    store = create_store(settings)
    await store.open()
    try:
        account = make_account()
        await store.accounts.add(account)
        name = dsn.rsplit("/", 1)[1]
        admin = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres")
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
                name,
            )
        finally:
            await admin.close()
        assert killed >= 1
        outcomes: list[object] = []
        for _ in range(5):
            try:
                outcomes.append(await store.accounts.get_any(account.id))
            except StoreUnavailableError as exc:  # the broken connection, once
                outcomes.append(exc)
        assert outcomes[-1] == account
        assert all(o == account or isinstance(o, StoreUnavailableError) for o in outcomes)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("value", "kind", "path"),
    [
        ("./data/mailroom.db", "sqlite", "data/mailroom.db"),
        ("sqlite:///data/m.db", "sqlite", "data/m.db"),
        ("sqlite:////var/lib/m.db", "sqlite", "/var/lib/m.db"),
        ("postgresql://mr@db:5432/mailroom", "postgres", None),
        ("postgres://mr@db/mailroom", "postgres", None),
    ],
)
def test_the_database_setting_picks_the_store(value: str, kind: str, path: str | None) -> None:
    env = {"MAILROOM_DATABASE": value, "MAILROOM_SECRET_KEY": "A" * 43}
    settings = Settings.from_env(env)
    assert settings.store_kind == kind
    if path is not None:
        assert settings.database_path == Path(path)


@pytest.mark.parametrize("value", ["mysql://db/x", "sqlite://relative.db", "redis://x"])
def test_another_scheme_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigError, match="MAILROOM_DATABASE"):
        Settings.from_env({"MAILROOM_DATABASE": value})


def test_postgres_needs_the_shared_secret_key() -> None:
    with pytest.raises(ConfigError, match="MAILROOM_SECRET_KEY"):
        Settings.from_env({"MAILROOM_DATABASE": "postgresql://db/x"})
    settings = Settings.from_env(
        {"MAILROOM_DATABASE": "postgresql://db/x", "MAILROOM_DB_POOL_SIZE": "3",
         "MAILROOM_DB_TIMEOUT": "2.5", "MAILROOM_SECRET_KEY": "A" * 43}
    )  # fmt: skip
    assert (settings.db_pool_size, settings.db_timeout_s) == (3, 2.5)
    with pytest.raises(ConfigError, match="MAILROOM_DB_POOL_SIZE"):
        Settings.from_env({"MAILROOM_DB_POOL_SIZE": "0"})


def test_the_process_exits_2_on_an_unknown_scheme(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service"],
        env={
            "MAILROOM_DATABASE": "mysql://db/x",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "MAILROOM_DATABASE" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no local file made for it
