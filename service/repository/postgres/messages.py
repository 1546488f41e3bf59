"""The message store on PostgreSQL: summaries, raw bytes (``bytea``), known server UIDLs.

A downloaded message, its raw bytes and its UIDL's ``stored`` state are written in one
transaction (``store_batch``); every PostgreSQL commit is durable, so once it returns the
retrieval may DELE the message on the server.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from datetime import datetime

import msgspec

from service.domain.enums import ServerMessageState
from service.domain.retrievals import MessageFilter, MessageSummary, NewMessage, RetrievalProgress
from service.repository.messages import (
    SCAN_WINDOW,
    SCAN_WINDOW_PER_ROW,
    TRIGRAM,
    FilterColumn,
    KnownUidl,
    UidlComparison,
    substring_filters,
)
from service.repository.pages import Page, page_of
from service.repository.postgres.database import PgDatabase, Record, rowcount
from service.repository.postgres.retrievals import update_progress

_COLUMNS = (
    "id, account_id, uidl, size, retrieved_at, message_id, from_addr, to_json, cc_json,"
    " subject, date, has_attachments"
)
_M_COLUMNS = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))
_LIST_DECODER = msgspec.json.Decoder(list[str])
_LIKE_SPECIAL = re.compile(r"[\\%_]")


def _fold(sql: str) -> str:
    """ASCII-only lower case, as SQLite's ``lower()``: the same matches on both stores."""
    return f"translate({sql}, '{string.ascii_uppercase}', '{string.ascii_lowercase}')"


