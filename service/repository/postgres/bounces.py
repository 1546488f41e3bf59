"""Bounces (PostgreSQL): as ``service.repository.bounces`` for SQLite.

Across replicas, a candidate is linked by whichever replica deletes its row first: the
DELETE takes the row's lock, so another replica's DELETE waits, then finds nothing and
leaves the DSN alone (linked once).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from service.domain.bounces import (
    BouncedRecipient,
    BounceLink,
    DsnCandidate,
    StoredRecipient,
    bounced_event,
    match_recipients,
)
from service.domain.enums import RecipientStatus
from service.domain.outbox import OutgoingMessage, RecipientBounce
from service.domain.retrievals import NewMessage
from service.mail.dsn import may_be_dsn
from service.repository.bounces import merge_bounces
from service.repository.postgres.database import PgDatabase, rowcount
from service.repository.postgres.events import insert_events


async def mark_dsn_candidates(conn: asyncpg.Connection, messages: Sequence[NewMessage]) -> None:
    """Queue the messages of a batch that may be DSNs, in the batch's transaction."""
    ids = [m.summary.id for m in messages if may_be_dsn(m.raw)]
    if ids:
        await conn.execute(
            "INSERT INTO dsn_candidates (message_id) SELECT unnest($1::text[])"
            " ON CONFLICT DO NOTHING",
            ids,
        )


class PgBounceRepository:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def candidates(self, limit: int, *, account_id: str | None = None) -> list[DsnCandidate]:
        """DSN candidates not looked at yet (of one account, or of all), oldest first."""
        rows = await self._db.fetch_all(
            "SELECT c.message_id, m.account_id, a.tenant FROM dsn_candidates c"
            " JOIN messages m ON m.id = c.message_id JOIN accounts a ON a.id = m.account_id"
            " WHERE $1::text IS NULL OR m.account_id = $1 ORDER BY c.message_id LIMIT $2",
            account_id,
            limit,
        )
        return [
            DsnCandidate(message_id=r["message_id"], account_id=r["account_id"], tenant=r["tenant"])
            for r in rows
        ]

    async def raw(self, message_id: str) -> bytes | None:
        row = await self._db.fetch_one(
            "SELECT raw FROM message_bodies WHERE message_id = $1", message_id
        )
        return None if row is None else bytes(row[0])

    async def find_outgoing(
        self, account_id: str, envelope_id: str | None, message_ids: Sequence[str]
    ) -> str | None:
        """The account's outgoing message a DSN is about: the one whose id is the original
        envelope id, else the newest whose Message-ID is among ``message_ids`` (in order)."""
        if envelope_id:
            found = await self._db.fetch_value(
                "SELECT id FROM outbox WHERE id = $1 AND account_id = $2", envelope_id, account_id
            )
            if found is not None:
                return str(found)
        for message_id in message_ids:
            found = await self._db.fetch_value(
                "SELECT id FROM outbox WHERE account_id = $1 AND message_id = $2"
                " ORDER BY id DESC LIMIT 1",
                account_id,
                message_id,
            )
            if found is not None:
                return str(found)
        return None

    async def link(
        self, candidate: DsnCandidate, link: BounceLink | None, at: datetime
    ) -> list[BouncedRecipient] | None:
        """As :meth:`service.repository.bounces.SQLiteBounceRepository.link`."""
        async with self._db.transaction() as conn:
            status = await conn.execute(
                "DELETE FROM dsn_candidates WHERE message_id = $1", candidate.message_id
            )
            if rowcount(status) == 0:
                return None
            if link is None:
                return []
            # Locked: a delivery outcome written at the same time waits for this link.
            header_id = await conn.fetchval(
                "SELECT message_id FROM outbox WHERE id = $1 AND account_id = $2 FOR UPDATE",
                link.outgoing_id,
                candidate.account_id,
            )
            if header_id is None:  # deleted meanwhile
                return []
            await conn.execute(
                "UPDATE messages SET bounce_of = $1 WHERE id = $2",
                link.outgoing_id,
                candidate.message_id,
            )
            stored = [
                StoredRecipient(r["position"], r["address"], RecipientStatus(r["status"]))
                for r in await conn.fetch(
                    "SELECT position, address, status FROM outbox_recipients"
                    " WHERE outgoing_id = $1 ORDER BY position",
                    link.outgoing_id,
                )
            ]
            bounced = match_recipients(stored, link.failed)
            if not bounced:
                return []
            await conn.executemany(
                "UPDATE outbox_recipients SET status = $1, bounce_status = $2,"
                " bounce_diagnostic = $3, bounce_remote_mta = $4, bounce_message = $5,"
                " bounced_at = $6 WHERE outgoing_id = $7 AND position = $8",
                [
                    (
                        RecipientStatus.BOUNCED.value,
                        b.report.status,
                        b.report.diagnostic_code,
                        b.report.remote_mta,
                        candidate.message_id,
                        at,
                        link.outgoing_id,
                        b.position,
                    )
                    for b in bounced
                ],
            )
            await conn.execute(
                "UPDATE outbox SET updated_at = $1 WHERE id = $2", at, link.outgoing_id
            )
            await insert_events(
                conn,
                [
                    bounced_event(
                        tenant=candidate.tenant,
                        account_id=candidate.account_id,
                        outgoing_id=link.outgoing_id,
                        message_id=str(header_id),
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
            "SELECT id, bounce_of FROM messages WHERE account_id = $1"
            " AND bounce_of IS NOT NULL AND id = ANY($2::text[])",
            account_id,
            list(message_ids),
        )
        return {str(r[0]): str(r[1]) for r in rows}


async def with_bounces(db: PgDatabase, messages: list[OutgoingMessage]) -> list[OutgoingMessage]:
    """Outgoing messages with their bounces (see ``service.repository.bounces``)."""
    if not messages:
        return messages
    ids = [m.id for m in messages]
    rows = await db.fetch_all(
        "SELECT 0 AS kind, outgoing_id, position, bounce_status, bounce_diagnostic,"
        " bounce_remote_mta, bounce_message, bounced_at FROM outbox_recipients"
        " WHERE outgoing_id = ANY($1::text[]) AND bounced_at IS NOT NULL"
        " UNION ALL SELECT 1, bounce_of, NULL, NULL, NULL, NULL, id, NULL FROM messages"
        " WHERE bounce_of = ANY($1::text[])",
        ids,
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
                    at=r[7],
                ),
                str(r[6]),
            )
            for r in rows
        ],
    )
