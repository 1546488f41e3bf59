"""The outbox on PostgreSQL: accepted messages, their bytes, recipients, attempts.

Acceptance commits before the 202 (every PostgreSQL commit is durable). Concurrent
acceptances share one transaction (group commit, as on SQLite): while one batch commits,
the requests that arrive queue up and go together in the next. Nothing is acknowledged
before its own commit has returned.

Several replicas share the table: ``claim`` takes due messages with
``SELECT ... FOR UPDATE SKIP LOCKED``, so two replicas never take the same message, and
holds them under a lease (``claimed_by``, ``lease_until``) that the worker renews. A
replica that dies leaves its leases to expire; whichever replica runs ``recover_expired``
then puts those messages back in the queue (sent again with the same Message-ID).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

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
from service.repository.batching import GroupCommit
from service.repository.errors import RepositoryError
from service.repository.outbox import (
    EXPIRED_CODE,
    GROUP_COMMIT_MAX,
    INTERRUPTED_DETAIL,
    RECOVERED_DETAIL,
    ExistingKey,
)
from service.repository.pages import Page
from service.repository.postgres.bounces import with_bounces
from service.repository.postgres.database import PgDatabase, Record, rowcount
from service.repository.postgres.events import emit_outgoing_outcomes, emit_outgoing_states

_COLUMNS = (
    "id, account_id, message_id, status, subject, size, idempotency_key, created_at,"
    " updated_at, next_attempt_at, sent_at, expires_at, attempt_count, last_error_code,"
    " last_error_detail, metadata, tags, send_at, thread_id"
)
_PAUSED = (
    "(SELECT smtp_pause_code IS NOT NULL FROM accounts WHERE id = outbox.account_id) AS paused"
)
_WAITING = [OutgoingStatus.QUEUED.value, OutgoingStatus.DEFERRED.value]
_OPEN_RECIPIENTS = [RecipientStatus.PENDING.value, RecipientStatus.DEFERRED.value]
_SENDING = OutgoingStatus.SENDING.value
# Back to the queue: never attempted -> queued, else deferred.
_REQUEUED = "CASE WHEN attempt_count = 0 THEN 'queued' ELSE 'deferred' END"
_INSERT_ATTEMPT = (
    "INSERT INTO outbox_attempts"
    " (outgoing_id, seq, at, outcome, smtp_code, smtp_message, error_code)"
    " SELECT $1::text, (SELECT count(*) + 1 FROM outbox_attempts WHERE outgoing_id = $1::text),"
    " $2::timestamptz, $3::text, $4::integer, $5::text, $6::text"
)


class PgOutboxRepository:
    """The outbox tables on a PostgreSQL pool."""

    def __init__(self, db: PgDatabase, *, group_commit_max: int = GROUP_COMMIT_MAX) -> None:
        self._db = db
        self._group_max = group_commit_max
        # A row that breaks a rule is retried alone with ON CONFLICT, which also settles a
        # key another replica committed meanwhile.
        self._accepting: GroupCommit[NewOutgoing, ExistingKey | None] = GroupCommit(
            self._insert_batch,
            max_batch=group_commit_max,
            commit_one=self._accept_one,
            name="outbox commit",
        )

    # -- acceptance (group commit) ----------------------------------------------------

    async def accept(self, message: NewOutgoing) -> ExistingKey | None:
        """Commit ``message``; return None, or the message its key already names.

        Returns only after the transaction holding ``message`` has committed. A cancelled
        caller does not undo the commit.
        """
        if self._group_max <= 1:
            return await self._accept_one(message)
        return await self._accepting.submit(message)

    async def _accept_one(self, message: NewOutgoing) -> ExistingKey | None:
        """One message in its own transaction; a key committed by anyone else (another
        replica too) is found by the insert itself (``ON CONFLICT``)."""
        async with self._db.transaction() as conn:
            inserted = await conn.fetchval(
                _INSERT_OUTBOX + " ON CONFLICT (account_id, idempotency_key) DO NOTHING"
                " RETURNING id",
                *_outbox_row(message),
            )
            if inserted is None:
                row = await conn.fetchrow(
                    "SELECT id, request_hash FROM outbox"
                    " WHERE account_id = $1 AND idempotency_key = $2",
                    message.account_id,
                    message.idempotency_key,
                )
                if row is None:  # pragma: no cover - the conflicting row cannot vanish
                    raise RepositoryError("idempotency key conflict without a row")
                return ExistingKey(row["id"], row["request_hash"])
            await _insert_parts(conn, [message])
        return None

    async def _insert_batch(self, messages: list[NewOutgoing]) -> list[ExistingKey | None]:
        results: list[ExistingKey | None] = []
        new: list[NewOutgoing] = []
        claimed_keys: dict[tuple[str, str], ExistingKey] = {}
        async with self._db.transaction() as conn:
            keyed = [(m.account_id, m.idempotency_key) for m in messages if m.idempotency_key]
            known_keys: dict[tuple[str, str], ExistingKey] = {}
            if keyed:
                for row in await conn.fetch(
                    "SELECT o.account_id, o.idempotency_key, o.id, o.request_hash"
                    " FROM outbox o JOIN unnest($1::text[], $2::text[]) AS k (a, key)"
                    " ON o.account_id = k.a AND o.idempotency_key = k.key",
                    [a for a, _ in keyed],
                    [k for _, k in keyed],
                ):
                    known_keys[(row["account_id"], row["idempotency_key"])] = ExistingKey(
                        row["id"], row["request_hash"]
                    )
            for message in messages:
                key = message.idempotency_key
                if key is not None:
                    # Two requests with one key in the same batch: the first one wins. A key
                    # another replica commits meanwhile breaks the unique rule: the batch is
                    # then retried one by one.
                    pair = (message.account_id, key)
                    known = claimed_keys.get(pair) or known_keys.get(pair)
                    if known is not None:
                        results.append(known)
                        continue
                    claimed_keys[pair] = ExistingKey(message.id, message.request_hash)
                results.append(None)
                new.append(message)
            if new:
                await conn.executemany(_INSERT_OUTBOX, [_outbox_row(m) for m in new])
                await _insert_parts(conn, new)
        return results

    async def find_key(self, account_id: str, key: str) -> ExistingKey | None:
        row = await self._db.fetch_one(
            "SELECT id, request_hash FROM outbox WHERE account_id = $1 AND idempotency_key = $2",
            account_id,
            key,
        )
        return None if row is None else ExistingKey(row["id"], row["request_hash"])

    async def thread_of(self, account_id: str, message_id: str) -> str | None:
        """The thread of the account's stored or sent message with this Message-ID (the
        oldest of each kind; a stored one first), None when it has neither."""
        value = await self._db.fetch_value(
            "SELECT coalesce("
            "(SELECT thread_id FROM messages WHERE account_id = $1 AND message_id = $2"
            " ORDER BY id LIMIT 1),"
            " (SELECT thread_id FROM outbox WHERE account_id = $1 AND message_id = $2"
            " ORDER BY id LIMIT 1))",
            account_id,
            message_id,
        )
        return None if value is None else str(value)

    # -- reading ------------------------------------------------------------------------

    async def get(self, account_id: str, outgoing_id: str) -> OutgoingMessage | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS}, {_PAUSED} FROM outbox WHERE id = $1 AND account_id = $2",
            outgoing_id,
            account_id,
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
        extra, extra_params = _filter_sql(where, first=5)
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS}, {_PAUSED} FROM outbox WHERE account_id = $1"
            f" AND ($2::text IS NULL OR status = $2) AND id < $3{extra}"
            " ORDER BY id DESC LIMIT $4",
            account_id,
            None if status is None else status.value,
            after or "~",
            limit + 1,
            *extra_params,
        )
        messages = await self._assemble(rows[:limit])
        more = len(rows) > limit and bool(messages)
        return Page(items=messages, next_after=messages[-1].id if more else None)

    async def _assemble(self, rows: Sequence[Record]) -> list[OutgoingMessage]:
        """Rows with their recipients and attempts (two queries for the whole page)."""
        if not rows:
            return []
        ids = [row["id"] for row in rows]
        recipients: dict[str, list[Recipient]] = {i: [] for i in ids}
        for r in await self._db.fetch_all(
            "SELECT outgoing_id, address, kind, status, smtp_code, smtp_message, name"
            " FROM outbox_recipients WHERE outgoing_id = ANY($1) ORDER BY outgoing_id, position",
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
            " FROM outbox_attempts WHERE outgoing_id = ANY($1) ORDER BY outgoing_id, seq",
            ids,
        ):
            attempts[a["outgoing_id"]].append(
                Attempt(
                    at=a["at"],
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
            " WHERE o.id = $1 AND o.account_id = $2",
            outgoing_id,
            account_id,
        )
        return None if row is None else bytes(row[0])

    # -- cancelling ---------------------------------------------------------------------

    async def cancel(self, account_id: str, outgoing_id: str, at: datetime) -> bool:
        """Cancel a queued or deferred message; False in any other state (one statement:
        a message a replica has claimed can never be cancelled behind its back)."""
        async with self._db.transaction() as conn:
            status = await conn.execute(
                "UPDATE outbox SET status = $1, updated_at = $2, next_attempt_at = NULL"
                " WHERE id = $3 AND account_id = $4 AND status = ANY($5)",
                OutgoingStatus.CANCELLED.value,
                at,
                outgoing_id,
                account_id,
                _WAITING,
            )
            return rowcount(status) > 0

    # -- delivery -----------------------------------------------------------------------

    async def recover_expired(self, now: datetime, *, everything: bool = False) -> int:
        """Messages whose claim expired (their replica died or lost the database) are due
        again ``now``, each with an ``interrupted`` attempt dated when it was taken.

        ``everything``: every ``sending`` message whatever its lease. A row with no lease
        counts as expired. Rows another replica is recovering right now are skipped.
        """
        async with self._db.transaction() as conn:
            rows = await conn.fetch(
                "SELECT id, updated_at FROM outbox WHERE status = $1"
                " AND ($2 OR lease_until IS NULL OR lease_until <= $3)"
                " ORDER BY id FOR UPDATE SKIP LOCKED",
                _SENDING,
                everything,
                now,
            )
            if not rows:
                return 0
            await conn.executemany(
                _INSERT_ATTEMPT,
                [
                    (
                        row["id"],
                        row["updated_at"],
                        AttemptOutcome.INTERRUPTED.value,
                        None,
                        None,
                        ErrorCode.INTERRUPTED.value,
                    )
                    for row in rows
                ],
            )
            status = await conn.execute(
                f"UPDATE outbox SET status = {_REQUEUED}, next_attempt_at = $1, updated_at = $1,"
                " last_error_code = $2, last_error_detail = $3, claimed_by = NULL,"
                " lease_until = NULL WHERE id = ANY($4)",
                now,
                ErrorCode.INTERRUPTED.value,
                RECOVERED_DETAIL,
                [row["id"] for row in rows],
            )
            return rowcount(status)

    async def interrupt(self, started: Mapping[str, datetime], at: datetime) -> None:
        """At a stop: sends cut short (message id -> when its attempt began) get an
        ``interrupted`` attempt and are due again ``at`` (not counted against the schedule).
        """
        if not started:
            return
        async with self._db.transaction() as conn:
            ids = [
                row["id"]
                for row in await conn.fetch(
                    "SELECT id FROM outbox WHERE id = ANY($1) AND status = $2 FOR UPDATE",
                    list(started),
                    _SENDING,
                )
            ]
            if not ids:
                return
            await conn.executemany(
                _INSERT_ATTEMPT,
                [
                    (
                        outgoing_id,
                        started[outgoing_id],
                        AttemptOutcome.INTERRUPTED.value,
                        None,
                        None,
                        ErrorCode.INTERRUPTED.value,
                    )
                    for outgoing_id in ids
                ],
            )
            await conn.execute(
                f"UPDATE outbox SET status = {_REQUEUED}, next_attempt_at = $1, updated_at = $1,"
                " last_error_code = $2, last_error_detail = $3, claimed_by = NULL,"
                " lease_until = NULL WHERE id = ANY($4)",
                at,
                ErrorCode.INTERRUPTED.value,
                INTERRUPTED_DETAIL,
                ids,
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
            " WHERE o.status = ANY($1) AND o.next_attempt_at <= $2"
            " AND a.smtp_pause_code IS NULL AND NOT (a.tenant = ANY($3))"
            " GROUP BY o.account_id, a.updated_at, a.tenant ORDER BY first LIMIT $4",
            _WAITING,
            now,
            sorted(exclude_tenants),
            limit,
        )
        return [
            DueAccount(row["account_id"], int(row["due"]), row["updated_at"], row["tenant"])
            for row in rows
        ]

    async def next_due(
        self, exclude: Collection[str], *, exclude_tenants: Collection[str] = ()
    ) -> datetime | None:
        """When the next waiting message falls due, leaving out ``exclude``d accounts,
        those of ``exclude_tenants`` and paused accounts."""
        value: datetime | None = await self._db.fetch_value(
            "SELECT min(o.next_attempt_at) FROM outbox o JOIN accounts a ON a.id = o.account_id"
            " WHERE o.status = ANY($1) AND a.smtp_pause_code IS NULL"
            " AND NOT (o.account_id = ANY($2)) AND NOT (a.tenant = ANY($3))",
            _WAITING,
            sorted(exclude),
            sorted(exclude_tenants),
        )
        return value

    async def claim(
        self, account_id: str, now: datetime, limit: int, *, owner: str, lease_until: datetime
    ) -> list[ClaimedMessage]:
        """Take up to ``limit`` due messages of the account (status ``sending``) for
        ``owner``, held until ``lease_until`` unless renewed.

        ``FOR UPDATE SKIP LOCKED``: rows another replica is claiming are passed over, so no
        message is taken twice. Bodies and recipients are read in the same transaction.
        """
        async with self._db.transaction() as conn:
            rows = await conn.fetch(
                "UPDATE outbox SET status = $1, updated_at = $2, claimed_by = $3,"
                " lease_until = $4 WHERE id IN ("
                " SELECT id FROM outbox WHERE account_id = $5 AND status = ANY($6)"
                " AND next_attempt_at <= $2 ORDER BY next_attempt_at, id LIMIT $7"
                " FOR UPDATE SKIP LOCKED)"
                " RETURNING id, message_id, mail_from, smtputf8, attempt_count, created_at,"
                " expires_at",
                _SENDING,
                now,
                owner,
                lease_until,
                account_id,
                _WAITING,
                limit,
            )
            if not rows:
                return []
            ids = [row["id"] for row in rows]
            bodies = {
                row["outgoing_id"]: bytes(row["raw"])
                for row in await conn.fetch(
                    "SELECT outgoing_id, raw FROM outbox_bodies WHERE outgoing_id = ANY($1)", ids
                )
            }
            recipients: dict[str, list[ClaimedRecipient]] = {i: [] for i in ids}
            for r in await conn.fetch(
                "SELECT outgoing_id, position, address, status FROM outbox_recipients"
                " WHERE outgoing_id = ANY($1) ORDER BY outgoing_id, position",
                ids,
            ):
                recipients[r["outgoing_id"]].append(
                    ClaimedRecipient(r["position"], r["address"], RecipientStatus(r["status"]))
                )
        return [
            ClaimedMessage(
                id=row["id"],
                account_id=account_id,
                message_id=row["message_id"],
                mail_from=row["mail_from"],
                smtputf8=row["smtputf8"],
                raw=bodies[row["id"]],
                attempt_count=row["attempt_count"],
                created_at=row["created_at"],
                expires_at=row["expires_at"],
                recipients=tuple(recipients[row["id"]]),
            )
            for row in sorted(rows, key=lambda row: str(row["id"]))
        ]

    async def renew(self, owner: str, outgoing_ids: Collection[str], lease_until: datetime) -> int:
        """Extend to ``lease_until`` the claims ``owner`` still holds among
        ``outgoing_ids``; return how many it still holds."""
        if not outgoing_ids:
            return 0
        async with self._db.transaction() as conn:
            status = await conn.execute(
                "UPDATE outbox SET lease_until = $1 WHERE status = $2 AND claimed_by = $3"
                " AND id = ANY($4)",
                lease_until,
                _SENDING,
                owner,
                list(outgoing_ids),
            )
            return rowcount(status)

    async def record(self, outcomes: Sequence[DeliveryOutcome]) -> None:
        """Write the outcomes of delivery work, all in one transaction."""
        if not outcomes:
            return
        async with self._db.transaction() as conn:
            await conn.executemany(
                "UPDATE outbox SET status = $1, updated_at = $2, next_attempt_at = $3,"
                " sent_at = coalesce($4, sent_at), attempt_count = attempt_count + $5,"
                " last_error_code = $6, last_error_detail = $7, claimed_by = NULL,"
                " lease_until = NULL WHERE id = $8",
                [
                    (
                        o.status.value,
                        o.at,
                        o.next_attempt_at,
                        o.sent_at,
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
                _INSERT_ATTEMPT + " WHERE EXISTS (SELECT 1 FROM outbox WHERE id = $1::text)",
                [
                    (
                        o.outgoing_id,
                        o.attempt.at,
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
                "UPDATE outbox_recipients SET status = $1, smtp_code = $2, smtp_message = $3"
                " WHERE outgoing_id = $4 AND position = $5",
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
        async with self._db.transaction() as conn:
            await conn.execute(
                f"UPDATE outbox SET status = {_REQUEUED}, next_attempt_at = $1, updated_at = $1,"
                " claimed_by = NULL, lease_until = NULL WHERE status = $2 AND id = ANY($3)",
                at,
                _SENDING,
                list(outgoing_ids),
            )

    async def expire_overdue(self, now: datetime) -> int:
        """Fail waiting messages past their lifetime (also those of paused accounts)."""
        async with self._db.transaction() as conn:
            rows = await conn.fetch(
                "UPDATE outbox SET status = $1, updated_at = $2, next_attempt_at = NULL,"
                " last_error_code = $3, last_error_detail = coalesce("
                " 'not delivered before the message expired; the last attempt: '"
                " || last_error_detail, 'not delivered before the message expired')"
                " WHERE status = ANY($4) AND expires_at <= $2 RETURNING id",
                OutgoingStatus.FAILED.value,
                now,
                EXPIRED_CODE.value,
                _WAITING,
            )
            ids = [row[0] for row in rows]
            if ids:
                await conn.execute(
                    "UPDATE outbox_recipients SET status = $1 WHERE outgoing_id = ANY($2)"
                    " AND status = ANY($3)",
                    RecipientStatus.FAILED.value,
                    ids,
                    _OPEN_RECIPIENTS,
                )
                await emit_outgoing_states(conn, ids)
            return len(ids)

    async def note_hold(self, account_id: str, error: OutgoingError, at: datetime) -> None:
        """Tell the account's waiting messages why they are not being sent (a paused
        account): their ``error`` shows the account-level failure."""
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE outbox SET last_error_code = $1, last_error_detail = $2, updated_at = $3"
                " WHERE account_id = $4 AND status = ANY($5)",
                error.code,
                error.detail,
                at,
                account_id,
                _WAITING,
            )


_INSERT_OUTBOX = (
    "INSERT INTO outbox (id, account_id, message_id, status, mail_from, subject, smtputf8,"
    " size, idempotency_key, request_hash, created_at, updated_at, next_attempt_at,"
    " expires_at, metadata, tags, send_at, thread_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,"
    " $9, $10, $11, $11, coalesce($15::timestamptz, $11::timestamptz), $12, $13::jsonb,"
    " $14::jsonb, $15, $16)"
)


def _filter_sql(where: OutboxFilter | None, *, first: int) -> tuple[str, list[Any]]:
    """`` AND ...`` conditions for ``where``, numbering parameters from ``$first``:
    jsonb containment (``@>``), which the GIN indexes answer."""
    if where is None:
        return "", []
    sql: list[str] = []
    params: list[Any] = []

    def param(value: Any) -> str:
        params.append(value)
        return f"${first + len(params) - 1}"

    if where.scheduled is not None and where.now is not None:
        mark = param(where.now)
        if where.scheduled:
            sql.append(f" AND send_at IS NOT NULL AND send_at > {mark}")
        else:
            sql.append(f" AND (send_at IS NULL OR send_at <= {mark})")
    for tag in where.tags:
        sql.append(f" AND tags @> {param(msgspec.json.encode([tag]).decode())}::jsonb")
    if where.metadata:
        wanted = msgspec.json.encode(dict(where.metadata)).decode()
        sql.append(f" AND metadata @> {param(wanted)}::jsonb")
    return "".join(sql), params


def _json_or_null(value: dict[str, str] | list[str]) -> str | None:
    return msgspec.json.encode(value).decode() if value else None


def _outbox_row(m: NewOutgoing) -> tuple[object, ...]:
    return (
        m.id,
        m.account_id,
        m.message_id,
        OutgoingStatus.QUEUED.value,
        m.mail_from,
        m.subject,
        m.smtputf8,
        len(m.raw),
        m.idempotency_key,
        m.request_hash,
        m.created_at,
        m.expires_at,
        _json_or_null(m.metadata),
        _json_or_null(m.tags),
        m.send_at,
        m.thread,
    )


async def _insert_parts(conn: Any, messages: list[NewOutgoing]) -> None:
    """Bodies and recipients of messages whose outbox rows were just inserted."""
    await conn.executemany(
        "INSERT INTO outbox_bodies (outgoing_id, raw) VALUES ($1, $2)",
        [(m.id, m.raw) for m in messages],
    )
    await conn.executemany(
        "INSERT INTO outbox_recipients (outgoing_id, position, address, kind, status, name)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (m.id, position, r.address, r.kind.value, RecipientStatus.PENDING.value, r.name)
            for m in messages
            for position, r in enumerate(m.recipients)
        ],
    )


def _message(row: Record, recipients: list[Recipient], attempts: list[Attempt]) -> OutgoingMessage:
    error = (
        None
        if row["last_error_code"] is None
        else OutgoingError(row["last_error_code"], row["last_error_detail"] or "")
    )
    status = OutgoingStatus(row["status"])
    # Paused: nothing will be tried until the account's settings change.
    waiting = status in (OutgoingStatus.QUEUED, OutgoingStatus.DEFERRED)
    return OutgoingMessage(
        id=row["id"],
        account_id=row["account_id"],
        message_id=row["message_id"],
        status=status,
        subject=row["subject"],
        size=row["size"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        next_attempt_at=None if waiting and row["paused"] else row["next_attempt_at"],
        sent_at=row["sent_at"],
        expires_at=row["expires_at"],
        attempt_count=row["attempt_count"],
        idempotency_key=row["idempotency_key"],
        recipients=recipients,
        attempts=attempts,
        error=error,
        metadata=msgspec.json.decode(row["metadata"], type=dict[str, str])
        if row["metadata"]
        else {},
        tags=msgspec.json.decode(row["tags"], type=list[str]) if row["tags"] else [],
        send_at=row["send_at"],
        thread_id=row["thread_id"],
    )
