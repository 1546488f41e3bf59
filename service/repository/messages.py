"""The message store: summaries, raw bytes, and what is known of each server UIDL.

A downloaded message, its raw bytes and its UIDL's ``stored`` state are written in one
transaction (``store_batch``), committed with ``synchronous=FULL``: only after that commit
may the retrieval DELE the message on the server.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Protocol

import aiosqlite
import msgspec

from service.domain.enums import ServerMessageState
from service.domain.retrievals import MessageFilter, MessageSummary, NewMessage, RetrievalProgress
from service.domain.time import from_text, opt_from_text, opt_to_text, to_text
from service.repository.bounces import mark_dsn_candidates
from service.repository.database import Database
from service.repository.events import emit_messages_received
from service.repository.pages import Page, page_of
from service.repository.retrievals import update_progress

_COLUMNS = (
    "id, account_id, uidl, size, retrieved_at, message_id, from_addr, to_json, cc_json,"
    " subject, date, has_attachments"
)
_M_COLUMNS = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))
_LIST_DECODER = msgspec.json.Decoder(list[str])

# A substring filter first scans this many of the newest rows (about a millisecond): one
# that matches often fills its page there, where the trigram index would hand back every
# match in the account to sort. Bigger pages scan proportionally more.
SCAN_WINDOW = 1000
SCAN_WINDOW_PER_ROW = 20
# SQLite's default bound on variables in one statement (SQLITE_MAX_VARIABLE_NUMBER).
MAX_VARIABLES = 32766
# The trigram index finds substrings of at least this many characters; a shorter one
# matches so many rows that reading newest first is the fast plan anyway.
TRIGRAM = 3


class FilterColumn(enum.Enum):
    """What a substring filter looks in (``TEXT``: subject, sender or any ``to`` address)."""

    SUBJECT = "subject"
    FROM = "from_addr"
    TO = "to_json"
    TEXT = "text"


_SUBJECT = "instr(lower(m.subject), lower(?)) > 0"
_FROM = "instr(lower(m.from_addr), lower(?)) > 0"
_TO = "EXISTS (SELECT 1 FROM json_each(m.to_json) t WHERE instr(lower(t.value), lower(?)) > 0)"
# The exact predicates (an index only narrows) and how many times each binds the needle.
_SQLITE_CONTAINS = {
    FilterColumn.SUBJECT: (_SUBJECT, 1),
    FilterColumn.FROM: (_FROM, 1),
    FilterColumn.TO: (_TO, 1),
    FilterColumn.TEXT: (f"({_SUBJECT} OR {_FROM} OR {_TO})", 3),
}


def substring_filters(flt: MessageFilter) -> list[tuple[FilterColumn, str]]:
    """The substring filters asked for, with what each looks in."""
    pairs = [
        (FilterColumn.SUBJECT, flt.subject_contains),
        (FilterColumn.FROM, flt.from_contains),
        (FilterColumn.TO, flt.to_contains),
        (FilterColumn.TEXT, flt.text_contains),
    ]
    return [(column, needle) for column, needle in pairs if needle]


def json_text_has(needle: str) -> bool:
    """Whether an address containing ``needle`` has it, as is, in the stored JSON text of
    its list (JSON escapes quotes, backslashes and control characters): only then may the
    ``to`` column's index (over that text) narrow a search for it."""
    return not any(ch in '"\\' or ch < " " for ch in needle)


def indexable(column: FilterColumn, needle: str) -> bool:
    """Whether the trigram index may narrow this substring filter."""
    if len(needle) < TRIGRAM:
        return False
    return column in (FilterColumn.SUBJECT, FilterColumn.FROM) or json_text_has(needle)


def fts_match(flt: MessageFilter) -> str | None:
    """The FTS5 query that narrows ``flt`` to candidate rows, or None when none helps."""
    terms = []
    for column, needle in substring_filters(flt):
        if not indexable(column, needle):
            continue
        phrase = '"' + needle.replace('"', '""') + '"'
        names = "subject from_addr to_json" if column is FilterColumn.TEXT else column.value
        terms.append(f"{{{names}}} : {phrase}")
    return " AND ".join(terms) or None


class KnownUidl(msgspec.Struct, frozen=True):
    state: ServerMessageState
    seen_at: datetime


class UidlComparison(msgspec.Struct, frozen=True, kw_only=True):
    """The server's UIDL list compared with what the store knows of the account.

    ``new``: listed UIDLs the store has never seen (to download, or skip if too big);
    ``deletable``: listed UIDLs of stored messages that the deletion rule removes now;
    ``unlisted``: how many known UIDLs the server did not list (to forget afterwards).
    """

    new: frozenset[str]
    deletable: frozenset[str]
    unlisted: int = 0


