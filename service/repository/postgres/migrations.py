"""Versioned schema migrations for PostgreSQL, applied at start under an advisory lock.

The tables and columns are those of the SQLite store (so a store can be copied table by
table), with native types where they help: ``timestamptz`` for times, ``boolean``,
``bytea`` for raw messages, ``bigint`` for sizes. Ids are compared byte-wise
(``COLLATE "C"``) so keyset pages order exactly as on SQLite. The JSON address lists stay
text, as on SQLite.

Versions follow the SQLite store's numbering: a PostgreSQL database starts at version 5,
the SQLite schema of the same content, so one number means one schema on both stores.
Append new versions; never edit one that has shipped.
"""

from __future__ import annotations

from typing import Any

from service.repository.errors import SchemaTooNewError

# Any constant of our own: replicas starting together take this lock in turn, so only the
# first migrates; the others find the schema current.
ADVISORY_LOCK_KEY = 0x4D61696C726F6F6D  # "Mailroom"
# A migration may rewrite big tables: it is not bound by the per-statement timeout.
MIGRATION_TIMEOUT_S = 3600.0

V5_SCHEMA = """
CREATE TABLE api_keys (
    id text COLLATE "C" PRIMARY KEY,
    tenant text NOT NULL,
    key_hash text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL
);
CREATE TABLE accounts (
    id text COLLATE "C" PRIMARY KEY,
    tenant text NOT NULL,
    name text NOT NULL,
    email text NOT NULL,
    display_name text,
    in_host text NOT NULL,
    in_port integer NOT NULL,
    in_security text NOT NULL,
    in_username text NOT NULL,
    in_password text NOT NULL,
    out_host text NOT NULL,
    out_port integer NOT NULL,
    out_security text NOT NULL,
    out_username text,
    out_password text,
    out_allow_insecure_auth boolean NOT NULL DEFAULT false,
    leave_on_server boolean NOT NULL DEFAULT true,
    delete_after_days integer,
    max_message_bytes bigint,
    poll_interval_minutes integer,
    smtp_auth_failed_at timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    login_delay_s integer,
    smtp_pause_code text,
    smtp_pause_detail text,
    smtp_paused_at timestamptz
);
CREATE INDEX accounts_tenant ON accounts (tenant, id);

CREATE TABLE retrievals (
    id text COLLATE "C" PRIMARY KEY,
    account_id text COLLATE "C" NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    trigger text NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    messages_on_server integer,
    messages_downloaded integer NOT NULL DEFAULT 0,
    bytes_downloaded bigint NOT NULL DEFAULT 0,
    messages_deleted integer NOT NULL DEFAULT 0,
    messages_skipped integer NOT NULL DEFAULT 0,
    error_code text,
    error_detail text,
    owner text,
    lease_until timestamptz
);
CREATE INDEX retrievals_account ON retrievals (account_id, id);
-- Never two retrievals of one account at once, whichever replica runs them.
CREATE UNIQUE INDEX retrievals_one_active ON retrievals (account_id)
    WHERE status IN ('queued', 'running');
CREATE INDEX retrievals_account_created ON retrievals (account_id, created_at);

CREATE TABLE messages (
    id text COLLATE "C" PRIMARY KEY,
    account_id text COLLATE "C" NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    uidl text NOT NULL,
    size bigint NOT NULL,
    retrieved_at timestamptz NOT NULL,
    message_id text,
    from_addr text,
    to_json text NOT NULL,
    cc_json text NOT NULL,
    subject text,
    date timestamptz,
    has_attachments boolean NOT NULL,
    UNIQUE (account_id, uidl)
);
CREATE INDEX messages_account ON messages (account_id, id);
CREATE TABLE message_bodies (
    message_id text COLLATE "C" PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    raw bytea NOT NULL
);
-- Mail is mostly compressed already (attachments): not worth the CPU of compressing.
ALTER TABLE message_bodies ALTER COLUMN raw SET STORAGE EXTERNAL;
CREATE TABLE server_messages (
    account_id text COLLATE "C" NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    uidl text NOT NULL,
    state text NOT NULL,
    size bigint NOT NULL,
    seen_at timestamptz NOT NULL,
    PRIMARY KEY (account_id, uidl)
);

CREATE TABLE outbox (
    id text COLLATE "C" PRIMARY KEY,
    account_id text COLLATE "C" NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    message_id text NOT NULL,
    status text NOT NULL,
    mail_from text NOT NULL,
    subject text NOT NULL,
    smtputf8 boolean NOT NULL DEFAULT false,
    size bigint NOT NULL,
    idempotency_key text,
    request_hash text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    next_attempt_at timestamptz,
    sent_at timestamptz,
    expires_at timestamptz NOT NULL,
    attempt_count integer NOT NULL DEFAULT 0,
    last_error_code text,
    last_error_detail text,
    claimed_by text,
    lease_until timestamptz,
    UNIQUE (account_id, idempotency_key)
);
CREATE INDEX outbox_account ON outbox (account_id, id);
CREATE INDEX outbox_account_status ON outbox (account_id, status, id);
CREATE INDEX outbox_due ON outbox (account_id, next_attempt_at)
    WHERE status IN ('queued', 'deferred');
CREATE INDEX outbox_waiting ON outbox (next_attempt_at)
    WHERE status IN ('queued', 'deferred');
CREATE INDEX outbox_sending ON outbox (lease_until) WHERE status = 'sending';
CREATE TABLE outbox_bodies (
    outgoing_id text COLLATE "C" PRIMARY KEY REFERENCES outbox (id) ON DELETE CASCADE,
    raw bytea NOT NULL
);
ALTER TABLE outbox_bodies ALTER COLUMN raw SET STORAGE EXTERNAL;
CREATE TABLE outbox_recipients (
    outgoing_id text COLLATE "C" NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    position integer NOT NULL,
    address text NOT NULL,
    kind text NOT NULL,
    status text NOT NULL,
    smtp_code integer,
    smtp_message text,
    PRIMARY KEY (outgoing_id, position)
);
CREATE TABLE outbox_attempts (
    outgoing_id text COLLATE "C" NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    seq integer NOT NULL,
    at timestamptz NOT NULL,
    outcome text NOT NULL,
    smtp_code integer,
    smtp_message text,
    error_code text,
    PRIMARY KEY (outgoing_id, seq)
)
"""

