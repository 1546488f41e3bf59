"""Account storage: the ``AccountRepository`` protocol and its SQLite implementation."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Protocol

from service.domain.accounts import (
    Account,
    IncomingServer,
    OutgoingServer,
    RetrievalPolicy,
    SMTPPause,
)
from service.domain.enums import OutgoingStatus, Security
from service.domain.time import from_text, to_text, utcnow
from service.repository.database import Database
from service.repository.events import emit_account_pauses, smtp_pauses
from service.repository.pages import Page, page_of

_COLUMNS = (
    "id, tenant, name, email, display_name, in_host, in_port, in_security, in_username,"
    " in_password, out_host, out_port, out_security, out_username, out_password,"
    " out_allow_insecure_auth, leave_on_server, delete_after_days, max_message_bytes,"
    " poll_interval_minutes, smtp_pause_code, smtp_pause_detail, smtp_paused_at, created_at,"
    " updated_at, login_delay_s, in_auth, out_auth, in_token_expires_at, out_token_expires_at"
)
_COLUMN_COUNT = _COLUMNS.count(",") + 1
_PAUSE_COLUMNS = ("smtp_pause_code", "smtp_pause_detail", "smtp_paused_at")
_WAITING = (OutgoingStatus.QUEUED.value, OutgoingStatus.DEFERRED.value)


class AccountRepository(Protocol):
    async def add(self, account: Account) -> None: ...
    async def get(self, tenant: str, account_id: str) -> Account | None: ...
    async def get_any(self, account_id: str) -> Account | None: ...
    async def page(self, tenant: str, *, after: str | None, limit: int) -> Page[Account]: ...
    async def list_polled(self) -> list[Account]: ...
    async def replace(
        self, account: Account, *, outgoing_changed: bool = False, at: datetime | None = None
    ) -> None: ...
    async def delete(self, tenant: str, account_id: str) -> bool: ...
    async def pause_smtp(
        self, account_id: str, pause: SMTPPause, *, settings_of: datetime
    ) -> bool: ...
    async def clear_smtp_pauses(self, codes: Collection[str]) -> int: ...
    async def set_login_delay(self, account_id: str, seconds: int | None) -> None: ...
    async def store_grant(
        self, account_id: str, side: str, sealed: str, expires_at: datetime | None, *, was: str
    ) -> bool: ...
    async def unscheduled(self, limit: int) -> list[Account]: ...
    async def schedule_polls(
        self, polls: Sequence[tuple[str, datetime]], *, unscheduled_only: bool = False
    ) -> None: ...
    async def claim_due_polls(
        self, now: datetime, lease_until: datetime, limit: int, *, skip_tenants: Collection[str]
    ) -> list[tuple[Account, datetime]]: ...
    async def next_poll_due(self) -> datetime | None: ...
    async def next_poll_at(self, account_id: str) -> datetime | None: ...


class SQLiteAccountRepository:
    """Accounts in the ``accounts`` table; deleting one cascades to its mail."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(self, account: Account) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                f"INSERT INTO accounts ({_COLUMNS}) VALUES ({', '.join('?' * _COLUMN_COUNT)})",
                _params(account),
            )

    async def get(self, tenant: str, account_id: str) -> Account | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM accounts WHERE id = ? AND tenant = ?", (account_id, tenant)
        )
        return None if row is None else _account(row)

    async def get_any(self, account_id: str) -> Account | None:
        """An account whatever its tenant: for background work, never for callers."""
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM accounts WHERE id = ?", (account_id,)
        )
        return None if row is None else _account(row)

    async def page(self, tenant: str, *, after: str | None, limit: int) -> Page[Account]:
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM accounts WHERE tenant = ? AND id > ? ORDER BY id LIMIT ?",
            (tenant, after or "", limit + 1),
        )
        return page_of([_account(row) for row in rows], limit, key=lambda a: a.id)

    async def list_polled(self) -> list[Account]:
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM accounts WHERE poll_interval_minutes IS NOT NULL"
        )
        return [_account(row) for row in rows]

    async def replace(
        self, account: Account, *, outgoing_changed: bool = False, at: datetime | None = None
    ) -> None:
        """Store ``account``. ``outgoing_changed``: new SMTP settings deserve a try at once,
        so the account's waiting messages (in backoff, or held by a pause) fall due ``at``,
        in the same transaction."""
        # The pause is delivery's to set and only new outgoing settings clear it: a PATCH of
        # anything else, read before a pause was stored, must not undo it.
        names = [name.strip() for name in _COLUMNS.split(",")]
        values = dict(zip(names, _params(account), strict=True))
        kept = [n for n in names[2:] if n not in _PAUSE_COLUMNS]
        assignments = [f"{n} = ?" for n in kept]
        # A new poll interval (or none) drops the schedule: the scheduler sets it anew.
        assignments.append(
            "next_poll_at = CASE WHEN poll_interval_minutes IS ? THEN next_poll_at END"
        )
        if outgoing_changed:
            assignments += [f"{n} = NULL" for n in _PAUSE_COLUMNS]
        async with self._db.transaction() as conn:
            ended = (
                await smtp_pauses(conn, "id = ? AND tenant = ?", (account.id, account.tenant))
                if outgoing_changed
                else []
            )
            await emit_account_pauses(conn, ended, resumed=True, at=at or account.updated_at)
            await conn.execute(
                f"UPDATE accounts SET {', '.join(assignments)} WHERE id = ? AND tenant = ?",
                (
                    *(values[n] for n in kept),
                    account.retrieval.poll_interval_minutes,
                    account.id,
                    account.tenant,
                ),
            )
            if outgoing_changed:
                now = to_text(at or account.updated_at)
                await conn.execute(
                    "UPDATE outbox SET next_attempt_at = ?"
                    " WHERE account_id = ? AND status IN (?, ?) AND next_attempt_at > ?",
                    (now, account.id, *_WAITING, now),
                )

    async def delete(self, tenant: str, account_id: str) -> bool:
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "DELETE FROM accounts WHERE id = ? AND tenant = ?", (account_id, tenant)
            )
            return cursor.rowcount > 0

    async def pause_smtp(self, account_id: str, pause: SMTPPause, *, settings_of: datetime) -> bool:
        """Stop delivery for the account until its outgoing settings change.

        Only if the account still has the settings the failure was found with
        (``settings_of``, its ``updated_at`` then): a PATCH that came meanwhile wins.
        Returns whether the pause was stored.
        """
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE accounts SET smtp_pause_code = ?, smtp_pause_detail = ?,"
                " smtp_paused_at = ? WHERE id = ? AND updated_at = ?",
                (pause.code, pause.detail, to_text(pause.since), account_id, to_text(settings_of)),
            )
            if cursor.rowcount > 0:
                paused = await smtp_pauses(conn, "id = ?", (account_id,))
                await emit_account_pauses(conn, paused, resumed=False, at=pause.since)
            return cursor.rowcount > 0

    async def clear_smtp_pauses(self, codes: Collection[str]) -> int:
        """End the pauses with these codes (causes that a restart may have fixed)."""
        if not codes:
            return 0
        marks = ", ".join("?" * len(codes))
        async with self._db.transaction() as conn:
            ended = await smtp_pauses(conn, f"smtp_pause_code IN ({marks})", tuple(codes))
            await emit_account_pauses(conn, ended, resumed=True, at=utcnow())
            cursor = await conn.execute(
                "UPDATE accounts SET smtp_pause_code = NULL, smtp_pause_detail = NULL,"
                f" smtp_paused_at = NULL WHERE smtp_pause_code IN ({marks})",
                tuple(codes),
            )
            return cursor.rowcount

    async def set_login_delay(self, account_id: str, seconds: int | None) -> None:
        """The server's LOGIN-DELAY (RFC 2449): the least time between two logins."""
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE accounts SET login_delay_s = ? WHERE id = ?", (seconds, account_id)
            )

    async def store_grant(
        self, account_id: str, side: str, sealed: str, expires_at: datetime | None, *, was: str
    ) -> bool:
        """Store a refreshed OAuth2 grant (``side``: "in" or "out") if the stored one is
        still ``was`` (another refresh or a PATCH did not come first). Leaves
        ``updated_at`` alone: the settings are the same, only their tokens moved on."""
        if side not in ("in", "out"):
            raise ValueError(side)
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                f"UPDATE accounts SET {side}_password = ?, {side}_token_expires_at = ?"
                f" WHERE id = ? AND {side}_password = ?",
                (sealed, None if expires_at is None else to_text(expires_at), account_id, was),
            )
            return cursor.rowcount > 0

    # The poll schedule (``next_poll_at``, migration 7) ------------------------------------

    async def unscheduled(self, limit: int) -> list[Account]:
        """Polled accounts with no next poll yet (new, or their interval changed)."""
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM accounts"
            " WHERE next_poll_at IS NULL AND poll_interval_minutes IS NOT NULL LIMIT ?",
            (limit,),
        )
        return [_account(row) for row in rows]

    async def schedule_polls(
        self, polls: Sequence[tuple[str, datetime]], *, unscheduled_only: bool = False
    ) -> None:
        """Set when each account's next poll is due (only polled accounts; with
        ``unscheduled_only`` only those that have none yet)."""
        if not polls:
            return
        only = " AND next_poll_at IS NULL" if unscheduled_only else ""
        async with self._db.transaction() as conn:
            await conn.executemany(
                "UPDATE accounts SET next_poll_at = ?"
                f" WHERE id = ? AND poll_interval_minutes IS NOT NULL{only}",
                [(to_text(at), account_id) for account_id, at in polls],
            )

    async def claim_due_polls(
        self, now: datetime, lease_until: datetime, limit: int, *, skip_tenants: Collection[str]
    ) -> list[tuple[Account, datetime]]:
        """Take up to ``limit`` accounts whose poll is due, most overdue first, each with
        its due time; their next poll moves to ``lease_until`` (the poll's end sets it)."""
        skipped = json.dumps(sorted(skip_tenants))

        def claim(raw: sqlite3.Connection) -> list[sqlite3.Row]:
            rows = raw.execute(
                f"SELECT {_COLUMNS}, next_poll_at FROM accounts WHERE next_poll_at <= ?"
                " AND tenant NOT IN (SELECT value FROM json_each(?))"
                " ORDER BY next_poll_at LIMIT ?",
                (to_text(now), skipped, limit),
            ).fetchall()
            raw.executemany(
                "UPDATE accounts SET next_poll_at = ? WHERE id = ?",
                [(to_text(lease_until), row["id"]) for row in rows],
            )
            return rows

        rows = await self._db.write(claim)  # one round trip: the scheduler claims often
        return [(_account(row), from_text(row["next_poll_at"])) for row in rows]

    async def next_poll_due(self) -> datetime | None:
        """When the earliest scheduled poll is due (None: none is scheduled)."""
        row = await self._db.fetch_one(
            "SELECT min(next_poll_at) FROM accounts WHERE next_poll_at IS NOT NULL"
        )
        return None if row is None or row[0] is None else from_text(row[0])

    async def next_poll_at(self, account_id: str) -> datetime | None:
        """When the account's next scheduled poll is due."""
        row = await self._db.fetch_one(
            "SELECT next_poll_at FROM accounts WHERE id = ?", (account_id,)
        )
        return None if row is None or row[0] is None else from_text(row[0])