class MessageRepository(Protocol):
    async def known(self, account_id: str) -> dict[str, KnownUidl]: ...
    async def forget(self, account_id: str, uidls: Iterable[str]) -> None: ...
    async def compare_uidls(
        self,
        account_id: str,
        listed: Sequence[str],
        *,
        delete_stored: bool = False,
        delete_seen_until: datetime | None = None,
    ) -> UidlComparison: ...
    async def forget_unlisted(
        self, account_id: str, listed: Sequence[str], *, seen_before: datetime, limit: int
    ) -> int:
        """Forget known UIDLs not in ``listed`` seen before ``seen_before``, at least up
        to ``limit`` of them (a store may take all at once); return how many. Callers call
        again while it returns ``limit`` or more."""
        ...

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
        """Every UIDL the store knows for the account (loads them all: inspection only;
        a retrieval uses :meth:`compare_uidls`)."""
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

    async def compare_uidls(
        self,
        account_id: str,
        listed: Sequence[str],
        *,
        delete_stored: bool = False,
        delete_seen_until: datetime | None = None,
    ) -> UidlComparison:
        """Compare the server's UIDL list with the known ones, in SQL, and return only the
        new ones and the deletable ones (known UIDLs the server no longer lists are left
        to :meth:`forget_unlisted`: they change neither answer).

        Deletable: stored (not skipped) and either ``delete_stored`` or seen at or before
        ``delete_seen_until``. The known UIDLs never come into Python, so an account that
        knows 100,000 costs no memory for them.
        """
        # One JSON array parameter, joined by key (json_each): no temporary table to
        # create and drop, and no statement per UIDL. A read: no write lock taken.
        server = msgspec.json.encode(list(listed)).decode()
        until = None if delete_seen_until is None else to_text(delete_seen_until)
        rows = await self._db.fetch_all(
            "SELECT j.value, s.uidl IS NULL FROM json_each(?2) j"
            " LEFT JOIN server_messages s ON s.account_id = ?1 AND s.uidl = j.value"
            " WHERE s.uidl IS NULL"
            " OR (s.state = ?3 AND (?4 OR s.seen_at <= ?5))",
            (account_id, server, ServerMessageState.STORED.value, delete_stored, until),
        )
        new = frozenset(str(row[0]) for row in rows if row[1])
        deletable = frozenset(str(row[0]) for row in rows if not row[1])
        known = await self._db.fetch_one(
            "SELECT count(*) FROM server_messages WHERE account_id = ?", (account_id,)
        )
        unlisted = (int(known[0]) if known else 0) - (len(set(listed)) - len(new))
        return UidlComparison(new=new, deletable=deletable, unlisted=max(unlisted, 0))

    async def forget_unlisted(
        self, account_id: str, listed: Sequence[str], *, seen_before: datetime, limit: int
    ) -> int:
        """Forget up to ``limit`` known UIDLs that are not in ``listed`` (the server no
        longer has them) and were seen before ``seen_before`` (so nothing a later
        retrieval recorded); return how many. Called in rounds until it returns less
        than ``limit``: each round is a short write transaction."""
        server = msgspec.json.encode(list(listed)).decode()
        async with self._db.transaction() as conn:
            # NOT IN over a subquery: SQLite builds one ephemeral index of the list.
            cursor = await conn.execute(
                "DELETE FROM server_messages WHERE account_id = ?1 AND uidl IN"
                " (SELECT uidl FROM server_messages WHERE account_id = ?1 AND seen_at < ?3"
                " AND uidl NOT IN (SELECT value FROM json_each(?2)) LIMIT ?4)",
                (account_id, server, to_text(seen_before), limit),
            )
            return max(cursor.rowcount, 0)

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
            # Multi-row INSERTs: one step each instead of one per row, and so one hand-off
            # of the GIL to and from the download and parsing threads instead of hundreds.
            await _insert_rows(
                conn, f"INSERT INTO messages ({_COLUMNS})", [_params(m.summary) for m in messages]
            )
            # The batch's trigram index rows, in one statement (migration 8: a trigger per
            # row made FTS5 write a segment per message).
            await conn.execute(
                "INSERT INTO messages_fts (rowid, subject, from_addr, to_json)"
                " SELECT rowid, subject, from_addr, to_json FROM messages"
                " WHERE id IN (SELECT value FROM json_each(?))",
                (msgspec.json.encode([m.summary.id for m in messages]).decode(),),
            )
            await _insert_rows(
                conn,
                "INSERT INTO message_bodies (message_id, raw)",
                [(m.summary.id, m.raw) for m in messages],
            )
            # Possible DSNs, linked to what they report after the commit (bounces).
            await mark_dsn_candidates(conn, messages)
            await _insert_rows(
                conn,
                "INSERT OR REPLACE INTO server_messages (account_id, uidl, state, size, seen_at)",
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
            await emit_messages_received(
                conn, account_id, retrieval_id, [m.summary for m in messages]
            )

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
        """Newest first, filtered (substring filters ignore ASCII case).

        Two exact plans, cheapest first: scan the newest ``SCAN_WINDOW`` rows (a filter
        that matches often fills the page there), else go through an index to the few
        rows that match (the trigram index for substrings, ``retrieved_at`` for ``since``).
        """
        where = ["m.account_id = ?", "m.id < ?"]
        params: list[object] = [account_id, after or "~"]
        if flt.since is not None:
            where.append("m.retrieved_at >= ?")
            params.append(to_text(flt.since))
        for column, needle in substring_filters(flt):
            predicate, binds = _SQLITE_CONTAINS[column]
            where.append(predicate)
            params.extend([needle] * binds)
        if flt.has_attachments is not None:
            where.append("m.has_attachments = ?")
            params.append(int(flt.has_attachments))
        if flt.message_id is not None:
            where.append("m.message_id = ?")
            params.append(flt.message_id)
        condition = " AND ".join(where)
        match = fts_match(flt)
        if flt.message_id is not None:
            # The (account, message_id) index finds the few rows with this Message-ID.
            rows = await self._db.fetch_all(
                f"SELECT {_M_COLUMNS} FROM messages m INDEXED BY messages_message_id"
                f" WHERE {condition} ORDER BY m.id DESC LIMIT ?",
                (*params, limit + 1),
            )
            return page_of([_summary(row) for row in rows], limit, key=lambda m: m.id)
        if match is None and flt.since is None:
            # Nothing an index narrows better than the (account, has_attachments, id) or
            # (account, id) index read newest first.
            rows = await self._db.fetch_all(
                f"SELECT {_M_COLUMNS} FROM messages m WHERE {condition} ORDER BY m.id DESC LIMIT ?",
                (*params, limit + 1),
            )
            return page_of([_summary(row) for row in rows], limit, key=lambda m: m.id)
        window = max(SCAN_WINDOW, (limit + 1) * SCAN_WINDOW_PER_ROW)
        # The window reads the newest rows that can match at all: with has_attachments
        # given, through its (account, has_attachments, id) index.
        scope = "account_id = ? AND id < ?"
        scope_params: list[object] = [account_id, after or "~"]
        if flt.has_attachments is not None:
            scope += " AND has_attachments = ?"
            scope_params.append(int(flt.has_attachments))
        rows = await self._db.fetch_all(
            f"SELECT {_M_COLUMNS} FROM (SELECT * FROM messages WHERE {scope}"
            f" ORDER BY id DESC LIMIT ?) m WHERE {condition} ORDER BY m.id DESC LIMIT ?",
            (*scope_params, window, *params, limit + 1),
        )
        if len(rows) <= limit and await self._db.fetch_one(
            # Only if the window did not already read every row in scope (a small account,
            # or the last pages): the index would hand back other accounts' matches too.
            f"SELECT 1 FROM messages WHERE {scope} ORDER BY id DESC LIMIT 1 OFFSET ?",
            (*scope_params, window),
        ):
            if match is not None:
                rows = await self._db.fetch_all(
                    f"SELECT {_M_COLUMNS} FROM messages_fts f CROSS JOIN messages m"
                    f" ON m.rowid = f.rowid WHERE messages_fts MATCH ? AND {condition}"
                    " ORDER BY m.id DESC LIMIT ?",
                    (match, *params, limit + 1),
                )
            else:
                rows = await self._db.fetch_all(
                    f"SELECT {_M_COLUMNS} FROM messages m INDEXED BY messages_retrieved"
                    f" WHERE {condition} ORDER BY m.id DESC LIMIT ?",
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


async def _insert_rows(
    conn: aiosqlite.Connection, head: str, rows: Sequence[tuple[object, ...]]
) -> None:
    """``head VALUES (...), (...), ...``: as few statements as SQLite's bound on
    variables allows."""
    if not rows:
        return
    width = len(rows[0])
    group = "(" + ", ".join("?" * width) + ")"
    per = max(1, MAX_VARIABLES // width)
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        await conn.execute(
            f"{head} VALUES {', '.join([group] * len(chunk))}",
            [value for row in chunk for value in row],
        )


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
