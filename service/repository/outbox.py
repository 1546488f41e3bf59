"""The outbox: accepted messages, their exact bytes, recipients and delivery attempts.

Two kinds of writes, two durability levels (DESIGN.md):

- Acceptance (``accept``) acknowledges mail to a caller, so it commits with
  ``synchronous=FULL`` before the 202 is sent. Concurrent acceptances share one
  transaction and so one fsync (group commit): while one batch is being committed, the
  requests that arrive queue up and go together in the next. Nothing is acknowledged
  before its own commit has returned.
- Delivery progress (``claim``, ``record``) commits with ``synchronous=NORMAL``: after a
  power loss the last of these may roll back, and the worst that does is send a message
  again with the same Message-ID.

A message is taken for delivery by setting its status to ``sending`` (``claim``) under a
lease: ``claimed_by`` names the process (its owner id) and ``lease_until`` how long the
claim holds unless renewed (``renew``, from the worker's heartbeat). Only one process can
claim a message (the claim is one statement under the write lock). A process that stops
without writing the outcome leaves the message ``sending``; once its lease has expired,
whichever process runs ``recover_expired`` puts it back in the queue (a SQLite process at
start takes back every ``sending`` row: it is the only process of its file).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Protocol

import aiosqlite
import msgspec

from service.codes import ErrorCode
from service.domain.enums import OutgoingStatus, RecipientKind, RecipientStatus
from service.domain.outbox import (
    Attempt,
    AttemptOutcome,
    ClaimedMessage,
    ClaimedRecipient,
    DeliveryOutcome,
    DueAccount,
    NewOutgoing,
    OutboxFilter,
    OutgoingError,
    OutgoingMessage,
    Recipient,
)
from service.domain.time import from_text, opt_from_text, opt_to_text, to_text
from service.repository.batching import GroupCommit
from service.repository.bounces import with_bounces
from service.repository.database import Database
from service.repository.events import emit_outgoing_outcomes, emit_outgoing_states
from service.repository.pages import Page

logger = logging.getLogger("mailroom.outbox")

# Most acceptances committed in one transaction: bounds the time the write lock is held
# (and the memory of one batch) while still sharing one fsync among many requests.
GROUP_COMMIT_MAX = 256

_COLUMNS = (
    "id, account_id, message_id, status, subject, size, idempotency_key, created_at,"
    " updated_at, next_attempt_at, sent_at, expires_at, attempt_count, last_error_code,"
    " last_error_detail, metadata, tags, send_at, thread_id"
)
# Read with each message: a paused account's waiting messages have no next attempt.
_PAUSED = (
    "(SELECT smtp_pause_code IS NOT NULL FROM accounts WHERE id = outbox.account_id) AS paused"
)
_WAITING = (OutgoingStatus.QUEUED.value, OutgoingStatus.DEFERRED.value)
_OPEN_RECIPIENTS = (RecipientStatus.PENDING.value, RecipientStatus.DEFERRED.value)
EXPIRED_CODE = ErrorCode.EXPIRED
INTERRUPTED_DETAIL = (
    "the service stopped while this message was being sent (the server may have received"
    " it; it is sent again with the same Message-ID)"
)
RECOVERED_DETAIL = (
    "the service stopped while this message was taken for sending (the server may have"
    " received it; it is sent again with the same Message-ID)"
)


class ExistingKey(msgspec.Struct, frozen=True):
    """The message an idempotency key already names, with the hash of its request."""

    outgoing_id: str
    request_hash: str | None


class OutboxRepository(Protocol):
    async def accept(self, message: NewOutgoing) -> ExistingKey | None: ...
    async def find_key(self, account_id: str, key: str) -> ExistingKey | None: ...
    async def thread_of(self, account_id: str, message_id: str) -> str | None:
        """The thread of the account's stored or sent message with this Message-ID."""
        ...

    async def get(self, account_id: str, outgoing_id: str) -> OutgoingMessage | None: ...
    async def page(
        self,
        account_id: str,
        status: OutgoingStatus | None,
        *,
        after: str | None,
        limit: int,
        where: OutboxFilter | None = None,
    ) -> Page[OutgoingMessage]: ...
    async def raw(self, account_id: str, outgoing_id: str) -> bytes | None: ...
    async def cancel(self, account_id: str, outgoing_id: str, at: datetime) -> bool: ...
    async def recover_expired(self, now: datetime, *, everything: bool = False) -> int: ...
    async def interrupt(self, started: Mapping[str, datetime], at: datetime) -> None: ...
    async def due_accounts(
        self, now: datetime, limit: int, *, exclude_tenants: Collection[str] = ()
    ) -> list[DueAccount]: ...
    async def next_due(
        self, exclude: Collection[str], *, exclude_tenants: Collection[str] = ()
    ) -> datetime | None: ...
    async def claim(
        self, account_id: str, now: datetime, limit: int, *, owner: str, lease_until: datetime
    ) -> list[ClaimedMessage]: ...
    async def renew(
        self, owner: str, outgoing_ids: Collection[str], lease_until: datetime
    ) -> int: ...
    async def record(self, outcomes: Sequence[DeliveryOutcome]) -> None: ...
    async def release(self, outgoing_ids: Collection[str], at: datetime) -> None: ...
    async def expire_overdue(self, now: datetime) -> int: ...
    async def note_hold(self, account_id: str, error: OutgoingError, at: datetime) -> None: ...


