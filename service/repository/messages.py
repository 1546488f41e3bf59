"""The message store: summaries, raw bytes, and what is known of each server UIDL.

A downloaded message, its raw bytes and its UIDL's ``stored`` state are written in one
transaction (``store_batch``), committed with ``synchronous=FULL``: only after that commit
may the retrieval DELE the message on the server.
"""

from __future__ import annotations

import enum
import sqlite3
import string
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Protocol

import aiosqlite
import msgspec

from service.domain.enums import OutgoingStatus, ServerMessageState
from service.domain.retrievals import (
    MessageDirection,
    MessageFilter,
    MessageSummary,
    NewMessage,
    RetrievalProgress,
)
from service.domain.threads import ThreadPosition, root_to_look_up, thread_id_for, thread_id_of
from service.domain.time import from_text, opt_from_text, opt_to_text, to_text
from service.mail.parse import summarize
from service.repository.bounces import mark_dsn_candidates
from service.repository.database import Database
from service.repository.events import emit_messages_received
from service.repository.pages import Page, page_of
from service.repository.retrievals import update_progress

_COLUMNS = (
    "id, account_id, uidl, size, retrieved_at, message_id, from_addr, to_json, cc_json,"
    " subject, date, has_attachments, in_reply_to, references_json, thread_id"
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
# A sent copy in a thread list is summarized from this much of its start (its headers).
SENT_HEAD_BYTES = 64 * 1024
# Outgoing messages a thread list leaves out: they were never sent.
UNSENT_STATUSES = (OutgoingStatus.CANCELLED.value, OutgoingStatus.FAILED.value)


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


def with_threads(messages: Sequence[NewMessage]) -> list[NewMessage]:
    """``messages``, each with its thread named (from its own headers) when not given."""
    return [
        m
        if m.summary.thread_id is not None
        else msgspec.structs.replace(
            m, summary=msgspec.structs.replace(m.summary, thread_id=thread_of(m.summary))
        )
        for m in messages
    ]


def roots_to_look_up(messages: Sequence[NewMessage]) -> list[str]:
    """The roots (Message-IDs) whose stored thread messages of a batch join if known."""
    found = (
        root_to_look_up(m.summary.message_id, m.summary.in_reply_to, m.summary.references)
        for m in messages
    )
    return sorted({root for root in found if root is not None})


def join_roots(messages: Sequence[NewMessage], stored: dict[str, str]) -> list[NewMessage]:
    """``messages``, each in its root's thread when the root is known: ``stored``
    (Message-ID -> thread of a stored or sent message) or an earlier message of the
    batch (see :func:`service.domain.threads.root_to_look_up`)."""
    known = dict(stored)
    joined: list[NewMessage] = []
    for message in messages:
        summary = message.summary
        root = root_to_look_up(summary.message_id, summary.in_reply_to, summary.references)
        thread = known.get(root) if root is not None else None
        if thread is not None and thread != summary.thread_id:
            summary = msgspec.structs.replace(summary, thread_id=thread)
            message = msgspec.structs.replace(message, summary=summary)
        if summary.message_id is not None and summary.thread_id is not None:
            known.setdefault(summary.message_id, summary.thread_id)
        joined.append(message)
    return joined


def thread_moves(messages: Sequence[NewMessage]) -> list[tuple[str, str]]:
    """``(thread, provisional thread)`` for each message of a batch whose thread is not
    the one named after itself: messages stored or sent before it that took it as their
    root (a reply that arrived first) wait in the provisional one, named after it; they
    move to its thread."""
    moves = []
    for m in messages:
        own, thread = m.summary.message_id, m.summary.thread_id
        if own is not None and thread is not None and thread != thread_id_of(own):
            moves.append((thread, thread_id_of(own)))
    return moves


def thread_of(summary: MessageSummary) -> str:
    """The stored thread: as given, else named from the summary's own headers."""
    return summary.thread_id or thread_id_for(
        summary.message_id, summary.in_reply_to, summary.references, summary.id
    )


def received_position(summary: MessageSummary) -> ThreadPosition:
    return ThreadPosition(summary.date or summary.retrieved_at, summary.retrieved_at, summary.id)


def sent_copy(
    *,
    outgoing_id: str,
    account_id: str,
    message_id: str,
    subject: str,
    size: int,
    created_at: datetime,
    thread_id: str | None,
    head: bytes,
) -> tuple[ThreadPosition, MessageSummary]:
    """A thread list's item for one of the account's outgoing messages, from the start of
    its bytes as composed (the header section: Bcc is never in it)."""
    parsed = summarize(head)
    return ThreadPosition(created_at, created_at, outgoing_id), MessageSummary(
        id=outgoing_id,
        account_id=account_id,
        uidl=None,
        size=size,
        retrieved_at=created_at,
        message_id=message_id,
        from_=parsed.from_,
        to=list(parsed.to),
        cc=list(parsed.cc),
        subject=parsed.subject if parsed.subject is not None else subject,
        date=parsed.date,
        has_attachments=parsed.has_attachments,
        in_reply_to=parsed.in_reply_to,
        references=list(parsed.references),
        thread_id=thread_id,
        direction=MessageDirection.SENT,
    )


# The thread list reads this many items of each kind per round when other filters are
# given (one round of limit + 1 without them).
THREAD_ROUND = 200
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)

