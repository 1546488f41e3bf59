"""Bounces (SQLite): DSN candidates queued with the messages that store them, and links.

``mark_dsn_candidates(conn, messages)`` runs inside the transaction that stores a batch of
retrieved messages and queues those that may be DSNs (``multipart/report`` in the header)
in ``dsn_candidates``. After the commit, the bounce service reads each candidate and calls
:meth:`SQLiteBounceRepository.link`, one transaction per DSN that deletes the candidate
row, sets ``bounce_of``, marks the reported recipients ``bounced`` and inserts the
``outgoing.bounced`` event: the candidate row is the "not processed yet" mark, so a DSN is
linked exactly once and one stored before a crash is linked after the restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import aiosqlite
import msgspec

from service.domain.bounces import (
    BouncedRecipient,
    BounceLink,
    DsnCandidate,
    StoredRecipient,
    bounced_event,
    match_recipients,
)
from service.domain.enums import RecipientStatus
from service.domain.outbox import OutgoingMessage, Recipient, RecipientBounce
from service.domain.retrievals import MessageSummary, NewMessage
from service.domain.time import from_text, to_text
from service.mail.dsn import may_be_dsn
from service.repository.database import Database
from service.repository.events import insert_events


async def mark_dsn_candidates(conn: aiosqlite.Connection, messages: Sequence[NewMessage]) -> None:
    """Queue the messages of a batch that may be DSNs, in the batch's transaction."""
    ids = [(m.summary.id,) for m in messages if may_be_dsn(m.raw)]
    if ids:
        await conn.executemany("INSERT OR IGNORE INTO dsn_candidates (message_id) VALUES (?)", ids)


class BounceRepository(Protocol):
    async def candidates(
        self, limit: int, *, account_id: str | None = None
    ) -> list[DsnCandidate]: ...
    async def raw(self, message_id: str) -> bytes | None: ...
    async def find_outgoing(
        self, account_id: str, envelope_id: str | None, message_ids: Sequence[str]
    ) -> str | None: ...
    async def link(
        self, candidate: DsnCandidate, link: BounceLink | None, at: datetime
    ) -> list[BouncedRecipient] | None: ...
    async def bounce_of(self, account_id: str, message_ids: Sequence[str]) -> dict[str, str]: ...


class SQLiteBounceRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def candidates(self, limit: int, *, account_id: str | None = None) -> list[DsnCandidate]:
        """DSN candidates not looked at yet (of one account, or of all), oldest first."""
        rows = await self._db.fetch_all(
            "SELECT c.message_id, m.account_id, a.tenant FROM dsn_candidates c"
            " JOIN messages m ON m.id = c.message_id JOIN accounts a ON a.id = m.account_id"
            " WHERE ?1 IS NULL OR m.account_id = ?1 ORDER BY c.message_id LIMIT ?2",
            (account_id, limit),
        )
        return [
            DsnCandidate(message_id=r["message_id"], account_id=r["account_id"], tenant=r["tenant"])
            for r in rows
        ]

    async def raw(self, message_id: str) -> bytes | None:
        row = await self._db.fetch_one(
            "SELECT raw FROM message_bodies WHERE message_id = ?", (message_id,)
        )
        return None if row is None else bytes(row[0])

    async def find_outgoing(
        self, account_id: str, envelope_id: str | None, message_ids: Sequence[str]
    ) -> str | None:
        """The account's outgoing message a DSN is about: the one whose id is the original
        envelope id, else the newest whose Message-ID is among ``message_ids`` (in order)."""
        if envelope_id:
            row = await self._db.fetch_one(
                "SELECT id FROM outbox WHERE id = ? AND account_id = ?", (envelope_id, account_id)
            )
            if row is not None:
                return str(row[0])
        for message_id in message_ids:
            row = await self._db.fetch_one(
                "SELECT id FROM outbox WHERE account_id = ? AND message_id = ?"
                " ORDER BY id DESC LIMIT 1",
                (account_id, message_id),
            )
            if row is not None:
                return str(row[0])
        return None

    async def link(
        self, candidate: DsnCandidate, link: BounceLink | None, at: datetime
    ) -> list[BouncedRecipient] | None:
        """Done with a candidate, in one transaction: the candidate row goes; with a
        ``link``, the DSN gets ``bounce_of``, the reported recipients ``bounced`` and an
        ``outgoing.bounced`` event is inserted (when any recipient changed). Returns the
        recipients marked, or None when the candidate was already done (elsewhere)."""
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "DELETE FROM dsn_candidates WHERE message_id = ?", (candidate.message_id,)
            )
            if cursor.rowcount == 0:
                return None
            if link is None:
                return []
            rows = await conn.execute_fetchall(
                "SELECT message_id FROM outbox WHERE id = ? AND account_id = ?",
                (link.outgoing_id, candidate.account_id),
            )
            header_id = next((str(r[0]) for r in rows), None)
            if header_id is None:  # deleted meanwhile
                return []
            await conn.execute(
                "UPDATE messages SET bounce_of = ? WHERE id = ?",
                (link.outgoing_id, candidate.message_id),
            )
            stored = [
                StoredRecipient(r["position"], r["address"], RecipientStatus(r["status"]))
                for r in await conn.execute_fetchall(
                    "SELECT position, address, status FROM outbox_recipients"
                    " WHERE outgoing_id = ? ORDER BY position",
                    (link.outgoing_id,),
                )
            ]
            bounced = match_recipients(stored, link.failed)
            if not bounced:
                return []
            await conn.executemany(
                "UPDATE outbox_recipients SET status = ?, bounce_status = ?,"
                " bounce_diagnostic = ?, bounce_remote_mta = ?, bounce_message = ?,"
                " bounced_at = ? WHERE outgoing_id = ? AND position = ?",
                [
                    (
                        RecipientStatus.BOUNCED.value,
                        b.report.status,
                        b.report.diagnostic_code,
                        b.report.remote_mta,
                        candidate.message_id,
                        to_text(at),
                        link.outgoing_id,
                        b.position,
                    )
                    for b in bounced
                ],
            )
            await conn.execute(
                "UPDATE outbox SET updated_at = ? WHERE id = ?", (to_text(at), link.outgoing_id)
            )
            await insert_events(
                conn,
                [
                    bounced_event(
                        tenant=candidate.tenant,
                        account_id=candidate.account_id,
                        outgoing_id=link.outgoing_id,
                        message_id=header_id,
                        dsn_message_id=candidate.message_id,
                        bounced=bounced,
                        at=at,
                    )
                ],
            )
            return bounced

    async def bounce_of(self, account_id: str, message_ids: Sequence[str]) -> dict[str, str]:
        """Stored message id -> the outgoing message it is a DSN about, for those linked."""
        if not message_ids:
            return {}
        rows = await self._db.fetch_all(
            "SELECT id, bounce_of FROM messages WHERE account_id = ? AND bounce_of IS NOT NULL"
            f" AND id IN ({', '.join('?' * len(message_ids))})",
            (account_id, *message_ids),
        )
        return {str(r[0]): str(r[1]) for r in rows}