class SQLiteOutboxRepository:
    """The outbox tables over the shared ``Database`` (one writer, one reader)."""

    def __init__(self, db: Database, *, group_commit_max: int = GROUP_COMMIT_MAX) -> None:
        self._db = db
        self._accepting: GroupCommit[NewOutgoing, ExistingKey | None] = GroupCommit(
            self._insert_batch, max_batch=group_commit_max, name="outbox commit"
        )

    # -- acceptance (durable, group commit) --------------------------------------------

    async def accept(self, message: NewOutgoing) -> ExistingKey | None:
        """Commit ``message`` durably; return None, or the message its key already names.

        Returns only after the transaction holding ``message`` has committed with
        ``synchronous=FULL``. A cancelled caller does not undo the commit.
        """
        return await self._accepting.submit(message)

    async def _insert_batch(self, messages: list[NewOutgoing]) -> list[ExistingKey | None]:
        results: list[ExistingKey | None] = []
        new: list[NewOutgoing] = []
        claimed_keys: dict[tuple[str, str], ExistingKey] = {}
        async with self._db.transaction(durable=True) as conn:
            for message in messages:
                key = message.idempotency_key
                if key is not None:
                    # Checked under the write lock, so no other acceptance can race it;
                    # two requests with one key in the same batch: the first one wins.
                    known = claimed_keys.get((message.account_id, key))
                    if known is None:
                        rows = await conn.execute_fetchall(
                            "SELECT id, request_hash FROM outbox"
                            " WHERE account_id = ? AND idempotency_key = ?",
                            (message.account_id, key),
                        )
                        row = next(iter(rows), None)
                        if row is not None:
                            known = ExistingKey(row["id"], row["request_hash"])
                    if known is not None:
                        results.append(known)
                        continue
                    claimed_keys[(message.account_id, key)] = ExistingKey(
                        message.id, message.request_hash
                    )
                results.append(None)
                new.append(message)
            if new:
                await _insert(conn, new)
        return results

    async def find_key(self, account_id: str, key: str) -> ExistingKey | None:
        row = await self._db.fetch_one(
            "SELECT id, request_hash FROM outbox WHERE account_id = ? AND idempotency_key = ?",
            (account_id, key),
        )
        return None if row is None else ExistingKey(row["id"], row["request_hash"])

    async def thread_of(self, account_id: str, message_id: str) -> str | None:
        """The thread of the account's stored or sent message with this Message-ID (the
        oldest of each kind; a stored one first), None when it has neither."""
        row = await self._db.fetch_one(
            "SELECT coalesce("
            "(SELECT thread_id FROM messages WHERE account_id = ?1 AND message_id = ?2"
            " ORDER BY id LIMIT 1),"
            " (SELECT thread_id FROM outbox WHERE account_id = ?1 AND message_id = ?2"
            " ORDER BY id LIMIT 1))",
            (account_id, message_id),
        )
        return None if row is None or row[0] is None else str(row[0])

    # -- reading -----------------------------------------------------------------------

    async def get(self, account_id: str, outgoing_id: str) -> OutgoingMessage | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS}, {_PAUSED} FROM outbox WHERE id = ? AND account_id = ?",
            (outgoing_id, account_id),
        )
        if row is None:
            return None
        [message] = await self._assemble([row])
        return message

    async def page(
        self,
        account_id: str,
        status: OutgoingStatus | None,
        *,
        after: str | None,
        limit: int,
        where: OutboxFilter | None = None,
    ) -> Page[OutgoingMessage]:
        """Newest first."""
        extra, extra_params = _filter_sql(where)
        if status is None:
            rows = await self._db.fetch_all(
                f"SELECT {_COLUMNS}, {_PAUSED} FROM outbox WHERE account_id = ? AND id < ?"
                f"{extra} ORDER BY id DESC LIMIT ?",
                (account_id, after or "~", *extra_params, limit + 1),
            )
        else:
            rows = await self._db.fetch_all(
                f"SELECT {_COLUMNS}, {_PAUSED} FROM outbox WHERE account_id = ? AND status = ?"
                f" AND id < ?{extra} ORDER BY id DESC LIMIT ?",
                (account_id, status.value, after or "~", *extra_params, limit + 1),
            )
        messages = await self._assemble(rows[:limit])
        more = len(rows) > limit and bool(messages)
        return Page(items=messages, next_after=messages[-1].id if more else None)

    async def _assemble(self, rows: Sequence[sqlite3.Row]) -> list[OutgoingMessage]:
        """Rows with their recipients and attempts (two queries for the whole page)."""
        if not rows:
            return []
        ids = [row["id"] for row in rows]
        marks = ", ".join("?" * len(ids))
        recipients: dict[str, list[Recipient]] = {i: [] for i in ids}
        for r in await self._db.fetch_all(
            "SELECT outgoing_id, address, kind, status, smtp_code, smtp_message, name"
            f" FROM outbox_recipients WHERE outgoing_id IN ({marks})"
            " ORDER BY outgoing_id, position",
            ids,
        ):
            recipients[r["outgoing_id"]].append(
                Recipient(
                    address=r["address"],
                    name=r["name"],
                    kind=RecipientKind(r["kind"]),
                    status=RecipientStatus(r["status"]),
                    smtp_code=r["smtp_code"],
                    smtp_message=r["smtp_message"],
                )
            )
        attempts: dict[str, list[Attempt]] = {i: [] for i in ids}
        for a in await self._db.fetch_all(
            "SELECT outgoing_id, at, outcome, smtp_code, smtp_message, error_code"
            f" FROM outbox_attempts WHERE outgoing_id IN ({marks}) ORDER BY outgoing_id, seq",
            ids,
        ):
            attempts[a["outgoing_id"]].append(
                Attempt(
                    at=from_text(a["at"]),
                    outcome=AttemptOutcome(a["outcome"]),
                    smtp_code=a["smtp_code"],
                    smtp_message=a["smtp_message"],
                    error_code=a["error_code"],
                )
            )
        messages = [_message(row, recipients[row["id"]], attempts[row["id"]]) for row in rows]
        return await with_bounces(self._db, messages)

    async def raw(self, account_id: str, outgoing_id: str) -> bytes | None:
        row = await self._db.fetch_one(
            "SELECT b.raw FROM outbox_bodies b JOIN outbox o ON o.id = b.outgoing_id"
            " WHERE o.id = ? AND o.account_id = ?",
            (outgoing_id, account_id),
        )
        return None if row is None else bytes(row[0])

    # -- cancelling --------------------------------------------------------------------

    async def cancel(self, account_id: str, outgoing_id: str, at: datetime) -> bool:
        """Cancel a queued or deferred message; False if it is in any other state.

        The check and the change are one statement under the write lock, so a message
        the worker has claimed (``sending``) can never be cancelled behind its back.
        """
        async with self._db.transaction(durable=True) as conn:
            cursor = await conn.execute(
                "UPDATE outbox SET status = ?, updated_at = ?, next_attempt_at = NULL"
                " WHERE id = ? AND account_id = ? AND status IN (?, ?)",
                (OutgoingStatus.CANCELLED.value, to_text(at), outgoing_id, account_id, *_WAITING),
            )
            return cursor.rowcount > 0

    # -- delivery ----------------------------------------------------------------------

    async def recover_expired(self, now: datetime, *, everything: bool = False) -> int:
        """Messages whose claim expired (their process stopped or lost touch) are due again.

        ``everything``: every ``sending`` message, whatever its lease (a process at start
        that is the only one on its store). One of them may have reached the server before
        the stop: it is sent again, with the same Message-ID (at least once, never lost).
        Each gets an ``interrupted`` attempt dated when it was taken, so its history shows
        what happened. A row with no lease (claimed before leases existed) counts as expired.
        """
        expired = "" if everything else " AND (lease_until IS NULL OR lease_until <= ?)"
        params: tuple[str, ...] = () if everything else (to_text(now),)
        # Looked for on the reader first: the periodic sweep mostly finds nothing, and then
        # takes no write lock.
        found = await self._db.fetch_one(
            f"SELECT 1 FROM outbox WHERE status = ?{expired} LIMIT 1",
            (OutgoingStatus.SENDING.value, *params),
        )
        if found is None:
            return 0
        async with self._db.transaction(durable=True) as conn:
            # Under the write lock, both statements see the same rows.
            await conn.execute(
                "INSERT INTO outbox_attempts"
                " (outgoing_id, seq, at, outcome, smtp_code, smtp_message, error_code)"
                " SELECT o.id, (SELECT count(*) + 1 FROM outbox_attempts a"
                " WHERE a.outgoing_id = o.id), o.updated_at, ?, NULL, NULL, ?"
                f" FROM outbox o WHERE o.status = ?{expired}",
                (
                    AttemptOutcome.INTERRUPTED.value,
                    ErrorCode.INTERRUPTED.value,
                    OutgoingStatus.SENDING.value,
                    *params,
                ),
            )
            cursor = await conn.execute(
                "UPDATE outbox SET status = CASE WHEN attempt_count = 0 THEN ? ELSE ? END,"
                " next_attempt_at = ?, updated_at = ?, last_error_code = ?,"
                " last_error_detail = ?, claimed_by = NULL, lease_until = NULL"
                f" WHERE status = ?{expired}",
                (
                    *_WAITING,
                    to_text(now),
                    to_text(now),
                    ErrorCode.INTERRUPTED.value,
                    RECOVERED_DETAIL,
                    OutgoingStatus.SENDING.value,
                    *params,
                ),
            )
            return cursor.rowcount

    async def interrupt(self, started: Mapping[str, datetime], at: datetime) -> None:
        """At a stop: sends cut short (``started``: message id -> when its attempt began)
        get an ``interrupted`` attempt and are due again ``at``.

        The attempt does not count against the retry schedule: the server did not fail.
        """
        if not started:
            return
        ids = list(started)
        async with self._db.transaction(durable=True) as conn:
            await conn.executemany(
                "INSERT INTO outbox_attempts"
                " (outgoing_id, seq, at, outcome, smtp_code, smtp_message, error_code)"
                " SELECT ?1, (SELECT count(*) + 1 FROM outbox_attempts WHERE outgoing_id = ?1),"
                " ?2, ?3, NULL, NULL, ?4"
                " WHERE EXISTS (SELECT 1 FROM outbox WHERE id = ?1 AND status = ?5)",
                [
                    (
                        outgoing_id,
                        to_text(when),
                        AttemptOutcome.INTERRUPTED.value,
                        ErrorCode.INTERRUPTED.value,
                        OutgoingStatus.SENDING.value,
                    )
                    for outgoing_id, when in started.items()
                ],
            )
            await conn.execute(
                "UPDATE outbox SET status = CASE WHEN attempt_count = 0 THEN ? ELSE ? END,"
                " next_attempt_at = ?, updated_at = ?, last_error_code = ?, last_error_detail = ?,"
                " claimed_by = NULL, lease_until = NULL"
                f" WHERE status = ? AND id IN ({', '.join('?' * len(ids))})",
                (
                    *_WAITING,
                    to_text(at),
                    to_text(at),
                    ErrorCode.INTERRUPTED.value,
                    INTERRUPTED_DETAIL,
                    OutgoingStatus.SENDING.value,
                    *ids,
                ),
            )

    async def due_accounts(
        self, now: datetime, limit: int, *, exclude_tenants: Collection[str] = ()
    ) -> list[DueAccount]:
        """Accounts with messages due now, oldest due first; paused ones and those of
        ``exclude_tenants`` left out."""
        rows = await self._db.fetch_all(
            "SELECT o.account_id, count(*) AS due, a.updated_at, a.tenant,"
            " min(o.next_attempt_at) AS first"
            " FROM outbox o JOIN accounts a ON a.id = o.account_id"
            " WHERE o.status IN (?, ?) AND o.next_attempt_at <= ?"
            " AND a.smtp_pause_code IS NULL"
            " AND a.tenant NOT IN (SELECT value FROM json_each(?))"
            " GROUP BY o.account_id ORDER BY first LIMIT ?",
            (*_WAITING, to_text(now), _json_list(exclude_tenants), limit),
        )
        return [
            DueAccount(
                row["account_id"], int(row["due"]), from_text(row["updated_at"]), row["tenant"]
            )
            for row in rows
        ]

    async def next_due(
        self, exclude: Collection[str], *, exclude_tenants: Collection[str] = ()
    ) -> datetime | None:
        """When the next waiting message falls due, leaving out ``exclude``d accounts,
        those of ``exclude_tenants`` and paused accounts."""
        row = await self._db.fetch_one(
            "SELECT min(o.next_attempt_at) FROM outbox o JOIN accounts a ON a.id = o.account_id"
            " WHERE o.status IN (?, ?) AND a.smtp_pause_code IS NULL"
            " AND o.account_id NOT IN (SELECT value FROM json_each(?))"
            " AND a.tenant NOT IN (SELECT value FROM json_each(?))",
            (*_WAITING, _json_list(exclude), _json_list(exclude_tenants)),
        )
        return None if row is None or row[0] is None else from_text(row[0])

    async def claim(
        self, account_id: str, now: datetime, limit: int, *, owner: str, lease_until: datetime
    ) -> list[ClaimedMessage]:
        """Take up to ``limit`` due messages of the account (status ``sending``) for
        ``owner``, held until ``lease_until`` unless renewed.

        One statement under the write lock: two owners never take the same message.
        Bodies and recipients are read in the same transaction, so a failure leaves no
        message taken without the worker knowing it.
        """
        async with self._db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "UPDATE outbox SET status = ?, updated_at = ?, claimed_by = ?, lease_until = ?"
                " WHERE id IN ("
                " SELECT id FROM outbox WHERE account_id = ? AND status IN (?, ?)"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?)"
                " RETURNING id, message_id, mail_from, smtputf8, attempt_count, created_at,"
                " expires_at",
                (
                    OutgoingStatus.SENDING.value,
                    to_text(now),
                    owner,
                    to_text(lease_until),
                    account_id,
                    *_WAITING,
                    to_text(now),
                    limit,
                ),
            )
            if not rows:
                return []
            ids = [row["id"] for row in rows]
            marks = ", ".join("?" * len(ids))
            bodies = {
                row["outgoing_id"]: bytes(row["raw"])
                for row in await conn.execute_fetchall(
                    f"SELECT outgoing_id, raw FROM outbox_bodies WHERE outgoing_id IN ({marks})",
                    ids,
                )
            }
            recipients: dict[str, list[ClaimedRecipient]] = {i: [] for i in ids}
            for r in await conn.execute_fetchall(
                "SELECT outgoing_id, position, address, status FROM outbox_recipients"
                f" WHERE outgoing_id IN ({marks}) ORDER BY outgoing_id, position",
                ids,
            ):
                recipients[r["outgoing_id"]].append(
                    ClaimedRecipient(r["position"], r["address"], RecipientStatus(r["status"]))
                )
        # Sorted: RETURNING gives rows in no promised order.
        return [
            ClaimedMessage(
                id=row["id"],
                account_id=account_id,
                message_id=row["message_id"],
                mail_from=row["mail_from"],
                smtputf8=bool(row["smtputf8"]),
                raw=bodies[row["id"]],
                attempt_count=row["attempt_count"],
                created_at=from_text(row["created_at"]),
                expires_at=from_text(row["expires_at"]),
                recipients=tuple(recipients[row["id"]]),
            )
            for row in sorted(rows, key=lambda row: str(row["id"]))
        ]

    async def renew(self, owner: str, outgoing_ids: Collection[str], lease_until: datetime) -> int:
        """Extend to ``lease_until`` the claims ``owner`` still holds among ``outgoing_ids``;
        return how many it still holds (a claim that expired and was taken back is not)."""
        if not outgoing_ids:
            return 0
        ids = list(outgoing_ids)
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE outbox SET lease_until = ? WHERE status = ? AND claimed_by = ?"
                f" AND id IN ({', '.join('?' * len(ids))})",
                (to_text(lease_until), OutgoingStatus.SENDING.value, owner, *ids),
            )
            return cursor.rowcount

    async def record(self, outcomes: Sequence[DeliveryOutcome]) -> None:
        """Write the outcomes of delivery work, all in one (non-durable) transaction."""
        if not outcomes:
            return
        async with self._db.transaction() as conn:
            await conn.executemany(
                "UPDATE outbox SET status = ?, updated_at = ?, next_attempt_at = ?,"
                " sent_at = coalesce(?, sent_at), attempt_count = attempt_count + ?,"
                " last_error_code = ?, last_error_detail = ?, claimed_by = NULL,"
                " lease_until = NULL WHERE id = ?",
                [
                    (
                        o.status.value,
                        to_text(o.at),
                        opt_to_text(o.next_attempt_at),
                        opt_to_text(o.sent_at),
                        1 if o.count_attempt else 0,
                        o.error.code if o.error else None,
                        o.error.detail if o.error else None,
                        o.outgoing_id,
                    )
                    for o in outcomes
                ],
            )
            # WHERE EXISTS: the account (and with it the message) may have been deleted
            # while it was being sent; its attempt then has nowhere to go.
            await conn.executemany(
                "INSERT INTO outbox_attempts"
                " (outgoing_id, seq, at, outcome, smtp_code, smtp_message, error_code)"
                " SELECT ?1, (SELECT count(*) + 1 FROM outbox_attempts WHERE outgoing_id = ?1),"
                " ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM outbox WHERE id = ?1)",
                [
                    (
                        o.outgoing_id,
                        to_text(o.attempt.at),
                        o.attempt.outcome.value,
                        o.attempt.smtp_code,
                        o.attempt.smtp_message,
                        o.attempt.error_code,
                    )
                    for o in outcomes
                    if o.attempt is not None
                ],
            )
            await conn.executemany(
                "UPDATE outbox_recipients SET status = ?, smtp_code = ?, smtp_message = ?"
                " WHERE outgoing_id = ? AND position = ?",
                [
                    (r.status.value, r.smtp_code, r.smtp_message, o.outgoing_id, r.position)
                    for o in outcomes
                    for r in o.recipients
                ],
            )
            await emit_outgoing_outcomes(conn, outcomes)

    async def release(self, outgoing_ids: Collection[str], at: datetime) -> None:
        """Give back claimed messages that were not attempted (due again at ``at``)."""
        if not outgoing_ids:
            return
        ids = list(outgoing_ids)
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE outbox SET status = CASE WHEN attempt_count = 0 THEN ? ELSE ? END,"
                " next_attempt_at = ?, updated_at = ?, claimed_by = NULL, lease_until = NULL"
                f" WHERE status = ? AND id IN ({', '.join('?' * len(ids))})",
                (*_WAITING, to_text(at), to_text(at), OutgoingStatus.SENDING.value, *ids),
            )

    async def expire_overdue(self, now: datetime) -> int:
        """Fail waiting messages past their lifetime (also those of paused accounts)."""
        async with self._db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "UPDATE outbox SET status = ?, updated_at = ?, next_attempt_at = NULL,"
                " last_error_code = ?, last_error_detail = coalesce("
                " 'not delivered before the message expired; the last attempt: '"
                " || last_error_detail, 'not delivered before the message expired')"
                " WHERE status IN (?, ?) AND expires_at <= ? RETURNING id",
                (
                    OutgoingStatus.FAILED.value,
                    to_text(now),
                    EXPIRED_CODE,
                    *_WAITING,
                    to_text(now),
                ),
            )
            ids = [row[0] for row in rows]
            if ids:
                await _fail_open_recipients(conn, ids)
                await emit_outgoing_states(conn, ids)
            return len(ids)

    async def note_hold(self, account_id: str, error: OutgoingError, at: datetime) -> None:
        """Tell the account's waiting messages why they are not being sent (a paused
        account): their ``error`` shows the account-level failure."""
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE outbox SET last_error_code = ?, last_error_detail = ?, updated_at = ?"
                " WHERE account_id = ? AND status IN (?, ?)",
                (error.code, error.detail, to_text(at), account_id, *_WAITING),
            )


