"""Retrievals (one POP3 session's work) and stored messages."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
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

    def progress(self) -> RetrievalProgress:
        """Its counts as they stand."""
        return RetrievalProgress(
            messages_on_server=self.messages_on_server,
            messages_downloaded=self.messages_downloaded,
            bytes_downloaded=self.bytes_downloaded,
            messages_deleted=self.messages_deleted,
            messages_skipped=self.messages_skipped,
        )


class RetrievalProgress(msgspec.Struct, frozen=True, kw_only=True):
    messages_on_server: int | None
    messages_downloaded: int
    bytes_downloaded: int
    messages_deleted: int
    messages_skipped: int


class MessageDirection(StrEnum):
    """Whether a listed message was retrieved, or is one of the account's own sends (a
    thread list shows both)."""

    RECEIVED = "received"
    SENT = "sent"


class MessageSummary(msgspec.Struct, frozen=True, kw_only=True):
    """The stored view of one retrieved message (its raw bytes are stored beside it).

    In a thread list (``?thread_id=``) the account's own sent copies are listed too:
    ``direction`` is ``sent``, ``id`` is the outgoing message's id (``out_...``), ``uidl``
    is null, ``retrieved_at`` is when the send was accepted, and the header fields are
    read from the message as composed.
    """

    id: str
    account_id: str
    uidl: Annotated[
        str | None, Meta(description="The POP3 UIDL it was retrieved as (null: a sent copy)")
    ]
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
    in_reply_to: Annotated[
        str | None,
        Meta(
            description="The first msg-id of `In-Reply-To` (with its angle brackets); null"
            " when absent, and for messages stored before threads were kept"
        ),
    ] = None
    references: Annotated[
        list[str],
        Meta(
            description="The msg-ids of `References`, in order (at most 100: the first and"
            " the newest); empty when absent, and for messages stored before threads were"
            " kept"
        ),
    ] = msgspec.field(default_factory=list)
    thread_id: Annotated[
        str | None,
        Meta(
            description="The conversation this message belongs to (`thr_...`): named after"
            " its first message (the first id of `References`, else `In-Reply-To`, else its"
            " own Message-ID), so a reply and a sent copy join it whatever order they"
            " arrive in; list it with `?thread_id=`. Messages stored before threads were"
            " kept each start their own (from their Message-ID)",
            examples=["thr_5f2b9c0e4d1a7b3c8e6f0a12"],
        ),
    ] = None
    direction: Annotated[
        MessageDirection,
        Meta(description="`received`, or `sent` for the account's own copy in a thread list"),
    ] = MessageDirection.RECEIVED


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
    # One conversation, oldest first, sent copies included (the other filters apply to both).
    thread_id: str | None = None

    @property
    def narrows_besides_thread(self) -> bool:
        """Whether any filter other than ``thread_id`` is given."""
        return any(
            value is not None
            for value in (
                self.since,
                self.from_contains,
                self.subject_contains,
                self.to_contains,
                self.text_contains,
                self.has_attachments,
                self.message_id,
            )
        )
