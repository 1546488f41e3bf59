"""Versioned schema migrations, applied in order at start (``PRAGMA user_version``).

Append new versions; never edit one that has shipped.
"""

from __future__ import annotations

V1_ACCOUNTS = """
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    display_name TEXT,
    in_host TEXT NOT NULL,
    in_port INTEGER NOT NULL,
    in_security TEXT NOT NULL,
    in_username TEXT NOT NULL,
    in_password TEXT NOT NULL,
    out_host TEXT NOT NULL,
    out_port INTEGER NOT NULL,
    out_security TEXT NOT NULL,
    out_username TEXT,
    out_password TEXT,
    out_allow_insecure_auth INTEGER NOT NULL DEFAULT 0,
    leave_on_server INTEGER NOT NULL DEFAULT 1,
    delete_after_days INTEGER,
    max_message_bytes INTEGER,
    poll_interval_minutes INTEGER,
    smtp_auth_failed_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX accounts_tenant ON accounts (tenant, id)
"""

V2_RETRIEVALS = """
CREATE TABLE retrievals (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    trigger TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    messages_on_server INTEGER,
    messages_downloaded INTEGER NOT NULL DEFAULT 0,
    bytes_downloaded INTEGER NOT NULL DEFAULT 0,
    messages_deleted INTEGER NOT NULL DEFAULT 0,
    messages_skipped INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    error_detail TEXT
);
CREATE INDEX retrievals_account ON retrievals (account_id, id);
-- Never two retrievals of one account at once, enforced by the store itself.
CREATE UNIQUE INDEX retrievals_one_active ON retrievals (account_id)
    WHERE status IN ('queued', 'running');
CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    uidl TEXT NOT NULL,
    size INTEGER NOT NULL,
    retrieved_at TEXT NOT NULL,
    message_id TEXT,
    from_addr TEXT,
    to_json TEXT NOT NULL,
    cc_json TEXT NOT NULL,
    subject TEXT,
    date TEXT,
    has_attachments INTEGER NOT NULL,
    UNIQUE (account_id, uidl)
);
CREATE INDEX messages_account ON messages (account_id, id);
CREATE TABLE message_bodies (
    message_id TEXT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    raw BLOB NOT NULL
);
-- What is known of each UIDL on the server; outlives a local delete so the message
-- is not downloaded again.
CREATE TABLE server_messages (
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    uidl TEXT NOT NULL,
    state TEXT NOT NULL,
    size INTEGER NOT NULL,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (account_id, uidl)
) WITHOUT ROWID;
ALTER TABLE accounts ADD COLUMN login_delay_s INTEGER
"""

V3_OUTBOX = """
-- One row per accepted send request. next_attempt_at is when the delivery worker may take
-- it (the acceptance time for a queued message), so one index serves every due query.
CREATE TABLE outbox (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    message_id TEXT NOT NULL,
    status TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    subject TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    next_attempt_at TEXT,
    sent_at TEXT,
    expires_at TEXT NOT NULL,
    attempt_count INTEGER NOT NULL DEFAULT 0,
    last_error_code TEXT,
    last_error_detail TEXT,
    UNIQUE (account_id, idempotency_key)
);
CREATE INDEX outbox_account ON outbox (account_id, id);
CREATE INDEX outbox_account_status ON outbox (account_id, status, id);
CREATE INDEX outbox_due ON outbox (account_id, next_attempt_at)
    WHERE status IN ('queued', 'deferred');
CREATE INDEX outbox_waiting ON outbox (next_attempt_at)
    WHERE status IN ('queued', 'deferred');
CREATE INDEX outbox_sending ON outbox (status) WHERE status = 'sending';
-- The exact bytes accepted (CRLF, not dot-stuffed): what is sent, and the Sent Items copy.
CREATE TABLE outbox_bodies (
    outgoing_id TEXT PRIMARY KEY REFERENCES outbox (id) ON DELETE CASCADE,
    raw BLOB NOT NULL
);
-- Envelope recipients, each address once, in envelope order (to, cc, bcc).
CREATE TABLE outbox_recipients (
    outgoing_id TEXT NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    address TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    smtp_code INTEGER,
    smtp_message TEXT,
    PRIMARY KEY (outgoing_id, position)
) WITHOUT ROWID;
CREATE TABLE outbox_attempts (
    outgoing_id TEXT NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    at TEXT NOT NULL,
    outcome TEXT NOT NULL,
    smtp_code INTEGER,
    smtp_message TEXT,
    error_code TEXT,
    PRIMARY KEY (outgoing_id, seq)
) WITHOUT ROWID
"""