def _filter_sql(where: OutboxFilter | None) -> tuple[str, list[str]]:
    """`` AND ...`` conditions and their parameters for ``where`` (metadata and tags are
    JSON columns, searched with json_each/json_extract within the account's rows)."""
    if where is None:
        return "", []
    sql: list[str] = []
    params: list[str] = []
    if where.scheduled is not None and where.now is not None:
        if where.scheduled:
            sql.append(" AND send_at IS NOT NULL AND send_at > ?")
        else:
            sql.append(" AND (send_at IS NULL OR send_at <= ?)")
        params.append(to_text(where.now))
    for tag in where.tags:
        sql.append(" AND EXISTS (SELECT 1 FROM json_each(outbox.tags) WHERE value = ?)")
        params.append(tag)
    for key, value in where.metadata:
        # The key is a checked name (letters, digits, `_ . : -`): quoted as a JSON path.
        sql.append(" AND json_extract(outbox.metadata, ?) = ?")
        params += [f'$."{key}"', value]
    return "".join(sql), params


def _json_list(values: Collection[str]) -> str:
    return msgspec.json.encode(sorted(values)).decode()


async def _insert(conn: aiosqlite.Connection, messages: list[NewOutgoing]) -> None:
    await conn.executemany(
        "INSERT INTO outbox (id, account_id, message_id, status, mail_from, subject, smtputf8,"
        " size, idempotency_key, request_hash, created_at, updated_at, next_attempt_at,"
        " expires_at, metadata, tags, send_at, thread_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                m.id,
                m.account_id,
                m.message_id,
                OutgoingStatus.QUEUED.value,
                m.mail_from,
                m.subject,
                int(m.smtputf8),
                len(m.raw),
                m.idempotency_key,
                m.request_hash,
                to_text(m.created_at),
                to_text(m.created_at),
                to_text(m.due_at),
                to_text(m.expires_at),
                _json_or_null(m.metadata),
                _json_or_null(m.tags),
                opt_to_text(m.send_at),
                m.thread,
            )
            for m in messages
        ],
    )
    await conn.executemany(
        "INSERT INTO outbox_bodies (outgoing_id, raw) VALUES (?, ?)",
        [(m.id, m.raw) for m in messages],
    )
    await conn.executemany(
        "INSERT INTO outbox_recipients (outgoing_id, position, address, kind, status, name)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [
            (m.id, position, r.address, r.kind.value, RecipientStatus.PENDING.value, r.name)
            for m in messages
            for position, r in enumerate(m.recipients)
        ],
    )