ThreadItem = tuple[ThreadPosition, MessageSummary]
ThreadReader = Callable[[ThreadPosition | None, int], Awaitable[list[ThreadItem]]]


def thread_item_matches(summary: MessageSummary, flt: MessageFilter) -> bool:
    """Whether a thread's item passes the list's other filters, as the SQL of the plain
    list decides them (substrings ignore ASCII case; ``since`` is the retrieval time, or
    the acceptance time of a sent copy)."""
    if flt.since is not None and summary.retrieved_at < flt.since:
        return False
    if flt.has_attachments is not None and summary.has_attachments != flt.has_attachments:
        return False
    if flt.message_id is not None and summary.message_id != flt.message_id:
        return False
    for column, needle in substring_filters(flt):
        folded = needle.translate(_ASCII_LOWER)
        fields: list[str | None] = []
        if column in (FilterColumn.SUBJECT, FilterColumn.TEXT):
            fields.append(summary.subject)
        if column in (FilterColumn.FROM, FilterColumn.TEXT):
            fields.append(summary.from_)
        if column in (FilterColumn.TO, FilterColumn.TEXT):
            fields.extend(summary.to)
        if not any(value and folded in value.translate(_ASCII_LOWER) for value in fields):
            return False
    return True


async def collect_thread_page(
    received: ThreadReader,
    sent: ThreadReader,
    flt: MessageFilter,
    after: str | None,
    limit: int,
) -> Page[MessageSummary]:
    """One page of a thread, oldest first: received messages and sent copies (each read
    oldest first after a position) merged, the other filters applied, in rounds until
    the page is full or the thread ends."""
    position = None if after is None else ThreadPosition.of_key(after)
    size = limit + 1 if not flt.narrows_besides_thread else max(limit + 1, THREAD_ROUND)
    found: list[ThreadItem] = []
    while True:
        merged = sorted(
            await received(position, size) + await sent(position, size),
            key=lambda pair: (pair[0].at, pair[0].arrival, pair[0].id),
        )[:size]
        for item in merged:
            if thread_item_matches(item[1], flt):
                found.append(item)
                if len(found) > limit:
                    break
        if len(found) > limit or len(merged) < size:
            break
        position = merged[-1][0]
    page = page_of(found, limit, key=lambda pair: pair[0].key())
    return Page(items=[m for _, m in page.items], next_after=page.next_after)


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
        # create and drop, and no statement per UIDL. A read: no write lock taken. The
        # count of known UIDLs comes in the same statement (its first row, uidl NULL): one
        # round trip to the reader's thread, which is most of what an empty poll asks.
        server = msgspec.json.encode(list(listed)).decode()
        until = None if delete_seen_until is None else to_text(delete_seen_until)
        rows = await self._db.fetch_all(
            "SELECT NULL, count(*) FROM server_messages WHERE account_id = ?1"
            " UNION ALL"
            " SELECT j.value, s.uidl IS NULL FROM json_each(?2) j"
            " LEFT JOIN server_messages s ON s.account_id = ?1 AND s.uidl = j.value"
            " WHERE s.uidl IS NULL"
            " OR (s.state = ?3 AND (?4 OR s.seen_at <= ?5))",
            (account_id, server, ServerMessageState.STORED.value, delete_stored, until),
        )
        known = next((int(row[1]) for row in rows if row[0] is None), 0)
        new = frozenset(str(row[0]) for row in rows if row[0] is not None and row[1])
        deletable = frozenset(str(row[0]) for row in rows if row[0] is not None and not row[1])
        unlisted = known - (len(set(listed)) - len(new))
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
            messages = await _join_threads(conn, account_id, messages)
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
            if moves := thread_moves(messages):
                # Each through its table's (account, thread) index; usually nothing waits.
                for table in ("messages", "outbox"):
                    await conn.executemany(
                        f"UPDATE {table} SET thread_id = ? WHERE account_id = ? AND thread_id = ?",
                        [(thread, account_id, old) for thread, old in moves],
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

        With ``thread_id``: the thread oldest first, sent copies merged, other filters
        applied to both (:func:`collect_thread_page`).
        """
        if flt.thread_id is not None:
            return await self._thread_page(account_id, flt, after, limit)
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

    async def _thread_page(
        self, account_id: str, flt: MessageFilter, after: str | None, limit: int
    ) -> Page[MessageSummary]:
        """The thread's received messages and sent copies, each read through its
        (account, thread) index oldest first, merged."""
        assert flt.thread_id is not None
        thread = (account_id, flt.thread_id)

        async def received(start: ThreadPosition | None, count: int) -> list[ThreadItem]:
            later, params = "", list(thread)
            if start is not None:
                later = " AND (coalesce(m.date, m.retrieved_at), m.retrieved_at, m.id) > (?, ?, ?)"
                params += [to_text(start.at), to_text(start.arrival), start.id]
            rows = await self._db.fetch_all(
                f"SELECT {_M_COLUMNS} FROM messages m INDEXED BY messages_thread"
                f" WHERE m.account_id = ? AND m.thread_id = ?{later}"
                " ORDER BY coalesce(m.date, m.retrieved_at), m.retrieved_at, m.id LIMIT ?",
                (*params, count),
            )
            return [(received_position(m), m) for m in map(_summary, rows)]

        async def sent(start: ThreadPosition | None, count: int) -> list[ThreadItem]:
            later, params = "", [*thread, *UNSENT_STATUSES]
            if start is not None:
                later = " AND (o.created_at, o.created_at, o.id) > (?, ?, ?)"
                params += [to_text(start.at), to_text(start.arrival), start.id]
            rows = await self._db.fetch_all(
                "SELECT o.id, o.message_id, o.subject, o.size, o.created_at, o.thread_id,"
                " substr(b.raw, 1, ?) AS head FROM outbox o INDEXED BY outbox_thread"
                " JOIN outbox_bodies b ON b.outgoing_id = o.id WHERE o.account_id = ?"
                f" AND o.thread_id = ? AND o.status NOT IN (?, ?){later}"
                " ORDER BY o.created_at, o.id LIMIT ?",
                (SENT_HEAD_BYTES, *params, count),
            )
            return [
                sent_copy(
                    outgoing_id=row["id"],
                    account_id=account_id,
                    message_id=row["message_id"],
                    subject=row["subject"],
                    size=row["size"],
                    created_at=from_text(row["created_at"]),
                    thread_id=row["thread_id"],
                    head=bytes(row["head"]),
                )
                for row in rows
            ]

        return await collect_thread_page(received, sent, flt, after, limit)

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


async def _join_threads(
    conn: aiosqlite.Connection, account_id: str, messages: list[NewMessage]
) -> list[NewMessage]:
    """The batch with each message in its root's thread when the account has the root
    (stored, sent, or earlier in the batch): one statement for the batch."""
    messages = with_threads(messages)
    roots = roots_to_look_up(messages)
    if not roots:
        return messages
    rows = await conn.execute_fetchall(
        "SELECT j.value, coalesce("
        "(SELECT thread_id FROM messages WHERE account_id = ?1 AND message_id = j.value"
        " ORDER BY id LIMIT 1),"
        " (SELECT thread_id FROM outbox WHERE account_id = ?1 AND message_id = j.value"
        " ORDER BY id LIMIT 1)) FROM json_each(?2) j",
        (account_id, msgspec.json.encode(roots).decode()),
    )
    return join_roots(messages, {str(row[0]): str(row[1]) for row in rows if row[1]})


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
        m.in_reply_to,
        msgspec.json.encode(m.references).decode() if m.references else None,
        thread_of(m),
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
        in_reply_to=row["in_reply_to"],
        references=_LIST_DECODER.decode(row["references_json"]) if row["references_json"] else [],
        thread_id=row["thread_id"],
    )
