"""Retrievals (one POP3 session's work) and stored messages."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from service.domain.enums import RetrievalStatus, RetrievalTrigger


class RetrievalError(msgspec.Struct, frozen=True):
    code: str
    detail: str


class Retrieval(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    account_id: str
    trigger: RetrievalTrigger
    status: RetrievalStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    messages_on_server: int | None = None
    messages_downloaded: int = 0
    bytes_downloaded: int = 0
    messages_deleted: int = 0
    messages_skipped: int = 0
    error: RetrievalError | None = None


class RetrievalProgress(msgspec.Struct, frozen=True, kw_only=True):
    messages_on_server: int | None
    messages_downloaded: int
    bytes_downloaded: int
    messages_deleted: int
    messages_skipped: int


class MessageSummary(msgspec.Struct, frozen=True, kw_only=True):
    """The stored view of one retrieved message (its raw bytes are stored beside it)."""

    id: str
    account_id: str
    uidl: str
    size: int
    retrieved_at: datetime
    message_id: str | None
    from_: str | None = msgspec.field(name="from")
    to: list[str]
    cc: list[str]
    subject: str | None
    date: datetime | None
    has_attachments: bool
    bounce_of: Annotated[
        str | None,
        Meta(
            description="When this message is a delivery status notification about a message"
            " this account sent: that outgoing message's id (`out_...`)"
        ),
    ] = None


class NewMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A message downloaded in this retrieval, ready to be committed with its UIDL."""

    summary: MessageSummary
    raw: bytes


class MessageFilter(msgspec.Struct, frozen=True, kw_only=True):
    """What a message list keeps; substring filters ignore (ASCII) case.

    ``text_contains`` (the API's ``q``) matches when the subject, the sender or any
    ``to`` address contains it.
    """

    since: datetime | None = None
    from_contains: str | None = None
    subject_contains: str | None = None
    to_contains: str | None = None
    text_contains: str | None = None
    has_attachments: bool | None = None
    message_id: str | None = None  # exactly this Message-ID (with its angle brackets)