V6_MESSAGE_FILTERS = """
-- Substring filters (subject, from, to, q) through trigram GIN indexes on the lowered
-- text (pg_trgm ships with PostgreSQL's contrib); CREATE INDEX fills them from the rows.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX messages_subject_trgm ON messages USING gin (lower(subject) gin_trgm_ops);
CREATE INDEX messages_from_trgm ON messages USING gin (lower(from_addr) gin_trgm_ops);
CREATE INDEX messages_to_trgm ON messages USING gin (lower(to_json) gin_trgm_ops);
-- since: the messages retrieved after a time; has_attachments: newest first among them.
CREATE INDEX messages_retrieved ON messages (account_id, retrieved_at);
CREATE INDEX messages_attachments ON messages (account_id, has_attachments, id)
"""

V7_POLL_SCHEDULE = """
-- The poll schedule kept per account (as on SQLite): when its next scheduled poll is due;
-- NULL: polling off, or not scheduled yet. Replicas claim due accounts with SKIP LOCKED.
ALTER TABLE accounts ADD COLUMN next_poll_at timestamptz;
UPDATE accounts a SET next_poll_at = coalesce(r.finished_at, r.created_at)
    + make_interval(secs => greatest(a.poll_interval_minutes * 60, coalesce(a.login_delay_s, 0)))
FROM (
    SELECT DISTINCT ON (account_id) account_id, created_at, finished_at
    FROM retrievals ORDER BY account_id, created_at DESC, id DESC
) r
WHERE r.account_id = a.id AND a.poll_interval_minutes IS NOT NULL;
CREATE INDEX accounts_next_poll ON accounts (next_poll_at) WHERE next_poll_at IS NOT NULL;
CREATE INDEX accounts_unscheduled ON accounts (id)
    WHERE next_poll_at IS NULL AND poll_interval_minutes IS NOT NULL
"""