def _json_or_null(value: dict[str, str] | list[str]) -> str | None:
    return msgspec.json.encode(value).decode() if value else None


def _decode_metadata(text: str | None) -> dict[str, str]:
    return msgspec.json.decode(text, type=dict[str, str]) if text else {}


def _decode_tags(text: str | None) -> list[str]:
    return msgspec.json.decode(text, type=list[str]) if text else []


async def _fail_open_recipients(conn: aiosqlite.Connection, ids: Iterable[str]) -> None:
    id_list = list(ids)
    await conn.execute(
        f"UPDATE outbox_recipients SET status = ? WHERE outgoing_id IN"
        f" ({', '.join('?' * len(id_list))}) AND status IN (?, ?)",
        (RecipientStatus.FAILED.value, *id_list, *_OPEN_RECIPIENTS),
    )


def _message(
    row: sqlite3.Row, recipients: list[Recipient], attempts: list[Attempt]
) -> OutgoingMessage:
    error = (
        None
        if row["last_error_code"] is None
        else OutgoingError(row["last_error_code"], row["last_error_detail"] or "")
    )
    status = OutgoingStatus(row["status"])
    # Paused: nothing will be tried until the account's settings change.
    waiting = status in (OutgoingStatus.QUEUED, OutgoingStatus.DEFERRED)
    next_attempt_at = None if waiting and row["paused"] else opt_from_text(row["next_attempt_at"])
    return OutgoingMessage(
        id=row["id"],
        account_id=row["account_id"],
        message_id=row["message_id"],
        status=status,
        subject=row["subject"],
        size=row["size"],
        created_at=from_text(row["created_at"]),
        updated_at=from_text(row["updated_at"]),
        next_attempt_at=next_attempt_at,
        sent_at=opt_from_text(row["sent_at"]),
        expires_at=from_text(row["expires_at"]),
        attempt_count=row["attempt_count"],
        idempotency_key=row["idempotency_key"],
        recipients=recipients,
        attempts=attempts,
        error=error,
        metadata=_decode_metadata(row["metadata"]),
        tags=_decode_tags(row["tags"]),
        send_at=opt_from_text(row["send_at"]),
        thread_id=row["thread_id"],
    )