class PgMessageRepository:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def known(self, account_id: str) -> dict[str, KnownUidl]:
        """Every UIDL the store knows for the account (loads them all: inspection only;
        a retrieval uses :meth:`compare_uidls`)."""
        rows = await self._db.fetch_all(
            "SELECT uidl, state, seen_at FROM server_messages WHERE account_id = $1", account_id
        )
        return {
            row["uidl"]: KnownUidl(ServerMessageState(row["state"]), row["seen_at"]) for row in rows
        }

    async def forget(self, account_id: str, uidls: Iterable[str]) -> None:
        """Drop UIDLs that are gone from the server (the stored messages stay)."""
        gone = list(uidls)
        if not gone:
            return
        async with self._db.transaction() as conn:
            await conn.execute(
                "DELETE FROM server_messages WHERE account_id = $1 AND uidl = ANY($2)",
                account_id,
                gone,
            )

    async def compare_uidls(
        self,
        account_id: str,
        listed: Sequence[str],
        *,
        delete_stored: bool = False,
        delete_seen_until: datetime | None = None,
    ) -> UidlComparison:
        """Compare the server's UIDL list with the known ones, in SQL: forget known UIDLs
        the server no longer lists, and return only the new ones and the deletable ones.

        Deletable: stored (not skipped) and either ``delete_stored`` or seen at or before
        ``delete_seen_until``. The known UIDLs never come into Python.
        """
        server = list(listed)
        async with self._db.transaction() as conn:
            # NOT EXISTS over unnest: a hash anti-join (``<> ALL`` would be quadratic).
            await conn.execute(
                "DELETE FROM server_messages s WHERE s.account_id = $1 AND NOT EXISTS"
                " (SELECT 1 FROM unnest($2::text[]) AS l(uidl) WHERE l.uidl = s.uidl)",
                account_id,
                server,
            )
            rows = await conn.fetch(
                "SELECT l.uidl, s.uidl IS NULL AS is_new FROM unnest($2::text[]) AS l(uidl)"
                " LEFT JOIN server_messages s ON s.account_id = $1 AND s.uidl = l.uidl"
                " WHERE s.uidl IS NULL"
                " OR (s.state = $3 AND ($4 OR s.seen_at <= $5))",
                account_id,
                server,
                ServerMessageState.STORED.value,
                delete_stored,
                delete_seen_until,
            )
        new = frozenset(str(row["uidl"]) for row in rows if row["is_new"])
        deletable = frozenset(str(row["uidl"]) for row in rows if not row["is_new"])
        return UidlComparison(new=new, deletable=deletable)

    async def store_batch(
        self,
        account_id: str,
        messages: list[NewMessage],
        retrieval_id: str,
        progress: RetrievalProgress,
    ) -> None:
        """Commit messages with their UIDLs and the retrieval's progress, durably."""
        async with self._db.transaction() as conn:
            # A UIDL stored twice breaks the unique rule and rolls back the whole batch
            # (DuplicateError): the retrieval then fails and deletes nothing.
            await conn.executemany(
                f"INSERT INTO messages ({_COLUMNS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                [_params(m.summary) for m in messages],
            )
            await conn.executemany(
                "INSERT INTO message_bodies (message_id, raw) VALUES ($1, $2)",
                [(m.summary.id, m.raw) for m in messages],
            )
            await conn.executemany(
                "INSERT INTO server_messages (account_id, uidl, state, size, seen_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id, uidl) DO UPDATE"
                " SET state = excluded.state, size = excluded.size, seen_at = excluded.seen_at",
                [
                    (
                        account_id,
                        m.summary.uidl,
                        ServerMessageState.STORED.value,
                        m.summary.size,
                        m.summary.retrieved_at,
                    )
                    for m in messages
                ],
            )
            await update_progress(conn, retrieval_id, progress)

    async def record_skipped(
        self, account_id: str, skipped: list[tuple[str, int]], at: datetime
    ) -> None:
        if not skipped:
            return
        async with self._db.transaction() as conn:
            await conn.executemany(
                "INSERT INTO server_messages (account_id, uidl, state, size, seen_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id, uidl) DO NOTHING",
                [
                    (account_id, uidl, ServerMessageState.SKIPPED.value, size, at)
                    for uidl, size in skipped
                ],
            )

    async def page(
        self, account_id: str, flt: MessageFilter, *, after: str | None, limit: int
    ) -> Page[MessageSummary]:
        """Newest first, filtered (substring filters ignore ASCII case, as on SQLite).

        Two exact plans, cheapest first: scan the newest ``SCAN_WINDOW`` rows, else let the
        trigram (or ``retrieved_at``) index find the few rows that match.
        """
        # Written with ``?`` and numbered per statement: each statement binds only what it uses.
        where = ["m.account_id = ?", "m.id < ?"]
        params: list[object] = [account_id, after or "~"]
        if flt.since is not None:
            where.append("m.retrieved_at >= ?")
            params.append(flt.since)
        narrow: list[str] = []  # what the trigram indexes answer: a superset of the matches
        narrow_params: list[object] = []
        for column, needle in substring_filters(flt):
            contains = {
                FilterColumn.SUBJECT: f"strpos({_fold('m.subject')}, {_fold('?')}) > 0",
                FilterColumn.FROM: f"strpos({_fold('m.from_addr')}, {_fold('?')}) > 0",
                FilterColumn.TO: "EXISTS (SELECT 1 FROM json_array_elements_text(m.to_json::json)"
                f" t(v) WHERE strpos({_fold('t.v')}, {_fold('?')}) > 0)",
            }
            like = {c: f"lower({c.value}) LIKE lower(?)" for c in contains}
            pattern = "%" + _LIKE_SPECIAL.sub(r"\\\g<0>", needle) + "%"
            columns = list(contains) if column is FilterColumn.TEXT else [column]
            where.append("(" + " OR ".join(contains[c] for c in columns) + ")")
            params.extend([needle] * len(columns))
            if len(needle) >= TRIGRAM:
                narrow.append("(" + " OR ".join(like[c] for c in columns) + ")")
                narrow_params.extend([pattern] * len(columns))
        if flt.has_attachments is not None:
            where.append("m.has_attachments = ?")
            params.append(flt.has_attachments)
        condition = " AND ".join(where)
        if not narrow and flt.since is None:
            rows = await self._fetch(
                f"SELECT {_M_COLUMNS} FROM messages m WHERE {condition} ORDER BY m.id DESC LIMIT ?",
                [*params, limit + 1],
            )
            return page_of([_summary(row) for row in rows], limit, key=lambda m: m.id)
        window = max(SCAN_WINDOW, (limit + 1) * SCAN_WINDOW_PER_ROW)
        rows = await self._fetch(
            f"SELECT {_M_COLUMNS} FROM (SELECT * FROM messages WHERE account_id = ? AND id < ?"
            f" ORDER BY id DESC LIMIT ?) m WHERE {condition} ORDER BY m.id DESC LIMIT ?",
            [account_id, after or "~", window, *params, limit + 1],
        )
        if len(rows) <= limit:
            if narrow:
                candidates = f"SELECT id FROM messages WHERE {' AND '.join(narrow)}"
            else:
                candidates = "SELECT id FROM messages WHERE account_id = ? AND retrieved_at >= ?"
                narrow_params = [account_id, flt.since]
            # Materialized: the planner must not fold the index's candidates back into a
            # newest-first scan of the whole account.
            rows = await self._fetch(
                f"WITH c AS MATERIALIZED ({candidates}) SELECT {_M_COLUMNS} FROM c"
                f" JOIN messages m ON m.id = c.id WHERE {condition}"
                " ORDER BY m.id DESC LIMIT ?",
                [*narrow_params, *params, limit + 1],
            )
        return page_of([_summary(row) for row in rows], limit, key=lambda m: m.id)

    async def _fetch(self, sql: str, params: list[object]) -> list[Record]:
        parts = sql.split("?")
        numbered = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
        return await self._db.fetch_all(numbered, *params)

    async def get(self, account_id: str, message_id: str) -> MessageSummary | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM messages WHERE id = $1 AND account_id = $2",
            message_id,
            account_id,
        )
        return None if row is None else _summary(row)

    async def raw(self, account_id: str, message_id: str) -> bytes | None:
        row = await self._db.fetch_one(
            "SELECT b.raw FROM message_bodies b JOIN messages m ON m.id = b.message_id"
            " WHERE m.id = $1 AND m.account_id = $2",
            message_id,
            account_id,
        )
        return None if row is None else bytes(row[0])

    async def delete(self, account_id: str, message_id: str) -> bool:
        """Local delete; the UIDL stays known so the message is not downloaded again."""
        async with self._db.transaction() as conn:
            status = await conn.execute(
                "DELETE FROM messages WHERE id = $1 AND account_id = $2", message_id, account_id
            )
            return rowcount(status) > 0

    async def count(self, account_id: str) -> int:
        return int(
            await self._db.fetch_value(
                "SELECT count(*) FROM messages WHERE account_id = $1", account_id
            )
        )


def _params(m: MessageSummary) -> tuple[object, ...]:
    return (
        m.id,
        m.account_id,
        m.uidl,
        m.size,
        m.retrieved_at,
        m.message_id,
        m.from_,
        msgspec.json.encode(m.to).decode(),
        msgspec.json.encode(m.cc).decode(),
        m.subject,
        m.date,
        m.has_attachments,
    )


def _summary(row: Record) -> MessageSummary:
    return MessageSummary(
        id=row["id"],
        account_id=row["account_id"],
        uidl=row["uidl"],
        size=row["size"],
        retrieved_at=row["retrieved_at"],
        message_id=row["message_id"],
        from_=row["from_addr"],
        to=_LIST_DECODER.decode(row["to_json"]),
        cc=_LIST_DECODER.decode(row["cc_json"]),
        subject=row["subject"],
        date=row["date"],
        has_attachments=row["has_attachments"],
    )