V4_SMTP_PAUSE = """
-- A delivery pause is stored (it survives a restart) and says why: the code and text of
-- the failure that only new outgoing settings can fix, and since when. It generalises
-- smtp_auth_failed_at, which is carried over and no longer used.
ALTER TABLE accounts ADD COLUMN smtp_pause_code TEXT;
ALTER TABLE accounts ADD COLUMN smtp_pause_detail TEXT;
ALTER TABLE accounts ADD COLUMN smtp_paused_at TEXT;
UPDATE accounts SET smtp_pause_code = 'auth_failed',
    smtp_pause_detail = 'the SMTP server refused the credentials',
    smtp_paused_at = smtp_auth_failed_at, smtp_auth_failed_at = NULL
    WHERE smtp_auth_failed_at IS NOT NULL
"""

V5_LEASES = """
-- Work shared by processes on one store: a message being sent and a retrieval being run
-- are held by one process (its owner id) until lease_until; a holder renews its leases
-- while it works, and work whose lease expired is taken over by whoever notices.
ALTER TABLE outbox ADD COLUMN claimed_by TEXT;
ALTER TABLE outbox ADD COLUMN lease_until TEXT;
ALTER TABLE retrievals ADD COLUMN owner TEXT;
ALTER TABLE retrievals ADD COLUMN lease_until TEXT;
-- Whether an account was retrieved after a given time (one scheduled poll per replica set).
CREATE INDEX retrievals_account_created ON retrievals (account_id, created_at)
"""

V6_MESSAGE_FILTERS = """
-- Substring filters (subject, from, to, q) through a trigram index: FTS5 over the message
-- rows (external content: the text is not stored twice), keyed by the messages' rowid and
-- kept in step by triggers. The service never VACUUMs (which may renumber rowids); after a
-- manual VACUUM, INSERT INTO messages_fts (messages_fts) VALUES ('rebuild') re-keys it.
CREATE VIRTUAL TABLE messages_fts USING fts5 (
    subject, from_addr, to_json, content = 'messages', tokenize = 'trigram'
);
INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');
-- Inside a trigger a statement's semicolon starts the next line: migrations are split
-- at a semicolon that ends a line.
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, subject, from_addr, to_json)
    VALUES (new.rowid, new.subject, new.from_addr, new.to_json)
; END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, subject, from_addr, to_json)
    VALUES ('delete', old.rowid, old.subject, old.from_addr, old.to_json)
; END;
CREATE TRIGGER messages_fts_update AFTER UPDATE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, subject, from_addr, to_json)
    VALUES ('delete', old.rowid, old.subject, old.from_addr, old.to_json)
    ; INSERT INTO messages_fts (rowid, subject, from_addr, to_json)
    VALUES (new.rowid, new.subject, new.from_addr, new.to_json)
; END;
-- since: the messages retrieved after a time; has_attachments: newest first among them.
CREATE INDEX messages_retrieved ON messages (account_id, retrieved_at);
CREATE INDEX messages_attachments ON messages (account_id, has_attachments, id)
"""

