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

MIGRATIONS: list[tuple[int, str]] = [
    (1, V1_ACCOUNTS),
]
