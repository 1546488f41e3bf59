"""A PostgreSQL database for the container test, and the check of what the image wrote.

Used by scripts/container_test.sh with the project's .venv python: the server is found or
started exactly as the test suite does it (tests/servers/postgres.py, imported from the
repository root), and the rows are read with asyncpg and the service's own cipher.

    pg_database.py hold --state FILE --parent-pid PID
        Finds the server (MAILROOM_TEST_POSTGRES; else 127.0.0.1:5432 with trust
        authentication as postgres; else a throw-away cluster of the installed Debian
        binaries), creates a fresh database, writes {"dsn", "where"} to FILE and waits.
        On SIGTERM or SIGINT, or once PID is gone, it drops the database, stops and removes
        a cluster it started, and exits 0 when the database is gone.
    pg_database.py rows --state FILE --smoke JSON
        What the container left behind after its shutdown (JSON is what smoke.py postgres
        created): the migrated schema, the one account row, its password stored encrypted
        with MAILROOM_SECRET_KEY (read from the environment), no connection left open.

Every check prints one "ok: ..." line; the first failure prints "FAIL: ..." and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from smoke import alive, check, fail  # noqa: E402 (scripts/container is sys.path[0])

from service.config import decode_secret_key  # noqa: E402
from service.crypto import CredentialCipher, CredentialError  # noqa: E402
from service.repository.postgres.migrations import schema_version  # noqa: E402
from service.services.accounts import IN_PASSWORD  # noqa: E402
from tests.servers import postgres as pg  # noqa: E402

CONNECT_TIMEOUT_S = 5.0
CLOSE_WAIT_S = 5.0


def log(msg: str) -> None:
    print(f"   {msg}", flush=True)


def public(dsn: str) -> str:
    """host:port/database, without user or password."""
    parts = urlsplit(dsn)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


def database_exists(name: str) -> bool:
    async def query() -> bool:
        conn = await asyncpg.connect(pg.server_dsn(), timeout=CONNECT_TIMEOUT_S)
        try:
            found = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        finally:
            await conn.close()
        return found is not None

    return pg.run_sync(query())


def server_version(dsn: str) -> str:
    async def query() -> str:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    return pg.run_sync(query())


# --------------------------------------------------------------------------- hold
def cmd_hold(a: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = pg.server_dsn()
    except subprocess.CalledProcessError as exc:  # initdb or pg_ctl
        detail = (exc.stderr or b"").decode(errors="replace").strip()
        fail(f"no PostgreSQL server: {exc}{': ' + detail if detail else ''}")
    except (OSError, RuntimeError) as exc:  # pg.PostgresUnavailable is a RuntimeError
        fail(f"no PostgreSQL server: {exc}")
    cluster = pg._cluster  # set when server_dsn() had to start a throw-away cluster
    if cluster is not None:
        where = f"a throw-away cluster ({cluster.bin}, port {cluster.port})"
    elif os.environ.get(pg.ENV_DSN):
        where = f"{pg.ENV_DSN} ({public(server)})"
    else:
        where = f"the server on {public(server)}"
    where += f", PostgreSQL {server_version(server)}"
    dsn = pg.new_database()
    name = urlsplit(dsn).path.lstrip("/")
    try:
        state = Path(a.state)
        tmp = state.with_name(state.name + ".tmp")
        tmp.write_text(json.dumps({"dsn": dsn, "where": where, "database": name}))
        tmp.chmod(0o600)
        tmp.replace(state)
        log(f"created database {name} on {where}")
        while not stop.wait(0.5):
            if not alive(a.parent_pid):
                log(f"pid {a.parent_pid} is gone: cleaning up")
                break
    finally:
        pg.drop_database(dsn)
        gone = not database_exists(name)
        log(f"dropped database {name}" if gone else f"database {name} is still there")
        if cluster is not None:
            cluster.remove()
            atexit.unregister(cluster.remove)
            pg._cluster = None
            log(f"stopped and removed the throw-away cluster ({cluster.root})")
    return 0 if gone else 1


# --------------------------------------------------------------------------- rows
async def check_rows(dsn: str, smoke: dict[str, Any], keys: tuple[bytes, ...]) -> None:
    sent = smoke["account"]
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        version = await schema_version(conn)
        check(
            version == smoke["schema_version"],
            f"PostgreSQL: schema_version is {version}, as /ready said",
            f"/ready said {smoke['schema_version']}",
        )
        rows = await conn.fetch(
            "SELECT id, name, email, in_host, in_username, in_password FROM accounts"
        )
        ids = [r["id"] for r in rows]
        check(
            ids == [smoke["account_id"]],
            f"PostgreSQL: accounts holds the one account the API created ({smoke['account_id']})",
            f"ids {ids}",
        )
        row = rows[0]
        incoming = sent["incoming"]
        check(
            (row["name"], row["email"], row["in_host"], row["in_username"])
            == (sent["name"], sent["email"], incoming["host"], incoming["username"]),
            "PostgreSQL: the row has the name, email and POP3 settings sent",
            repr(dict(row)),
        )
        stored = row["in_password"]
        check(
            incoming["password"] not in stored,
            "PostgreSQL: the POP3 password is not stored in clear",
        )
        try:
            plain = CredentialCipher(keys).decrypt(stored, account_id=row["id"], field=IN_PASSWORD)
        except CredentialError as exc:
            fail(f"PostgreSQL: the stored password does not decrypt with the key: {exc}")
        check(
            plain == incoming["password"],
            "PostgreSQL: it decrypts with the MAILROOM_SECRET_KEY given to the container",
        )
        # The server's pool is closed on a graceful shutdown; a backend may take a moment to
        # leave pg_stat_activity after its client said goodbye.
        deadline = time.monotonic() + CLOSE_WAIT_S
        while True:
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            if left == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        check(
            left == 0,
            "PostgreSQL: no connection of the server is left open (its pool was closed)",
            f"{left} still open after {CLOSE_WAIT_S:.0f}s",
        )
    finally:
        await conn.close()


def cmd_rows(a: argparse.Namespace) -> int:
    dsn = json.loads(Path(a.state).read_text())["dsn"]
    smoke = json.loads(Path(a.smoke).read_text())
    secret = os.environ.get("MAILROOM_SECRET_KEY", "")
    keys = tuple(
        decode_secret_key(part, "MAILROOM_SECRET_KEY") for part in secret.split(",") if part
    )
    if not keys:
        fail("MAILROOM_SECRET_KEY is not set for the rows check")
    asyncio.run(check_rows(dsn, smoke, keys))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold")
    h.add_argument("--state", required=True)
    h.add_argument("--parent-pid", type=int, required=True)
    r = sub.add_parser("rows")
    r.add_argument("--state", required=True)
    r.add_argument("--smoke", required=True)
    a = ap.parse_args()
    sys.exit({"hold": cmd_hold, "rows": cmd_rows}[a.cmd](a))


if __name__ == "__main__":
    main()