V7_POLL_SCHEDULE = """
-- The poll schedule kept per account: when its next scheduled poll is due. NULL: polling
-- is off, or the account is not scheduled yet (the scheduler gives it a spread first time).
-- While a poll runs it holds a claim (a time a lease away); the poll's end sets the next.
ALTER TABLE accounts ADD COLUMN next_poll_at TEXT;
-- Backfilled from each polled account's latest retrieval: its end (or its start) plus the
-- interval, the server's LOGIN-DELAY a floor. Accounts never retrieved stay unscheduled.
-- Whole seconds are added, so the text's fraction ('.ffffffZ', from character 20) stays.
UPDATE accounts SET next_poll_at = (
    SELECT strftime('%Y-%m-%dT%H:%M:%S', coalesce(r.finished_at, r.created_at), '+' ||
        max(accounts.poll_interval_minutes * 60, coalesce(accounts.login_delay_s, 0))
        || ' seconds') || substr(coalesce(r.finished_at, r.created_at), 20)
    FROM retrievals r WHERE r.account_id = accounts.id
    ORDER BY r.created_at DESC, r.id DESC LIMIT 1
) WHERE poll_interval_minutes IS NOT NULL;
-- Due polls in due order; polled accounts still to be scheduled.
CREATE INDEX accounts_next_poll ON accounts (next_poll_at) WHERE next_poll_at IS NOT NULL;
CREATE INDEX accounts_unscheduled ON accounts (id)
    WHERE next_poll_at IS NULL AND poll_interval_minutes IS NOT NULL
"""

V9_EVENTS = """
-- Events (transactional outbox): written in the transaction of the change they report.
-- position is commit-ordered (one writer) and is the pull feed's cursor.
CREATE TABLE events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    tenant TEXT NOT NULL,
    account_id TEXT,
    created_at TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX events_tenant ON events (tenant, position);
CREATE INDEX events_created ON events (created_at);
-- Webhook endpoints of a tenant; secrets encrypted like account passwords. The previous
-- secret keeps signing until previous_secret_until (rotation grace).
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    url TEXT NOT NULL,
    description TEXT,
    events_json TEXT NOT NULL,
    account_ids_json TEXT,
    enabled INTEGER NOT NULL,
    secret TEXT NOT NULL,
    previous_secret TEXT,
    previous_secret_until TEXT,
    disabled_reason TEXT,
    failing_since TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX webhooks_tenant ON webhooks (tenant, id);
-- One row per (endpoint, event), inserted with the event: at-least-once, claimed under a
-- lease, retried until delivered or given up.
CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt_count INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    claimed_by TEXT,
    lease_until TEXT,
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (webhook_id, next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created_at);
-- Every attempt, newest read first at GET /v1/webhooks/{id}/deliveries.
CREATE TABLE webhook_attempts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    delivery_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at TEXT NOT NULL,
    outcome TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    response_status INTEGER,
    response_body TEXT,
    error TEXT
);
CREATE INDEX webhook_attempts_webhook ON webhook_attempts (webhook_id, seq);
CREATE INDEX webhook_attempts_at ON webhook_attempts (at)
"""

V8_FTS_INDEXED_PER_BATCH = """
-- The trigram index is written by the statement that stores a batch (one INSERT ... SELECT
-- over the batch's rows, in its transaction) instead of a trigger per row: FTS5 flushes its
-- pending terms at every trigger's statement boundary, which made each stored message
-- cost a segment write (2,000 messages: 0.23 s with the trigger, 0.015 s per batch).
DROP TRIGGER messages_fts_insert
"""

V10_BOUNCES = """
-- Bounces: a stored delivery status notification (DSN) tied to the outgoing message it
-- reports (bounce_of), and the recipients it reports bounced. Messages that may be DSNs
-- (multipart/report) are queued in dsn_candidates in the transaction that stores them;
-- linking one deletes its row in the transaction that writes the link, so each DSN is
-- linked once, and a restart finds those stored but not linked yet.
ALTER TABLE messages ADD COLUMN bounce_of TEXT REFERENCES outbox (id) ON DELETE SET NULL;
CREATE INDEX messages_bounce_of ON messages (bounce_of) WHERE bounce_of IS NOT NULL;
CREATE TABLE dsn_candidates (
    message_id TEXT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE
) WITHOUT ROWID;
-- The outgoing message a DSN names by its Message-ID.
CREATE INDEX outbox_message_id ON outbox (account_id, message_id);
ALTER TABLE outbox_recipients ADD COLUMN bounce_status TEXT;
ALTER TABLE outbox_recipients ADD COLUMN bounce_diagnostic TEXT;
ALTER TABLE outbox_recipients ADD COLUMN bounce_remote_mta TEXT;
ALTER TABLE outbox_recipients ADD COLUMN bounce_message TEXT;
ALTER TABLE outbox_recipients ADD COLUMN bounced_at TEXT
"""