V9_EVENTS = """
-- Events (transactional outbox), written in the transaction of the change they report.
-- Sequences are not commit-ordered, so the feed reads in (xid, position) order and serves
-- only events whose transaction id is below the oldest one still running: every event
-- that becomes visible later sorts after every event already served.
CREATE TABLE events (
    position bigserial PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    id text COLLATE "C" NOT NULL UNIQUE,
    type text NOT NULL,
    tenant text NOT NULL,
    account_id text COLLATE "C",
    created_at timestamptz NOT NULL,
    data text NOT NULL
);
CREATE INDEX events_tenant ON events (tenant, xid, position);
CREATE INDEX events_created ON events (created_at);
CREATE TABLE webhooks (
    id text COLLATE "C" PRIMARY KEY,
    tenant text NOT NULL,
    url text NOT NULL,
    description text,
    events_json text NOT NULL,
    account_ids_json text,
    enabled boolean NOT NULL,
    secret text NOT NULL,
    previous_secret text,
    previous_secret_until timestamptz,
    disabled_reason text,
    failing_since timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX webhooks_tenant ON webhooks (tenant, id);
CREATE TABLE webhook_deliveries (
    id text COLLATE "C" PRIMARY KEY,
    webhook_id text COLLATE "C" NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id text COLLATE "C" NOT NULL,
    status text NOT NULL,
    attempt_count integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    claimed_by text,
    lease_until timestamptz,
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (webhook_id, next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created_at);
CREATE TABLE webhook_attempts (
    seq bigserial PRIMARY KEY,
    webhook_id text COLLATE "C" NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    delivery_id text COLLATE "C" NOT NULL,
    event_id text COLLATE "C" NOT NULL,
    event_type text NOT NULL,
    attempt integer NOT NULL,
    at timestamptz NOT NULL,
    outcome text NOT NULL,
    duration_ms integer NOT NULL,
    response_status integer,
    response_body text,
    error text
);
CREATE INDEX webhook_attempts_webhook ON webhook_attempts (webhook_id, seq);
CREATE INDEX webhook_attempts_at ON webhook_attempts (at)
"""

V10_BOUNCES = """
-- Bounces (as on SQLite): bounce_of on a stored DSN, the DSN candidates not linked yet,
-- the outgoing message found by Message-ID, and what a DSN reported per recipient.
ALTER TABLE messages ADD COLUMN bounce_of text COLLATE "C"
    REFERENCES outbox (id) ON DELETE SET NULL;
CREATE INDEX messages_bounce_of ON messages (bounce_of) WHERE bounce_of IS NOT NULL;
CREATE TABLE dsn_candidates (
    message_id text COLLATE "C" PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE
);
CREATE INDEX outbox_message_id ON outbox (account_id, message_id);
ALTER TABLE outbox_recipients ADD COLUMN bounce_status text,
    ADD COLUMN bounce_diagnostic text, ADD COLUMN bounce_remote_mta text,
    ADD COLUMN bounce_message text, ADD COLUMN bounced_at timestamptz
"""

V8_TRIGRAM_PENDING_LIST = """
-- A GIN index keeps new entries in a pending list that every search reads in full until
-- VACUUM (or the list's limit, 4 MB by default) merges it: after a burst of stored mail a
-- rare filter took 10 ms per index on it. A 256 kB list keeps that bounded; inserts
-- still go in batches.
ALTER INDEX messages_subject_trgm SET (gin_pending_list_limit = 256);
ALTER INDEX messages_from_trgm SET (gin_pending_list_limit = 256);
ALTER INDEX messages_to_trgm SET (gin_pending_list_limit = 256)
"""

