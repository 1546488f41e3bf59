"""Accounts on PostgreSQL: the ``accounts`` table; deleting one cascades to its mail."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from service.domain.accounts import (
    Account,
    IncomingServer,
    OutgoingServer,
    RetrievalPolicy,
    SMTPPause,
)
from service.domain.enums import OutgoingStatus, Security
from service.repository.pages import Page, page_of
from service.repository.postgres.database import PgDatabase, Record, rowcount

_NAMES = (
    "id", "tenant", "name", "email", "display_name", "in_host", "in_port", "in_security",
    "in_username", "in_password", "out_host", "out_port", "out_security", "out_username",
    "out_password", "out_allow_insecure_auth", "leave_on_server", "delete_after_days",
    "max_message_bytes", "poll_interval_minutes", "smtp_pause_code", "smtp_pause_detail",
    "smtp_paused_at", "created_at", "updated_at", "login_delay_s",
)  # fmt: skip
_COLUMNS = ", ".join(_NAMES)
_PAUSE_COLUMNS = ("smtp_pause_code", "smtp_pause_detail", "smtp_paused_at")
_WAITING = [OutgoingStatus.QUEUED.value, OutgoingStatus.DEFERRED.value]


class PgAccountRepository:
    """Accounts in the ``accounts`` table; deleting one cascades to its mail."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def add(self, account: Account) -> None:
        marks = ", ".join(f"${n}" for n in range(1, len(_NAMES) + 1))
        async with self._db.transaction() as conn:
            await conn.execute(
                f"INSERT INTO accounts ({_COLUMNS}) VALUES ({marks})", *_params(account)
            )

    async def get(self, tenant: str, account_id: str) -> Account | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM accounts WHERE id = $1 AND tenant = $2", account_id, tenant
        )
        return None if row is None else _account(row)

    async def get_any(self, account_id: str) -> Account | None:
        """An account whatever its tenant: for background work, never for callers."""
        row = await self._db.fetch_one(f"SELECT {_COLUMNS} FROM accounts WHERE id = $1", account_id)
        return None if row is None else _account(row)

    async def page(self, tenant: str, *, after: str | None, limit: int) -> Page[Account]:
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM accounts WHERE tenant = $1 AND id > $2 ORDER BY id LIMIT $3",
            tenant,
            after or "",
            limit + 1,
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
        """Store ``account``; with ``outgoing_changed`` its pause ends and its waiting
        messages fall due ``at``, in the same transaction (as on SQLite)."""
        values = dict(zip(_NAMES, _params(account), strict=True))
        kept = [n for n in _NAMES[2:] if n not in _PAUSE_COLUMNS]
        assignments = [f"{n} = ${i}" for i, n in enumerate(kept, start=1)]
        if outgoing_changed:
            assignments += [f"{n} = NULL" for n in _PAUSE_COLUMNS]
        where = len(kept) + 1
        async with self._db.transaction() as conn:
            await conn.execute(
                f"UPDATE accounts SET {', '.join(assignments)}"
                f" WHERE id = ${where} AND tenant = ${where + 1}",
                *(values[n] for n in kept),
                account.id,
                account.tenant,
            )
            if outgoing_changed:
                now = at or account.updated_at
                await conn.execute(
                    "UPDATE outbox SET next_attempt_at = $1"
                    " WHERE account_id = $2 AND status = ANY($3::text[]) AND next_attempt_at > $1",
                    now,
                    account.id,
                    _WAITING,
                )

    async def delete(self, tenant: str, account_id: str) -> bool:
        async with self._db.transaction() as conn:
            status = await conn.execute(
                "DELETE FROM accounts WHERE id = $1 AND tenant = $2", account_id, tenant
            )
            return rowcount(status) > 0

    async def pause_smtp(self, account_id: str, pause: SMTPPause, *, settings_of: datetime) -> bool:
        """Stop delivery for the account until its outgoing settings change, if it still
        has the settings the failure was found with; whether the pause was stored."""
        async with self._db.transaction() as conn:
            status = await conn.execute(
                "UPDATE accounts SET smtp_pause_code = $1, smtp_pause_detail = $2,"
                " smtp_paused_at = $3 WHERE id = $4 AND updated_at = $5",
                pause.code,
                pause.detail,
                pause.since,
                account_id,
                settings_of,
            )
            return rowcount(status) > 0

    async def clear_smtp_pauses(self, codes: Collection[str]) -> int:
        """End the pauses with these codes (causes that a restart may have fixed)."""
        if not codes:
            return 0
        async with self._db.transaction() as conn:
            status = await conn.execute(
                "UPDATE accounts SET smtp_pause_code = NULL, smtp_pause_detail = NULL,"
                " smtp_paused_at = NULL WHERE smtp_pause_code = ANY($1::text[])",
                list(codes),
            )
            return rowcount(status)

    async def set_login_delay(self, account_id: str, seconds: int | None) -> None:
        """The server's LOGIN-DELAY (RFC 2449): the least time between two logins."""
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE accounts SET login_delay_s = $1 WHERE id = $2", seconds, account_id
            )


def _params(a: Account) -> tuple[object, ...]:
    i, o, r, p = a.incoming, a.outgoing, a.retrieval, a.smtp_pause
    return (
        a.id, a.tenant, a.name, a.email, a.display_name,
        i.host, i.port, i.security.value, i.username, i.password_encrypted,
        o.host, o.port, o.security.value, o.username, o.password_encrypted,
        o.allow_insecure_auth,
        r.leave_on_server, r.delete_after_days, r.max_message_bytes, r.poll_interval_minutes,
        p.code if p else None, p.detail if p else None, p.since if p else None,
        a.created_at, a.updated_at, a.login_delay_s,
    )  # fmt: skip


def _account(row: Record) -> Account:
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
        ),
        outgoing=OutgoingServer(
            host=row["out_host"],
            port=row["out_port"],
            security=Security(row["out_security"]),
            username=row["out_username"],
            password_encrypted=row["out_password"],
            allow_insecure_auth=row["out_allow_insecure_auth"],
        ),
        retrieval=RetrievalPolicy(
            leave_on_server=row["leave_on_server"],
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
                since=row["smtp_paused_at"],
            )
        ),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        login_delay_s=row["login_delay_s"],
    )
