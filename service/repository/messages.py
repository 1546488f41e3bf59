"""The message store: summaries, raw bytes, and what is known of each server UIDL.

A downloaded message, its raw bytes and its UIDL's ``stored`` state are written in one
transaction (``store_batch``), committed with ``synchronous=FULL``: only after that commit
may the retrieval DELE the message on the server.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime
from typing import Protocol

import msgspec

from service.domain.enums import ServerMessageState
from service.domain.retrievals import MessageFilter, MessageSummary, NewMessage, RetrievalProgress
from service.domain.time import from_text, opt_from_text, opt_to_text, to_text
from service.repository.database import Database
from service.repository.pages import Page, page_of
from service.repository.retrievals import update_progress

_COLUMNS = (
    "id, account_id, uidl, size, retrieved_at, message_id, from_addr, to_json, cc_json,"
    " subject, date, has_attachments"
)
_LIST_DECODER = msgspec.json.Decoder(list[str])


class KnownUidl(msgspec.Struct, frozen=True):
    state: ServerMessageState
    seen_at: datetime


class MessageRepository(Protocol):
    async def known(self, account_id: str) -> dict[str, KnownUidl]: ...
    async def forget(self, account_id: str, uidls: Iterable[str]) -> None: ...
    async def store_batch(
        self,
        account_id: str,
        messages: list[NewMessage],
        retrieval_id: str,
        progress: RetrievalProgress,
    ) -> None: ...
    async def record_skipped(
        self, account_id: str, skipped: list[tuple[str, int]], at: datetime
    ) -> None: ...
    async def page(
        self, account_id: str, flt: MessageFilter, *, after: str | None, limit: int
    ) -> Page[MessageSummary]: ...
    async def get(self, account_id: str, message_id: str) -> MessageSummary | None: ...
    async def raw(self, account_id: str, message_id: str) -> bytes | None: ...
    async def delete(self, account_id: str, message_id: str) -> bool: ...
    async def count(self, account_id: str) -> int: ...


class SQLiteMessageRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def known(self, account_id: str) -> dict[str, KnownUidl]:
        rows = await self._db.fetch_all(
            "SELECT uidl, state, seen_at FROM server_messages WHERE account_id = ?",
            (account_id,),
        )
        return {
            row["uidl"]: KnownUidl(ServerMessageState(row["state"]), from_text(row["seen_at"]))
            for row in rows
        }

    async def forget(self, account_id: str, uidls: Iterable[str]) -> None:
        """Drop UIDLs that are gone from the server (the stored messages stay)."""
        params = [(account_id, uidl) for uidl in uidls]
        if not params:
            return
        async with self._db.transaction() as conn:
            await conn.executemany(
                "DELETE FROM server_messages WHERE account_id = ? AND uidl = ?", params
            )

    async def store_batch(
        self,
        account_id: str,
        messages: list[NewMessage],
        retrieval_id: str,
        progress: RetrievalProgress,
    ) -> None:
        """Commit messages with their UIDLs and the retrieval's progress, durably."""
        async with self._db.transaction(durable=True) as conn:
            # A UIDL stored twice would break the unique index and roll back the batch:
            # the retrieval then fails and deletes nothing (it cannot happen while the
            # store allows one active retrieval per account and skips known UIDLs).
            await conn.executemany(
                f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_params(m.summary) for m in messages],
            )
            await conn.executemany(
                "INSERT INTO message_bodies (message_id, raw) VALUES (?, ?)",
                [(m.summary.id, m.raw) for m in messages],
            )
            await conn.executemany(
                "INSERT OR REPLACE INTO server_messages (account_id, uidl, state, size, seen_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        account_id,
                        m.summary.uidl,
                        ServerMessageState.STORED.value,
                        m.summary.size,
                        to_text(m.summary.retrieved_at),
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
                "INSERT OR IGNORE INTO server_messages (account_id, uidl, state, size, seen_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (account_id, uidl, ServerMessageState.SKIPPED.value, size, to_text(at))
                    for uidl, size in skipped
                ],
            )

    async def page(
        self, account_id: str, flt: MessageFilter, *, after: str | None, limit: int
    ) -> Page[MessageSummary]:
        """Newest first, filtered."""
        where = ["account_id = ?", "id < ?"]
        params: list[object] = [account_id, after or "~"]
        if flt.since is not None:
            where.append("retrieved_at >= ?")
            params.append(to_text(flt.since))
        if flt.from_contains:
            where.append("instr(lower(from_addr), lower(?)) > 0")
            params.append(flt.from_contains)
        if flt.subject_contains:
            where.append("instr(lower(subject), lower(?)) > 0")
            params.append(flt.subject_contains)
        if flt.has_attachments is not None:
            where.append("has_attachments = ?")
            params.append(int(flt.has_attachments))
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM messages WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            (*params, limit + 1),
        )
        return page_of([_summary(row) for row in rows], limit, key=lambda m: m.id)

    async def get(self, account_id: str, message_id: str) -> MessageSummary | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM messages WHERE id = ? AND account_id = ?",
            (message_id, account_id),
        )
        return None if row is None else _summary(row)

    async def raw(self, account_id: str, message_id: str) -> bytes | None:
        row = await self._db.fetch_one(
            "SELECT b.raw FROM message_bodies b JOIN messages m ON m.id = b.message_id"
            " WHERE m.id = ? AND m.account_id = ?",
            (message_id, account_id),
        )
        return None if row is None else bytes(row[0])

    async def delete(self, account_id: str, message_id: str) -> bool:
        """Local delete; the UIDL stays known so the message is not downloaded again."""
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "DELETE FROM messages WHERE id = ? AND account_id = ?", (message_id, account_id)
            )
            return cursor.rowcount > 0

    async def count(self, account_id: str) -> int:
        row = await self._db.fetch_one(
            "SELECT count(*) FROM messages WHERE account_id = ?", (account_id,)
        )
        return int(row[0]) if row else 0


def _params(m: MessageSummary) -> tuple[object, ...]:
    return (
        m.id,
        m.account_id,
        m.uidl,
        m.size,
        to_text(m.retrieved_at),
        m.message_id,
        m.from_,
        msgspec.json.encode(m.to).decode(),
        msgspec.json.encode(m.cc).decode(),
        m.subject,
        opt_to_text(m.date),
        int(m.has_attachments),
    )


def _summary(row: sqlite3.Row) -> MessageSummary:
    return MessageSummary(
        id=row["id"],
        account_id=row["account_id"],
        uidl=row["uidl"],
        size=row["size"],
        retrieved_at=from_text(row["retrieved_at"]),
        message_id=row["message_id"],
        from_=row["from_addr"],
        to=_LIST_DECODER.decode(row["to_json"]),
        cc=_LIST_DECODER.decode(row["cc_json"]),
        subject=row["subject"],
        date=opt_from_text(row["date"]),
        has_attachments=bool(row["has_attachments"]),
    )
