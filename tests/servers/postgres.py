"""A real PostgreSQL server for tests and benchmarks, and a fresh database per test.

Where the server comes from, first match wins:

1. ``MAILROOM_TEST_POSTGRES``: a DSN of a server the tests may create databases on
   (``postgresql://postgres@127.0.0.1:5432/postgres``);
2. a PostgreSQL already answering on 127.0.0.1:5432 (trust authentication, user postgres);
3. a throw-away cluster started here: ``initdb`` in a temporary directory (installing the
   Debian package ``postgresql`` first if it is missing), on a free port, stopped at the
   end of the session. A failure to get one is an error, never a skip.

Fixtures (registered for the whole suite by ``tests/conftest.py``):

- ``postgres_server`` (session): the server DSN (its ``postgres`` database).
- ``pg_database`` (function): the DSN of a new, empty database, dropped after the test.

Outside fixtures (``make_settings``, ``bench/``): ``new_database()`` gives a fresh database's
DSN; the ones made during a test are dropped after it (an autouse fixture), the others at
exit. ``with running_postgres() as dsn: ...`` starts a private cluster (for a test that
restarts the server: ``PrivateCluster.stop()``/``start()``).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

ENV_DSN = "MAILROOM_TEST_POSTGRES"
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE_PREFIX = "mr_"
CONNECT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 60
T = TypeVar("T")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL could be found, installed or started."""


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on a loop of its own (in a thread, so this works from
    inside a running event loop too)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _answers(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return False
    await conn.close()
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin_dir() -> Path:
    """The directory of ``initdb``/``pg_ctl``, installing PostgreSQL if it is missing."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and shutil.which("initdb") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise PostgresUnavailable(
                "PostgreSQL is not installed: install the Debian package postgresql or set"
                f" {ENV_DSN} to a server DSN"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
            check=True,
            env=env,
        )
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    assert which is not None
    return Path(which).parent


class PrivateCluster:
    """A throw-away PostgreSQL cluster in a temporary directory, on a free port."""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="mailroom-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # initdb refuses to run as root: the cluster belongs to the postgres user then.
        self._user = "postgres" if os.geteuid() == 0 else None
        self.root.chmod(0o755)
        self.data.mkdir(mode=0o700)
        if self._user is not None:
            owner = pwd.getpwnam(self._user)
            os.chown(self.data, owner.pw_uid, owner.pw_gid)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", self._user, "--"] if self._user else []
        subprocess.run(
            [*prefix, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.data / "server.log"),
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "start",
        )

    def stop(self, mode: str = "immediate") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[PrivateCluster]:
    """A private cluster for the duration of the block (``cluster.dsn``)."""
    cluster = PrivateCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


_server_dsn: str | None = None
_cluster: PrivateCluster | None = None


def server_dsn() -> str:
    """The DSN of the server the tests use (found or started once per process)."""
    global _server_dsn, _cluster
    if _server_dsn is not None:
        return _server_dsn
    configured = os.environ.get(ENV_DSN)
    if configured:
        if not run_sync(_answers(configured)):
            raise PostgresUnavailable(f"{ENV_DSN}={configured!r} does not answer")
        _server_dsn = configured
    elif run_sync(_answers(LOCAL_DSN)):
        _server_dsn = LOCAL_DSN
    else:
        cluster = PrivateCluster()
        cluster.start()
        atexit.register(cluster.remove)
        _cluster, _server_dsn = cluster, cluster.dsn
    return _server_dsn


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


# Databases made by new_database() and not yet dropped.
_created: list[str] = []


def new_database() -> str:
    """Create an empty database on the test server; return its DSN."""
    server = server_dsn()
    name = DATABASE_PREFIX + secrets.token_hex(6)

    async def create() -> None:
        conn = await asyncpg.connect(server, timeout=CONNECT_TIMEOUT_S)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    run_sync(create())
    dsn = _with_database(server, name)
    _created.append(dsn)
    return dsn


def drop_database(dsn: str) -> None:
    """Drop a database made by ``new_database`` (its connections are ended first)."""
    name = urlsplit(dsn).path.lstrip("/")
    assert name.startswith(DATABASE_PREFIX), name

    async def drop() -> None:
        conn = await asyncpg.connect(server_dsn(), timeout=CONNECT_TIMEOUT_S)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    run_sync(drop())
    with contextlib.suppress(ValueError):
        _created.remove(dsn)


def drop_created() -> None:
    """Drop every database ``new_database`` made that is still there."""
    for dsn in list(_created):
        drop_database(dsn)


atexit.register(lambda: _cluster is None and drop_created())


@pytest.fixture(scope="session")
def postgres_server() -> str:
    return server_dsn()


@pytest.fixture
def pg_database(postgres_server: str) -> Iterator[str]:
    dsn = new_database()
    try:
        yield dsn
    finally:
        drop_database(dsn)


@pytest.fixture(autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """Databases a test made through ``new_database()`` (``make_settings`` on the
    PostgreSQL pass) are dropped when it ends, so they do not pile up on disk."""
    before = len(_created)
    yield
    if len(_created) > before:
        for dsn in _created[before:]:
            drop_database(dsn)
