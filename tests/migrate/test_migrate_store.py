"""``python -m service migrate-store``: a SQLite store copied into PostgreSQL, whole or not at all.

The SQLite store is made by the real service (``python -m service``): accounts with
encrypted POP3 and SMTP passwords, a retrieval from Dovecot (messages, their raw bytes and
the known UIDLs), sends delivered to an aiosmtpd that requires AUTH (bodies, recipients,
attempts), a send that stays deferred and an idempotency key. After the copy the service
runs on the PostgreSQL database and everything reads back the same through the API; a new
retrieval downloads only the new message (the UIDLs came along) and a new send
authenticates (the passwords still decrypt with the same key).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.config import ApiKey, Settings
from service.domain.threads import SQLITE_FUNCTION, thread_id_of
from service.domain.time import to_text, utcnow
from service.repository.migrations import MIGRATIONS
from service.repository.postgres.migrations import migrate as migrate_postgres
from tests.process import ROOT, free_port, start, stop
from tests.servers.dovecot import Dovecot, Mailbox
from tests.servers.smtp import SMTPD_USERS, SMTPDServer
from tests.waiting import until

KEY = "migrate-test-key-0123456789"
HEADERS = {"Authorization": f"Bearer {KEY}"}
PAGE = 500
SMTP_USER, SMTP_PASSWORD = next(iter(SMTPD_USERS.items()))
# Tables the copy fills from the store below, with at least this many rows each.
EXPECTED_ROWS = {
    "accounts": 2,
    "retrievals": 1,
    "messages": 3,
    "message_bodies": 3,
    "server_messages": 3,
    "outbox": 3,
    "outbox_bodies": 3,
    "outbox_recipients": 5,
    "outbox_attempts": 3,
}
DONE = ("sent", "failed", "cancelled")

PLAIN = b"From: a@example.com\r\nTo: me@example.com\r\nSubject: one\r\n\r\nHello.\r\n"
EIGHT_BIT = (
    b"From: b@example.com\r\nTo: me@example.com\r\nSubject: two\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nCaf\xe9 cr\xe8me br\xfbl\xe9e, \x80\xff.\r\n"
)
ATTACHMENT = os.urandom(3000)
WITH_ATTACHMENT = (
    b"From: c@example.com\r\nTo: me@example.com\r\nSubject: three\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
    b"Content-Type: text/plain\r\n\r\nSee attached.\r\n--b1\r\n"
    b'Content-Type: application/octet-stream; name="blob.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(ATTACHMENT).replace(b"\n", b"\r\n")
    + b"--b1--\r\n"
)
LATER = b"From: d@example.com\r\nTo: me@example.com\r\nSubject: four\r\n\r\nAfter the move.\r\n"


def secret_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def service_env(database: str, secret: str) -> dict[str, str]:
    return {
        "MAILROOM_DATABASE": database,
        "MAILROOM_API_KEYS": KEY,
        "MAILROOM_SECRET_KEY": secret,
        "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
        # A deferred message stays deferred for the whole test.
        "MAILROOM_RETRY_DELAYS": "3600",
    }


def migrate_store(
    source: str, target: str, secret: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real command line, as an operator would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    if secret is not None:
        env["MAILROOM_SECRET_KEY"] = secret
    return subprocess.run(
        [sys.executable, "-m", "service", "migrate-store", "--from", source, "--to", target],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def table_counts(dsn: str) -> dict[str, int]:
    """Rows per table of the PostgreSQL store (schema bookkeeping left out)."""
    conn = await asyncpg.connect(dsn)
    try:
        names = await conn.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
        counts = {}
        for record in names:
            name = record["table_name"]
            if name != "schema_version":
                counts[name] = await conn.fetchval(f'SELECT count(*) FROM "{name}"')
        return counts
    finally:
        await conn.close()


async def all_pages(client: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": PAGE}
        if cursor:
            params["cursor"] = cursor
        response = await client.get(path, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


async def snapshot(client: httpx.AsyncClient) -> dict[str, Any]:
    """Everything the API shows of the store, raw message bytes included."""
    accounts = await all_pages(client, "/v1/accounts")
    view: dict[str, Any] = {"accounts": accounts}
    for account in accounts:
        base = f"/v1/accounts/{account['id']}"
        messages = await all_pages(client, f"{base}/messages")
        raws = {}
        for message in messages:
            raw = await client.get(f"{base}/messages/{message['id']}/raw")
            assert raw.status_code == 200, raw.text
            raws[message["id"]] = raw.content
        outbox = await all_pages(client, f"{base}/outbox")
        details = []
        for item in outbox:
            detail = await client.get(f"{base}/outbox/{item['id']}")
            assert detail.status_code == 200, detail.text
            details.append(detail.json())
        view[account["id"]] = {
            "account": (await client.get(base)).json(),
            "retrievals": await all_pages(client, f"{base}/retrievals"),
            "messages": messages,
            "raw": raws,
            "outbox": outbox,
            "outbox_details": details,
        }
    return view


async def retrieve(client: httpx.AsyncClient, account_id: str) -> dict[str, Any]:
    started = await client.post(f"/v1/accounts/{account_id}/retrievals")
    assert started.status_code == 202, started.text
    path = f"/v1/accounts/{account_id}/retrievals/{started.json()['id']}"

    async def fetch() -> dict[str, Any]:
        return (await client.get(path)).json()  # type: ignore[no-any-return]

    done = await until(fetch, lambda r: r["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    return done


async def send(
    client: httpx.AsyncClient, account_id: str, body: dict[str, Any], **headers: str
) -> str:
    response = await client.post(f"/v1/accounts/{account_id}/outbox", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def outgoing(client: httpx.AsyncClient, account_id: str, outgoing_id: str) -> Any:
    return (await client.get(f"/v1/accounts/{account_id}/outbox/{outgoing_id}")).json()


def account_body(name: str, mailbox: Mailbox, smtp_host: str, smtp_port: int) -> dict[str, Any]:
    return {
        "name": name,
        "email": f"{name.lower()}@example.com",
        "incoming": {
            "host": mailbox.server.host,
            "port": mailbox.server.pop3_port,
            "security": "none",
            "username": mailbox.user,
            "password": mailbox.password,
        },
        "outgoing": {
            "host": smtp_host,
            "port": smtp_port,
            "security": "none",
            "username": SMTP_USER,
            "password": SMTP_PASSWORD,
            # Loopback without TLS: the test server, not a real provider.
            "allow_insecure_auth": True,
        },
    }


async def test_the_service_serves_the_copied_store_from_postgres(
    tmp_path: Path,
    pg_database: str,
    dovecot_plain: Dovecot,
    smtpd_factory: Callable[..., Awaitable[SMTPDServer]],
) -> None:
    smtpd = await smtpd_factory(users=SMTPD_USERS, auth_require_tls=False)
    mailbox = dovecot_plain.add_user()
    mailbox.deliver_many([PLAIN, EIGHT_BIT, WITH_ATTACHMENT])
    secret = secret_key()
    db = tmp_path / "data" / "mailroom.db"

    # 1. The SQLite store, made through the real service.
    proc, base = await asyncio.to_thread(start, service_env(f"sqlite:///{db}", secret))
    try:
        async with httpx.AsyncClient(base_url=base, headers=HEADERS) as client:
            created = await client.post(
                "/v1/accounts", json=account_body("Alice", mailbox, smtpd.host, smtpd.port)
            )
            assert created.status_code == 201, created.text
            alice = created.json()["id"]
            # Bob's SMTP server does not answer: his message stays deferred, one attempt.
            created = await client.post(
                "/v1/accounts", json=account_body("Bob", mailbox, "127.0.0.1", free_port())
            )
            assert created.status_code == 201, created.text
            bob = created.json()["id"]
            assert (await retrieve(client, alice))["messages_downloaded"] == 3
            first = {
                "to": ["carol@example.org"],
                "cc": ["dave@example.org"],
                "bcc": ["erin@example.org"],
                "subject": "Report",
                "text": "Attached.\n",
                "attachments": [
                    {
                        "filename": "data.bin",
                        "content_type": "application/octet-stream",
                        "content_base64": base64.b64encode(ATTACHMENT).decode(),
                    }
                ],
            }
            sent = [
                await send(client, alice, first, **{"Idempotency-Key": "report-1"}),
                await send(
                    client,
                    alice,
                    {"to": ["frank@example.org"], "subject": "Hi", "text": "Hello.\n"},
                ),
            ]
            deferred = await send(
                client, bob, {"to": ["gina@example.org"], "subject": "Later", "text": "Later.\n"}
            )
            for outgoing_id in sent:
                done = await until(
                    lambda i=outgoing_id: outgoing(client, alice, i),
                    lambda m: m["status"] in DONE,
                )
                assert done["status"] == "sent", done
            waiting = await until(lambda: outgoing(client, bob, deferred), lambda m: m["attempts"])
            assert waiting["status"] == "deferred", waiting
            before = await snapshot(client)
    finally:
        await asyncio.to_thread(stop, proc)
    assert len(smtpd.messages) == 2

    # 2. The copy.
    result = await asyncio.to_thread(migrate_store, f"sqlite:///{db}", pg_database, secret)
    assert result.returncode == 0, result.stdout + result.stderr
    report = result.stdout
    counts = await table_counts(pg_database)
    for table, least in EXPECTED_ROWS.items():
        assert counts[table] >= least, (table, counts)
        assert f"{table} " in report and f" {counts[table]} rows" in report, report
    assert "SHA-256" in report and "MAILROOM_SECRET_KEY" in report, report
    assert "credentials: 4 decrypt with MAILROOM_SECRET_KEY" in report, report

    # 3. The same service on PostgreSQL: everything reads back the same, and works.
    proc, base = await asyncio.to_thread(start, service_env(pg_database, secret))
    try:
        async with httpx.AsyncClient(base_url=base, headers=HEADERS) as client:
            after = await snapshot(client)
            assert after == before
            raws = before[alice]["raw"].values()
            served = {hashlib.sha256(raw).hexdigest() for raw in raws}
            delivered = {hashlib.sha256(m).hexdigest() for m in (PLAIN, EIGHT_BIT, WITH_ATTACHMENT)}
            assert served == delivered

            # The idempotency key still names the same message.
            again = await client.post(
                f"/v1/accounts/{alice}/outbox", json=first, headers={"Idempotency-Key": "report-1"}
            )
            assert again.json()["id"] == sent[0], again.text

            # The known UIDLs came along: only the new message is downloaded. The POP3
            # password decrypts, or the login would fail.
            mailbox.deliver(LATER)
            retrieval = await retrieve(client, alice)
            assert retrieval["messages_downloaded"] == 1, retrieval
            assert retrieval["messages_on_server"] == 4, retrieval

            # The SMTP password decrypts: the server requires AUTH.
            third = await send(
                client, alice, {"to": ["hal@example.org"], "subject": "Moved", "text": "Moved.\n"}
            )
            done = await until(
                lambda: outgoing(client, alice, third), lambda m: m["status"] in DONE
            )
            assert done["status"] == "sent", done
    finally:
        await asyncio.to_thread(stop, proc)
    assert len(smtpd.messages) == 3
    assert any(command.startswith("AUTH") for command in smtpd.commands), smtpd.commands


async def make_sqlite_store(path: Path, secret: str | None, accounts: int = 2) -> None:
    """A small SQLite store through the app in this process (accounts only); without
    ``secret``, the app generates the key file beside the database."""
    settings = Settings(
        database=str(path),
        api_keys=(ApiKey("default", KEY),),
        secret_keys=() if secret is None else (base64.urlsafe_b64decode(secret),),
    )
    async with AsyncTestClient(app=create_app(settings)) as client:
        for i in range(accounts):
            created = await client.post(
                "/v1/accounts",
                headers=HEADERS,
                json={
                    "name": f"n{i}",
                    "email": f"n{i}@example.com",
                    "incoming": {"host": "pop.example.com", "username": "u", "password": "p1"},
                    "outgoing": {"host": "smtp.example.com", "username": "u", "password": "p2"},
                },
            )
            assert created.status_code == 201, created.text


async def test_a_target_that_holds_data_is_refused_and_left_as_it_was(
    tmp_path: Path, pg_database: str
) -> None:
    secret = secret_key()
    db = tmp_path / "mailroom.db"
    await make_sqlite_store(db, secret)
    first = await asyncio.to_thread(migrate_store, f"sqlite:///{db}", pg_database, secret)
    assert first.returncode == 0, first.stdout + first.stderr
    copied = await table_counts(pg_database)
    assert copied["accounts"] == 2

    again = await asyncio.to_thread(migrate_store, f"sqlite:///{db}", pg_database, secret)
    assert again.returncode == 2, again.stdout + again.stderr
    assert "not empty" in again.stderr and "accounts (2 rows)" in again.stderr, again.stderr
    assert await table_counts(pg_database) == copied


async def test_a_failure_midway_commits_nothing(tmp_path: Path, pg_database: str) -> None:
    """A bad value in the last table to copy: the tables copied before it roll back too."""
    secret = secret_key()
    db = tmp_path / "mailroom.db"
    await make_sqlite_store(db, secret)
    with sqlite3.connect(db) as conn:
        # A timestamp that is not one: what a damaged or hand-edited store might hold.
        conn.execute("UPDATE accounts SET updated_at = 'yesterday' WHERE name = 'n1'")
    conn.close()
    result = await asyncio.to_thread(migrate_store, f"sqlite:///{db}", pg_database, secret)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "accounts: a value does not fit" in result.stderr, result.stderr
    assert set((await table_counts(pg_database)).values()) == {0}


async def test_bytes_changed_on_the_way_fail_the_check_and_nothing_is_committed(
    tmp_path: Path, pg_database: str
) -> None:
    """A trigger that alters the stored bytes stands in for corruption in transit."""
    secret = secret_key()
    db = tmp_path / "mailroom.db"
    await make_sqlite_store(db, secret, accounts=1)
    # One stored message and its raw bytes (as a retrieval would have written them).
    with sqlite3.connect(db) as conn:
        account_id = conn.execute("SELECT id FROM accounts").fetchone()[0]
        conn.execute(
            "INSERT INTO messages (id, account_id, uidl, size, retrieved_at, to_json, cc_json,"
            " has_attachments) VALUES ('msg_1', ?, 'u1', 6, ?, '[]', '[]', 0)",
            (account_id, to_text(utcnow())),
        )
        conn.execute("INSERT INTO message_bodies VALUES ('msg_1', ?)", (b"\x00raw\xff\r\n",))
    conn.close()
    # The schema first, then the fault (a trigger that alters the bytes as they arrive).
    conn = await asyncpg.connect(pg_database)
    try:
        await migrate_postgres(conn)
        await conn.execute(
            "CREATE FUNCTION garble() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN NEW.raw := NEW.raw || '\\x00'::bytea; RETURN NEW; END $$;"
            " CREATE TRIGGER garble BEFORE INSERT ON message_bodies"
            " FOR EACH ROW EXECUTE FUNCTION garble()"
        )
    finally:
        await conn.close()
    result = await asyncio.to_thread(migrate_store, f"sqlite:///{db}", pg_database, secret)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "message_bodies: the bytes of row" in result.stderr, result.stderr
    assert "nothing was committed" in result.stderr
    assert set((await table_counts(pg_database)).values()) == {0}


async def test_a_key_that_cannot_decrypt_the_credentials_is_refused(
    tmp_path: Path, pg_database: str
) -> None:
    secret = secret_key()
    db = tmp_path / "mailroom.db"
    await make_sqlite_store(db, secret)
    wrong = await asyncio.to_thread(migrate_store, f"sqlite:///{db}", pg_database, secret_key())
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert "MAILROOM_SECRET_KEY cannot decrypt the stored credentials" in wrong.stderr, wrong.stderr
    assert set((await table_counts(pg_database)).values()) == {0}
    right = await asyncio.to_thread(migrate_store, f"sqlite:///{db}", pg_database, secret)
    assert right.returncode == 0, right.stdout + right.stderr


async def test_the_generated_key_file_beside_the_source_is_checked_and_named(
    tmp_path: Path, pg_database: str
) -> None:
    db = tmp_path / "mailroom.db"
    await make_sqlite_store(db, None)
    key_file = tmp_path / "mailroom.key"
    assert key_file.is_file()
    result = await asyncio.to_thread(migrate_store, f"sqlite:///{db}", pg_database)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"credentials: 4 decrypt with the key file {key_file}" in result.stdout, result.stdout
    assert f"set MAILROOM_SECRET_KEY on every replica to the content of {key_file}" in (
        result.stdout
    )
    assert key_file.read_text().strip() not in result.stdout + result.stderr


async def test_an_older_sqlite_store_is_brought_to_this_version_first(
    tmp_path: Path, pg_database: str
) -> None:
    """A store last served by an older Mailroom: migrated as a start would, then copied."""
    db = tmp_path / "mailroom.db"
    with sqlite3.connect(db, isolation_level=None) as conn:
        # As Mailroom's own connections: migration 13 names old threads with it.
        conn.create_function(SQLITE_FUNCTION, 1, thread_id_of, deterministic=True)
        for version, script in MIGRATIONS[:-1]:
            conn.executescript(script)
            conn.execute(f"PRAGMA user_version={version}")
    conn.close()
    older, latest = MIGRATIONS[-2][0], MIGRATIONS[-1][0]
    result = await asyncio.to_thread(migrate_store, f"sqlite:///{db}", pg_database)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"brought the SQLite schema from version {older} to {latest}" in result.stdout
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == latest
    conn.close()


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        ("sqlite:///{db}", "mysql://root@127.0.0.1/mailroom", "--to: 'mysql://"),
        ("sqlite:///{db}", "sqlite:///elsewhere.db", "is not a PostgreSQL store"),
        ("redis://127.0.0.1/0", "postgresql://postgres@127.0.0.1/x", "--from: 'redis://"),
        ("sqlite:///{missing}", "postgresql://postgres@127.0.0.1/x", "no SQLite store at"),
    ],
)
def test_unknown_schemes_and_a_missing_source_exit_2(
    tmp_path: Path, source: str, target: str, message: str
) -> None:
    db = tmp_path / "mailroom.db"
    db.write_bytes(b"")
    source = source.format(db=db, missing=tmp_path / "nothing.db")
    result = migrate_store(source, target)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "nothing.db").exists()


def test_a_password_in_the_target_url_is_never_printed(tmp_path: Path) -> None:
    result = migrate_store(
        f"sqlite:///{tmp_path / 'nothing.db'}", "postgresql://u:hunter2secret@127.0.0.1:1/x"
    )
    assert result.returncode == 2
    assert "hunter2secret" not in result.stdout + result.stderr