async def with_bounces(db: Database, messages: list[OutgoingMessage]) -> list[OutgoingMessage]:
    """Outgoing messages with their bounces: each DSN linked to them and what a DSN said of
    each bounced recipient (one query for a page; most pages have none)."""
    if not messages:
        return messages
    ids = [m.id for m in messages]
    marks = ", ".join("?" * len(ids))
    rows = await db.fetch_all(
        "SELECT 0 AS kind, outgoing_id, position, bounce_status, bounce_diagnostic,"
        " bounce_remote_mta, bounce_message, bounced_at FROM outbox_recipients"
        f" WHERE outgoing_id IN ({marks}) AND bounced_at IS NOT NULL"
        " UNION ALL SELECT 1, bounce_of, NULL, NULL, NULL, NULL, id, NULL FROM messages"
        f" WHERE bounce_of IN ({marks})",
        (*ids, *ids),
    )
    return merge_bounces(
        messages,
        [
            (
                int(r[0]),
                str(r[1]),
                r[2],
                None
                if r[0]
                else RecipientBounce(
                    status=r[3],
                    diagnostic_code=r[4],
                    remote_mta=r[5],
                    message_id=r[6],
                    at=from_text(r[7]),
                ),
                str(r[6]),
            )
            for r in rows
        ],
    )


BounceRow = tuple[int, str, int | None, RecipientBounce | None, str]


def merge_bounces(
    messages: list[OutgoingMessage], rows: Sequence[BounceRow]
) -> list[OutgoingMessage]:
    """``rows``: (0, outgoing id, position, bounce, _) for a bounced recipient, (1, outgoing
    id, None, None, DSN message id) for a linked DSN."""
    if not rows:
        return messages
    recipient_bounces: dict[str, dict[int, RecipientBounce]] = {}
    dsns: dict[str, list[str]] = {}
    for kind, outgoing_id, position, bounce, message_id in rows:
        if kind == 0 and position is not None and bounce is not None:
            recipient_bounces.setdefault(outgoing_id, {})[position] = bounce
        elif kind == 1:
            dsns.setdefault(outgoing_id, []).append(message_id)
    merged: list[OutgoingMessage] = []
    for message in messages:
        marks = recipient_bounces.get(message.id)
        linked = dsns.get(message.id)
        if marks is None and linked is None:
            merged.append(message)
            continue
        recipients = [
            _with_bounce(r, marks.get(i)) if marks else r for i, r in enumerate(message.recipients)
        ]
        merged.append(
            msgspec.structs.replace(message, recipients=recipients, bounces=sorted(linked or []))
        )
    return merged


def _with_bounce(recipient: Recipient, bounce: RecipientBounce | None) -> Recipient:
    return recipient if bounce is None else msgspec.structs.replace(recipient, bounce=bounce)


def with_bounce_of(summaries: list[MessageSummary], links: dict[str, str]) -> list[MessageSummary]:
    """Message summaries with their ``bounce_of`` links filled in."""
    if not links:
        return summaries
    return [
        msgspec.structs.replace(s, bounce_of=links[s.id]) if s.id in links else s for s in summaries
    ]
