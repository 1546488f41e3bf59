"""The stored delivery pause: a database from before it keeps its refused-credentials marks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from service.repository.accounts import SQLiteAccountRepository
from service.repository.database import Database
from service.repository.migrations import MIGRATIONS

FAILED_AT = "2024-05-06T07:08:09.000000Z"


def _database_at_version_3(path: Path) -> None:
    conn = sqlite3.connect(path)
    for version, script in MIGRATIONS:
        if version > 3:
            break
        conn.executescript(script)
    conn.execute("PRAGMA user_version=3")
    for account_id, failed_at in (("acc_refused", FAILED_AT), ("acc_fine", None)):
        conn.execute(
            "INSERT INTO accounts (id, tenant, name, email, in_host, in_port, in_security,"
            " in_username, in_password, out_host, out_port, out_security,"
            " smtp_auth_failed_at, created_at, updated_at)"
            " VALUES (?, 'default', 'A', 'a@example.com', 'pop.example.com', 995, 'tls', 'a',"
            " 'sealed', 'smtp.example.com', 587, 'starttls', ?, ?, ?)",
            (account_id, failed_at, FAILED_AT, FAILED_AT),
        )
    conn.commit()
    conn.close()


async def test_an_auth_failure_stored_before_the_pause_existed_becomes_a_pause(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mailroom.db"
    _database_at_version_3(path)
    db = Database(str(path))
    await db.open()
    try:
        accounts = SQLiteAccountRepository(db)
        refused = await accounts.get_any("acc_refused")
        fine = await accounts.get_any("acc_fine")
    finally:
        await db.close()
    assert refused is not None and refused.smtp_pause is not None
    assert refused.smtp_pause.code == "auth_failed"
    assert refused.smtp_pause.since.isoformat().startswith("2024-05-06T07:08:09")
    assert fine is not None and fine.smtp_pause is None