V11_OAUTH2 = """
-- OAuth2 credentials (issue 14): per server, how it authenticates. With 'oauth2' the
-- sealed secret column (in_password/out_password) holds the OAuth2 grant as sealed JSON;
-- the access token's expiry is kept in clear.
ALTER TABLE accounts ADD COLUMN in_auth text NOT NULL DEFAULT 'password';
ALTER TABLE accounts ADD COLUMN out_auth text NOT NULL DEFAULT 'password';
ALTER TABLE accounts ADD COLUMN in_token_expires_at timestamptz;
ALTER TABLE accounts ADD COLUMN out_token_expires_at timestamptz
"""

V12_SEND_OPTIONS = """
-- Sending like a mail client (as on SQLite): metadata (jsonb object), tags (jsonb array),
-- NULL when none, and send_at; a GIN index answers the outbox list's tag and metadata
-- filters (containment, @>).
ALTER TABLE outbox ADD COLUMN metadata jsonb, ADD COLUMN tags jsonb,
    ADD COLUMN send_at timestamptz;
CREATE INDEX outbox_tags ON outbox USING gin (tags jsonb_path_ops) WHERE tags IS NOT NULL;
CREATE INDEX outbox_metadata ON outbox USING gin (metadata jsonb_path_ops)
    WHERE metadata IS NOT NULL;
CREATE INDEX messages_message_id ON messages (account_id, message_id)
"""

V13_THREADS = """
-- Threads (as on SQLite): In-Reply-To, References (a JSON array as text, NULL when none)
-- and the thread of a stored message; the thread of an outgoing message.
ALTER TABLE messages ADD COLUMN in_reply_to text, ADD COLUMN references_json text,
    ADD COLUMN thread_id text COLLATE "C";
ALTER TABLE outbox ADD COLUMN thread_id text COLLATE "C";
-- Rows stored before: each its own thread, named after its Message-ID (else its id) by
-- the digest of service.domain.threads ('thr_' and 24 hex digits of SHA-256).
UPDATE messages SET thread_id = 'thr_'
    || left(encode(sha256(convert_to(coalesce(message_id, id), 'UTF8')), 'hex'), 24);
UPDATE outbox SET thread_id = 'thr_'
    || left(encode(sha256(convert_to(message_id, 'UTF8')), 'hex'), 24);
CREATE INDEX messages_thread ON messages (account_id, thread_id);
CREATE INDEX outbox_thread ON outbox (account_id, thread_id)
"""

V14_RECIPIENT_NAMES = """
-- An outgoing recipient's display name as sent (To/Cc/Reply-To header), NULL when none.
ALTER TABLE outbox_recipients ADD COLUMN name TEXT
"""

MIGRATIONS: list[tuple[int, str]] = [
    (5, V5_SCHEMA),
    (6, V6_MESSAGE_FILTERS),
    (7, V7_POLL_SCHEDULE),
    (8, V8_TRIGRAM_PENDING_LIST),
    (9, V9_EVENTS),
    (10, V10_BOUNCES),
    (11, V11_OAUTH2),
    (12, V12_SEND_OPTIONS),
    (13, V13_THREADS),
    (14, V14_RECIPIENT_NAMES),
]


def latest_version() -> int:
    return MIGRATIONS[-1][0]


async def schema_version(conn: Any) -> int:
    """The applied version; 0 for an empty database."""
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))


async def migrate(conn: Any) -> None:
    """Apply pending migrations, one transaction each, holding the advisory lock.

    :raises SchemaTooNewError: the database is newer than this code.
    """
    await conn.execute(
        "SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY, timeout=MIGRATION_TIMEOUT_S
    )
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await schema_version(conn)
        if current > latest_version():
            raise SchemaTooNewError(current, latest_version())
        for version, script in MIGRATIONS:
            if version <= current:
                continue
            async with conn.transaction():
                await conn.execute(script, timeout=MIGRATION_TIMEOUT_S)
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
