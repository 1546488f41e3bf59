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

import asyncpg
import msgspec

from service.domain.enums import ServerMessageState
from service.domain.retrievals import MessageFilter, MessageSummary, NewMessage, RetrievalProgress
from service.domain.threads import ThreadPosition
from service.repository.messages import (
    SCAN_WINDOW,
    SCAN_WINDOW_PER_ROW,
    SENT_HEAD_BYTES,
    UNSENT_STATUSES,
    FilterColumn,
    KnownUidl,
    ThreadItem,
    UidlComparison,
    collect_thread_page,
    indexable,
    join_roots,
    json_text_has,
    received_position,
    roots_to_look_up,
    sent_copy,
    substring_filters,
    thread_moves,
    thread_of,
    with_threads,
)
from service.repository.pages import Page, page_of
from service.repository.postgres.bounces import mark_dsn_candidates
from service.repository.postgres.database import PgDatabase, Record, rowcount
from service.repository.postgres.events import emit_messages_received
from service.repository.postgres.retrievals import update_progress

_COLUMNS = (
    "id, account_id, uidl, size, retrieved_at, message_id, from_addr, to_json, cc_json,"
    " subject, date, has_attachments, in_reply_to, references_json, thread_id"
)
_M_COLUMNS = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))
_LIST_DECODER = msgspec.json.Decoder(list[str])
_LIKE_SPECIAL = re.compile(r"[\\%_]")


