"""The message store on PostgreSQL: summaries, raw bytes (``bytea``), known server UIDLs.

A downloaded message, its raw bytes and its UIDL's ``stored`` state are written in one
transaction (``store_batch``); every PostgreSQL commit is durable, so once it returns the
retrieval may DELE the message on the server.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from service.domain.enums import ServerMessageState
from service.domain.retrievals import MessageFilter, MessageSummary, NewMessage, RetrievalProgress
from service.repository.messages import KnownUidl
from service.repository.pages import Page, page_of
from service.repository.postgres.database import PgDatabase, Record, rowcount
from service.repository.postgres.retrievals import update_progress

_COLUMNS = (
    "id, account_id, uidl, size, retrieved_at, message_id, from_addr, to_json, cc_json,"
    " subject, date, has_attachments"
)
_LIST_DECODER = msgspec.json.Decoder(list[str])


class PgMessageRepository:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def known(self, account_id: str) -> dict[str, KnownUidl]:
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
        """Newest first, filtered (substring filters ignore case)."""
        params: list[object] = [account_id, after or "~"]
        where = ["account_id = $1", "id < $2"]

        def bind(value: object) -> str:
            params.append(value)
            return f"${len(params)}"

        if flt.since is not None:
            where.append(f"retrieved_at >= {bind(flt.since)}")
        if flt.from_contains:
            where.append(f"strpos(lower(from_addr), lower({bind(flt.from_contains)})) > 0")
        if flt.subject_contains:
            where.append(f"strpos(lower(subject), lower({bind(flt.subject_contains)})) > 0")
        if flt.has_attachments is not None:
            where.append(f"has_attachments = {bind(flt.has_attachments)}")
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM messages WHERE {' AND '.join(where)}"
            f" ORDER BY id DESC LIMIT {bind(limit + 1)}",
            *params,
        )
        return page_of([_summary(row) for row in rows], limit, key=lambda m: m.id)

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
