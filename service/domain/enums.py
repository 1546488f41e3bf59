"""States and modes as Enums (never bare strings)."""

from __future__ import annotations

from enum import StrEnum


class Security(StrEnum):
    """How a POP3/SMTP connection is protected."""

    TLS = "tls"  # implicit TLS from the first byte (POP3 995, SMTP 465)
    STARTTLS = "starttls"  # plain connect, then STLS/STARTTLS, which is required
    NONE = "none"  # plain text


class RetrievalStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RetrievalTrigger(StrEnum):
    API = "api"
    SCHEDULE = "schedule"


class ServerMessageState(StrEnum):
    """What Mailroom knows of a message (by UIDL) on an account's POP3 server."""

    STORED = "stored"  # in the store (or stored once and deleted locally since)
    SKIPPED = "skipped"  # larger than the account's cap: never downloaded, never deleted


class OutgoingStatus(StrEnum):
    # Accepted with a `send_at` still ahead (stored as queued, not due before it).
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RecipientStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    # Accepted by the server, then reported undeliverable by a DSN that came back.
    BOUNCED = "bounced"


class RecipientKind(StrEnum):
    TO = "to"
    CC = "cc"
    BCC = "bcc"