def _fold(sql: str) -> str:
    """ASCII-only lower case, as SQLite's ``lower()``: the same matches on both stores.
    Under the C collation ``lower`` folds only A-Z, byte by byte: about 0.1 ms per 1,000
    subjects, where ``translate`` took 10 ms (most of a filter's window)."""
    return f'lower({sql} COLLATE "C")'


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


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
        """Compare the server's UIDL list with the known ones, in SQL, and return only the
        new ones and the deletable ones (known UIDLs the server no longer lists are left
        to :meth:`forget_unlisted`: they change neither answer).

        Deletable: stored (not skipped) and either ``delete_stored`` or seen at or before
        ``delete_seen_until``. The known UIDLs never come into Python.
        """
        # The count of known UIDLs comes in the same statement (a column beside each row,
        # computed once): one round trip instead of two. A row with a NULL uidl carries it
        # when nothing is new or deletable.
        rows = await self._db.fetch_all(
            "WITH known AS (SELECT count(*) AS n FROM server_messages WHERE account_id = $1),"
            " found AS (SELECT l.uidl, s.uidl IS NULL AS is_new FROM unnest($2::text[]) AS l(uidl)"
            " LEFT JOIN server_messages s ON s.account_id = $1 AND s.uidl = l.uidl"
            " WHERE s.uidl IS NULL"
            " OR (s.state = $3 AND ($4 OR s.seen_at <= $5)))"
            " SELECT f.uidl, f.is_new, k.n FROM known k LEFT JOIN found f ON true",
            account_id,
            list(listed),
            ServerMessageState.STORED.value,
            delete_stored,
            delete_seen_until,
        )
        known = int(rows[0]["n"]) if rows else 0
        found = [row for row in rows if row["uidl"] is not None]
        new = frozenset(str(row["uidl"]) for row in found if row["is_new"])
        deletable = frozenset(str(row["uidl"]) for row in found if not row["is_new"])
        unlisted = known - (len(set(listed)) - len(new))
        return UidlComparison(new=new, deletable=deletable, unlisted=max(unlisted, 0))

    async def forget_unlisted(
        self, account_id: str, listed: Sequence[str], *, seen_before: datetime, limit: int
    ) -> int:
        """Forget the known UIDLs that are not in ``listed`` and were seen before
        ``seen_before``; return how many. All in one statement, whatever ``limit``: rounds
        would each read again the rows the previous ones deleted (dead until VACUUM), and
        here a long delete holds up neither readers nor other writers."""
        async with self._db.transaction() as conn:
            # NOT EXISTS over unnest: a hash anti-join (``<> ALL`` would be quadratic).
            status = await conn.execute(
                "DELETE FROM server_messages s WHERE s.account_id = $1 AND s.seen_at < $3"
                " AND NOT EXISTS (SELECT 1 FROM unnest($2::text[]) AS l(uidl)"
                " WHERE l.uidl = s.uidl)",
                account_id,
                list(listed),
                seen_before,
            )
            return rowcount(status)

    async def store_batch(
        self,
        account_id: str,
        messages: list[NewMessage],
        retrieval_id: str,
        progress: RetrievalProgress,
    ) -> None:
        """Commit messages with their UIDLs and the retrieval's progress, durably."""
        async with self._db.transaction() as conn:
            messages = await _join_threads(conn, account_id, messages)
            # A UIDL stored twice breaks the unique rule and rolls back the whole batch
            # (DuplicateError): the retrieval then fails and deletes nothing.
            await conn.executemany(
                f"INSERT INTO messages ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,"
                " $9, $10, $11, $12, $13, $14, $15)",
                [_params(m.summary) for m in messages],
            )
            await conn.executemany(
                "INSERT INTO message_bodies (message_id, raw) VALUES ($1, $2)",
                [(m.summary.id, m.raw) for m in messages],
            )
            if moves := thread_moves(messages):
                # Each through its table's (account, thread) index; usually nothing waits.
                for table in ("messages", "outbox"):
                    await conn.execute(
                        f"UPDATE {table} t SET thread_id = v.thread FROM unnest($2::text[],"
                        " $3::text[]) AS v(thread, provisional)"
                        " WHERE t.account_id = $1 AND t.thread_id = v.provisional",
                        account_id,
                        [thread for thread, _ in moves],
                        [old for _, old in moves],
                    )
            # Possible DSNs, linked to what they report after the commit (bounces).
            await mark_dsn_candidates(conn, messages)
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

        With ``thread_id``: the thread oldest first, sent copies merged, other filters
        applied to both (:func:`collect_thread_page`).
        """
        if flt.thread_id is not None:
            return await self._thread_page(account_id, flt, after, limit)
        # Written with ``?`` and numbered per statement: each statement binds only what it uses.
        # No account equality here: each statement below names the account its own way.
        where = ["m.id < ?"]
        params: list[object] = [after or "~"]
        if flt.since is not None:
            where.append("m.retrieved_at >= ?")
            params.append(flt.since)
        # What the trigram indexes answer (a superset of the matches): the one-column
        # filters' indexed LIKEs in one statement (ANDed: a BitmapAnd of their indexes, so
        # two common filters that rarely match together recheck only the rows in both,
        # not every row of either), a ``q`` as a UNION of one indexed LIKE per column (an
        # OR of three LIKEs may be planned as a scan of the table); the sets intersected.
        single: list[str] = []
        single_params: list[object] = []
        unions: list[str] = []
        union_params: list[object] = []
        for column, needle in substring_filters(flt):
            contains = {
                FilterColumn.SUBJECT: f"strpos({_fold('m.subject')}, ?) > 0",
                FilterColumn.FROM: f"strpos({_fold('m.from_addr')}, ?) > 0",
                FilterColumn.TO: "EXISTS (SELECT 1 FROM json_array_elements_text(m.to_json::json)"
                f" t(v) WHERE strpos({_fold('t.v')}, ?) > 0)",
            }
            if json_text_has(needle):
                # The list's text must hold it first: a cheap test that spares most rows
                # the JSON parsing.
                contains[FilterColumn.TO] = (
                    f"(strpos({_fold('m.to_json')}, ?) > 0 AND {contains[FilterColumn.TO]})"
                )
            pattern = "%" + _LIKE_SPECIAL.sub(r"\\\g<0>", needle) + "%"
            columns = list(contains) if column is FilterColumn.TEXT else [column]
            where.append("(" + " OR ".join(contains[c] for c in columns) + ")")
            # Folded once here, not per row.
            params.extend(
                [needle.translate(_ASCII_LOWER)] * sum(contains[c].count("?") for c in columns)
            )
            if not indexable(column, needle):
                continue
            if column is FilterColumn.TEXT:
                unions.append(
                    " UNION ".join(
                        f"SELECT id FROM messages WHERE lower({c.value}) LIKE lower(?)"
                        for c in columns
                    )
                )
                union_params.extend([pattern] * len(columns))
            else:
                single.append(f"lower({column.value}) LIKE lower(?)")
                single_params.append(pattern)
        narrow = [f"SELECT id FROM ({u}) c" for u in unions]
        if single:
            narrow.insert(0, "SELECT id FROM messages WHERE " + " AND ".join(single))
        narrow_params = [*single_params, *union_params]
        if flt.has_attachments is not None:
            where.append("m.has_attachments = ?")
            params.append(flt.has_attachments)
        if flt.message_id is not None:
            where.append("m.message_id = ?")
            params.append(flt.message_id)
        condition = " AND ".join(where)
        if flt.message_id is not None:
            # The (account, message_id) index finds the few rows with this Message-ID.
            rows = await self._fetch(
                f"SELECT {_M_COLUMNS} FROM messages m WHERE m.account_id = ? AND {condition}"
                " ORDER BY m.id DESC LIMIT ?",
                [account_id, *params, limit + 1],
            )
            return page_of([_summary(row) for row in rows], limit, key=lambda m: m.id)
        # The account's rows newest first, read along the (account, [has_attachments,] id)
        # index. Spelled as a range and ordered by (account, id): asyncpg prepares
        # statements, and a generic plan, blind to which account it is, would otherwise
        # walk the primary key newest first over every account (seconds for a small
        # account beside a big one).
        scope = "m.account_id BETWEEN ? AND ? AND m.id < ?"
        scope_params: list[object] = [account_id, account_id, after or "~"]
        newest = "ORDER BY m.account_id DESC, m.id DESC"
        if flt.has_attachments is not None:
            scope += " AND m.has_attachments = ?"
            scope_params.append(flt.has_attachments)
            # Its index's own order (one has_attachments value: the same rows, the same
            # order): ordered by (account, id) alone, with the account a range, the plan
            # read the (account, id) index and filtered (7 rows read per row kept).
            newest = "ORDER BY m.account_id DESC, m.has_attachments DESC, m.id DESC"
        if not narrow and flt.since is None:
            rows = await self._fetch(
                f"SELECT {_M_COLUMNS} FROM messages m WHERE {scope} AND {condition}"
                f" {newest} LIMIT ?",
                [*scope_params, *params, limit + 1],
            )
            return page_of([_summary(row) for row in rows], limit, key=lambda m: m.id)
        window = max(SCAN_WINDOW, (limit + 1) * SCAN_WINDOW_PER_ROW)
        if narrow:
            candidates = " INTERSECT ".join(narrow)
        else:
            candidates = "SELECT id FROM messages WHERE account_id = ? AND retrieved_at >= ?"
            narrow_params = [account_id, flt.since]
        # Both plans in one statement (one round trip). The window reads the newest rows
        # that can match at all (with has_attachments given, through its (account,
        # has_attachments, id) index), in the index's order so that it stops at the page's
        # last match. Only when it matched too few (``hits``) and did not already read
        # every row in scope (a small account, the last pages: the index would hand back
        # other accounts' matches too) does the second branch run (its gate is a one-time
        # filter: otherwise never executed). There the candidates come as an array looked
        # up by primary key: the planner must not fold them back into a newest-first scan
        # (or a hash) of the whole account. Both answers are exact; the second holds the
        # first's rows too.
        rows = await self._fetch(
            f"WITH hits AS (SELECT * FROM (SELECT * FROM messages m WHERE {scope} {newest}"
            f" LIMIT ?) m WHERE {condition} {newest} LIMIT ?)"
            f" SELECT {_M_COLUMNS} FROM hits m UNION ALL (SELECT {_M_COLUMNS} FROM messages m"
            " WHERE (SELECT count(*) FROM hits) <= ? AND EXISTS (SELECT 1 FROM messages m"
            f" WHERE {scope} {newest} OFFSET ?) AND m.id = ANY(ARRAY({candidates}))"
            f" AND m.account_id = ? AND {condition} ORDER BY m.id DESC LIMIT ?)",
            [
                *scope_params,
                window,
                *params,
                limit + 1,
                limit,
                *scope_params,
                window,
                *narrow_params,
                account_id,
                *params,
                limit + 1,
            ],
        )
        unique = {row["id"]: row for row in rows}
        rows = [unique[key] for key in sorted(unique, reverse=True)[: limit + 1]]
        return page_of([_summary(row) for row in rows], limit, key=lambda m: m.id)

    async def _thread_page(
        self, account_id: str, flt: MessageFilter, after: str | None, limit: int
    ) -> Page[MessageSummary]:
        """The thread's received messages and sent copies, each read through its
        (account, thread) index oldest first, merged."""
        assert flt.thread_id is not None
        thread: list[object] = [account_id, flt.thread_id]

        async def received(start: ThreadPosition | None, count: int) -> list[ThreadItem]:
            later, params = "", list(thread)
            if start is not None:
                later = " AND (coalesce(m.date, m.retrieved_at), m.retrieved_at, m.id) > (?, ?, ?)"
                params += [start.at, start.arrival, start.id]
            rows = await self._fetch(
                f"SELECT {_M_COLUMNS} FROM messages m"
                f" WHERE m.account_id = ? AND m.thread_id = ?{later}"
                " ORDER BY coalesce(m.date, m.retrieved_at), m.retrieved_at, m.id LIMIT ?",
                [*params, count],
            )
            return [(received_position(m), m) for m in map(_summary, rows)]

        async def sent(start: ThreadPosition | None, count: int) -> list[ThreadItem]:
            later, params = "", [*thread, list(UNSENT_STATUSES)]
            if start is not None:
                later = " AND (o.created_at, o.created_at, o.id) > (?, ?, ?)"
                params += [start.at, start.arrival, start.id]
            rows = await self._fetch(
                "SELECT o.id, o.message_id, o.subject, o.size, o.created_at, o.thread_id,"
                " substring(b.raw FROM 1 FOR ?) AS head FROM outbox o"
                " JOIN outbox_bodies b ON b.outgoing_id = o.id WHERE o.account_id = ?"
                f" AND o.thread_id = ? AND o.status <> ALL(?){later}"
                " ORDER BY o.created_at, o.id LIMIT ?",
                [SENT_HEAD_BYTES, *params, count],
            )
            return [
                sent_copy(
                    outgoing_id=row["id"],
                    account_id=account_id,
                    message_id=row["message_id"],
                    subject=row["subject"],
                    size=row["size"],
                    created_at=row["created_at"],
                    thread_id=row["thread_id"],
                    head=bytes(row["head"]),
                )
                for row in rows
            ]

        return await collect_thread_page(received, sent, flt, after, limit)

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


async def _join_threads(
    conn: asyncpg.Connection, account_id: str, messages: list[NewMessage]
) -> list[NewMessage]:
    """The batch with each message in its root's thread when the account has the root
    (stored, sent, or earlier in the batch): one statement for the batch."""
    messages = with_threads(messages)
    roots = roots_to_look_up(messages)
    if not roots:
        return messages
    rows = await conn.fetch(
        "SELECT p.id, coalesce("
        "(SELECT thread_id FROM messages WHERE account_id = $1 AND message_id = p.id"
        " ORDER BY id LIMIT 1),"
        " (SELECT thread_id FROM outbox WHERE account_id = $1 AND message_id = p.id"
        " ORDER BY id LIMIT 1)) AS thread FROM unnest($2::text[]) AS p(id)",
        account_id,
        roots,
    )
    return join_roots(messages, {str(r["id"]): str(r["thread"]) for r in rows if r["thread"]})


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
        m.in_reply_to,
        msgspec.json.encode(m.references).decode() if m.references else None,
        thread_of(m),
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
        in_reply_to=row["in_reply_to"],
        references=_LIST_DECODER.decode(row["references_json"]) if row["references_json"] else [],
        thread_id=row["thread_id"],
    )