V11_OAUTH2 = """
-- OAuth2 credentials (issue 14): per server, how it authenticates. With 'oauth2' the
-- sealed secret column (in_password/out_password) holds the OAuth2 grant as sealed JSON
-- (token URL, client, refresh token, scope, current access token); the access token's
-- expiry is kept in clear so responses and the refresh schedule need no decryption.
ALTER TABLE accounts ADD COLUMN in_auth TEXT NOT NULL DEFAULT 'password';
ALTER TABLE accounts ADD COLUMN out_auth TEXT NOT NULL DEFAULT 'password';
ALTER TABLE accounts ADD COLUMN in_token_expires_at TEXT;
ALTER TABLE accounts ADD COLUMN out_token_expires_at TEXT
"""

V12_SEND_OPTIONS = """
-- Sending like a mail client (issue 15): the caller's metadata (a JSON object) and tags
-- (a JSON array), NULL when none, and the requested delivery time. A scheduled message
-- is stored queued with next_attempt_at = send_at, so the due queries and their indexes
-- hold it back until then and a restart changes nothing.
ALTER TABLE outbox ADD COLUMN metadata TEXT;
ALTER TABLE outbox ADD COLUMN tags TEXT;
ALTER TABLE outbox ADD COLUMN send_at TEXT;
-- GET .../messages?message_id=: the stored messages with one Message-ID.
CREATE INDEX messages_message_id ON messages (account_id, message_id)
"""

V13_THREADS = """
-- Threads (issue 15): a stored message's In-Reply-To (its first msg-id), References (a
-- JSON array, NULL when none) and thread (thr_..., named after the conversation's root,
-- see service.domain.threads); an outgoing message's thread, from its composed headers.
ALTER TABLE messages ADD COLUMN in_reply_to TEXT;
ALTER TABLE messages ADD COLUMN references_json TEXT;
ALTER TABLE messages ADD COLUMN thread_id TEXT;
ALTER TABLE outbox ADD COLUMN thread_id TEXT;
-- The trigram index only reads subject, from_addr and to_json: other updates (this
-- backfill, bounce_of, joining a thread) leave it alone.
DROP TRIGGER messages_fts_update;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF subject, from_addr, to_json ON messages
BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, subject, from_addr, to_json)
    VALUES ('delete', old.rowid, old.subject, old.from_addr, old.to_json)
    ; INSERT INTO messages_fts (rowid, subject, from_addr, to_json)
    VALUES (new.rowid, new.subject, new.from_addr, new.to_json)
; END;
-- Rows stored before: each its own thread, named after its Message-ID (else its id), by
-- the service's own digest (registered on every connection as mailroom_thread_id); their
-- In-Reply-To and References stay unknown (NULL).
UPDATE messages SET thread_id = mailroom_thread_id(coalesce(message_id, id));
UPDATE outbox SET thread_id = mailroom_thread_id(message_id);
-- GET .../messages?thread_id=: a conversation's messages and sent copies.
CREATE INDEX messages_thread ON messages (account_id, thread_id);
CREATE INDEX outbox_thread ON outbox (account_id, thread_id)
"""

V14_RECIPIENT_NAMES = """
-- An outgoing recipient's display name as sent (To/Cc/Reply-To header), NULL when none.
ALTER TABLE outbox_recipients ADD COLUMN name TEXT
"""

MIGRATIONS: list[tuple[int, str]] = [
    (1, V1_ACCOUNTS),
    (2, V2_RETRIEVALS),
    (3, V3_OUTBOX),
    (4, V4_SMTP_PAUSE),
    (5, V5_LEASES),
    (6, V6_MESSAGE_FILTERS),
    (7, V7_POLL_SCHEDULE),
    (8, V8_FTS_INDEXED_PER_BATCH),
    (9, V9_EVENTS),
    (10, V10_BOUNCES),
    (11, V11_OAUTH2),
    (12, V12_SEND_OPTIONS),
    (13, V13_THREADS),
    (14, V14_RECIPIENT_NAMES),
]