def _params(a: Account) -> tuple[object, ...]:
    i, o, r, p = a.incoming, a.outgoing, a.retrieval, a.smtp_pause
    return (
        a.id, a.tenant, a.name, a.email, a.display_name,
        i.host, i.port, i.security.value, i.username, i.password_encrypted,
        o.host, o.port, o.security.value, o.username, o.password_encrypted,
        int(o.allow_insecure_auth),
        int(r.leave_on_server), r.delete_after_days, r.max_message_bytes,
        r.poll_interval_minutes,
        p.code if p else None, p.detail if p else None, to_text(p.since) if p else None,
        to_text(a.created_at), to_text(a.updated_at), a.login_delay_s,
        i.auth, o.auth,
        None if i.token_expires_at is None else to_text(i.token_expires_at),
        None if o.token_expires_at is None else to_text(o.token_expires_at),
    )  # fmt: skip


def _account(row: sqlite3.Row) -> Account:
    return Account(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        email=row["email"],
        display_name=row["display_name"],
        incoming=IncomingServer(
            host=row["in_host"],
            port=row["in_port"],
            security=Security(row["in_security"]),
            username=row["in_username"],
            password_encrypted=row["in_password"],
            auth=row["in_auth"],
            token_expires_at=_maybe_time(row["in_token_expires_at"]),
        ),
        outgoing=OutgoingServer(
            host=row["out_host"],
            port=row["out_port"],
            security=Security(row["out_security"]),
            username=row["out_username"],
            password_encrypted=row["out_password"],
            allow_insecure_auth=bool(row["out_allow_insecure_auth"]),
            auth=row["out_auth"],
            token_expires_at=_maybe_time(row["out_token_expires_at"]),
        ),
        retrieval=RetrievalPolicy(
            leave_on_server=bool(row["leave_on_server"]),
            delete_after_days=row["delete_after_days"],
            max_message_bytes=row["max_message_bytes"],
            poll_interval_minutes=row["poll_interval_minutes"],
        ),
        smtp_pause=(
            None
            if row["smtp_pause_code"] is None
            else SMTPPause(
                code=row["smtp_pause_code"],
                detail=row["smtp_pause_detail"] or "",
                since=from_text(row["smtp_paused_at"]),
            )
        ),
        created_at=from_text(row["created_at"]),
        updated_at=from_text(row["updated_at"]),
        login_delay_s=row["login_delay_s"],
    )


def _maybe_time(value: str | None) -> datetime | None:
    return None if value is None else from_text(value)
