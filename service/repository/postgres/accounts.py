"""Accounts on PostgreSQL: the ``accounts`` table; deleting one cascades to its mail."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

from service.domain.accounts import (
    Account,
    IncomingServer,
    OutgoingServer,
    RetrievalPolicy,
    SMTPPause,
)
from service.domain.enums import OutgoingStatus, Security
from service.domain.time import utcnow
from service.repository.pages import Page, page_of
from service.repository.postgres.database import PgDatabase, Record, rowcount
from service.repository.postgres.events import emit_account_pauses, smtp_pauses

_NAMES = (
    "id", "tenant", "name", "email", "display_name", "in_host", "in_port", "in_security",
    "in_username", "in_password", "out_host", "out_port", "out_security", "out_username",
    "out_password", "out_allow_insecure_auth", "leave_on_server", "delete_after_days",
    "max_message_bytes", "poll_interval_minutes", "smtp_pause_code", "smtp_pause_detail",
    "smtp_paused_at", "created_at", "updated_at", "login_delay_s", "in_auth", "out_auth",
    "in_token_expires_at", "out_token_expires_at",
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
        # A new poll interval (or none) drops the schedule: the scheduler sets it anew.
        assignments.append(
            f"next_poll_at = CASE WHEN poll_interval_minutes IS NOT DISTINCT FROM"
            f" ${len(kept) + 1}::integer THEN next_poll_at END"
        )
        if outgoing_changed:
            assignments += [f"{n} = NULL" for n in _PAUSE_COLUMNS]
        where = len(kept) + 2
        async with self._db.transaction() as conn:
            ended = (
                await smtp_pauses(conn, "id = $1 AND tenant = $2", account.id, account.tenant)
                if outgoing_changed
                else []
            )
            await emit_account_pauses(conn, ended, resumed=True, at=at or account.updated_at)
            await conn.execute(
                f"UPDATE accounts SET {', '.join(assignments)}"
                f" WHERE id = ${where} AND tenant = ${where + 1}",
                *(values[n] for n in kept),
                account.retrieval.poll_interval_minutes,
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
            if rowcount(status) > 0:
                paused = await smtp_pauses(conn, "id = $1", account_id)
                await emit_account_pauses(conn, paused, resumed=False, at=pause.since)
            return rowcount(status) > 0

    async def clear_smtp_pauses(self, codes: Collection[str]) -> int:
        """End the pauses with these codes (causes that a restart may have fixed)."""
        if not codes:
            return 0
        async with self._db.transaction() as conn:
            ended = await smtp_pauses(conn, "smtp_pause_code = ANY($1::text[])", list(codes))
            await emit_account_pauses(conn, ended, resumed=True, at=utcnow())
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

    # The poll schedule (``next_poll_at``, migration 7) ------------------------------------

    async def store_grant(
        self, account_id: str, side: str, sealed: str, expires_at: datetime | None, *, was: str
    ) -> bool:
        """Store a refreshed OAuth2 grant if the stored one is still ``was``."""
        if side not in ("in", "out"):
            raise ValueError(side)
        async with self._db.transaction() as conn:
            status = await conn.execute(
                f"UPDATE accounts SET {side}_password = $1, {side}_token_expires_at = $2"
                f" WHERE id = $3 AND {side}_password = $4",
                sealed,
                expires_at,
                account_id,
                was,
            )
            return rowcount(status) > 0

    async def unscheduled(self, limit: int) -> list[Account]:
        """Polled accounts with no next poll yet (new, or their interval changed)."""
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM accounts"
            " WHERE next_poll_at IS NULL AND poll_interval_minutes IS NOT NULL LIMIT $1",
            limit,
        )
        return [_account(row) for row in rows]

    async def schedule_polls(
        self, polls: Sequence[tuple[str, datetime]], *, unscheduled_only: bool = False
    ) -> None:
        """Set when each account's next poll is due (only polled accounts; with
        ``unscheduled_only`` only those that have none yet, so two replicas scheduling
        the same new account agree on the first)."""
        if not polls:
            return
        only = " AND a.next_poll_at IS NULL" if unscheduled_only else ""
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE accounts a SET next_poll_at = p.at"
                " FROM unnest($1::text[], $2::timestamptz[]) AS p (id, at)"
                f" WHERE a.id = p.id AND a.poll_interval_minutes IS NOT NULL{only}",
                [account_id for account_id, _ in polls],
                [at for _, at in polls],
            )

    async def claim_due_polls(
        self, now: datetime, lease_until: datetime, limit: int, *, skip_tenants: Collection[str]
    ) -> list[tuple[Account, datetime]]:
        """Take up to ``limit`` accounts whose poll is due, most overdue first, each with
        its due time; their next poll moves to ``lease_until`` (the poll's end sets it).
        ``SKIP LOCKED``: replicas claiming at once never take the same account, so a due
        poll starts once among them."""
        columns = ", ".join(f"a.{n}" for n in _NAMES)
        rows = await self._db.fetch_all(
            f"UPDATE accounts a SET next_poll_at = $2 FROM ("
            " SELECT id, next_poll_at AS due FROM accounts"
            " WHERE next_poll_at <= $1 AND NOT (tenant = ANY($4::text[]))"
            " ORDER BY next_poll_at LIMIT $3 FOR UPDATE SKIP LOCKED) d"
            f" WHERE a.id = d.id RETURNING {columns}, d.due",
            now,
            lease_until,
            limit,
            sorted(skip_tenants),
        )
        claimed = [(_account(row), row["due"]) for row in rows]
        return sorted(claimed, key=lambda c: c[1])

    async def next_poll_due(self) -> datetime | None:
        """When the earliest scheduled poll is due (None: none is scheduled)."""
        due: datetime | None = await self._db.fetch_value(
            "SELECT min(next_poll_at) FROM accounts WHERE next_poll_at IS NOT NULL"
        )
        return due

    async def next_poll_at(self, account_id: str) -> datetime | None:
        """When the account's next scheduled poll is due."""
        at: datetime | None = await self._db.fetch_value(
            "SELECT next_poll_at FROM accounts WHERE id = $1", account_id
        )
        return at


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
        i.auth, o.auth, i.token_expires_at, o.token_expires_at,
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
            auth=row["in_auth"],
            token_expires_at=row["in_token_expires_at"],
        ),
        outgoing=OutgoingServer(
            host=row["out_host"],
            port=row["out_port"],
            security=Security(row["out_security"]),
            username=row["out_username"],
            password_encrypted=row["out_password"],
            allow_insecure_auth=row["out_allow_insecure_auth"],
            auth=row["out_auth"],
            token_expires_at=row["out_token_expires_at"],
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
