"""The outbox: send requests as accepted, outgoing messages and what each attempt did.

``SendRequest`` is the request body of SendMessage (msgspec decodes and bounds it; the
mail rules proper, addresses, header injection, protected headers, live in
``service.mail`` and are applied by ``service.services.sending`` so that every refusal
carries its own stable ``code``). ``OutgoingMessage`` is what callers read back.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta

from service.domain.enums import OutgoingStatus, RecipientKind, RecipientStatus
from service.domain.threads import thread_id_of
from service.mail import addresses as mail_addresses
from service.mail import headers as mail_headers
from service.mail.compose import MAX_CONTENT_ID_CHARS
from service.mail.compose import MAX_CONTENT_TYPE_CHARS as MAIL_CONTENT_TYPE_CHARS
from service.mail.compose import MAX_FILENAME_CHARS as MAIL_FILENAME_CHARS

# Structural bounds, enforced while decoding the body: they keep a hostile request from
# making the service allocate or loop much before the real rules run. The configurable
# limits (settings.max_recipients, max_attachment_bytes, max_send_bytes) are checked
# afterwards and answer with their own codes.
# The lengths are the mail rules' own (service.mail), so the OpenAPI document states the
# limits the server applies: one character over is 422 whichever check sees it first.
MAX_ADDRESSES_PER_FIELD = 10_000  # the highest MAILROOM_MAX_RECIPIENTS accepted
MAX_ADDRESS_CHARS = mail_addresses.MAX_ADDRESS_OCTETS  # an ASCII address: one octet a char
MAX_SUBJECT_CHARS = mail_headers.MAX_HEADER_VALUE_CHARS
MAX_ATTACHMENTS = 100
MAX_FILENAME_CHARS = MAIL_FILENAME_CHARS
MAX_CONTENT_TYPE_CHARS = MAIL_CONTENT_TYPE_CHARS
MAX_EXTRA_HEADERS = mail_headers.MAX_EXTRA_HEADERS
MAX_HEADER_NAME_CHARS = mail_headers.MAX_HEADER_NAME_CHARS
MAX_HEADER_VALUE_CHARS = mail_headers.MAX_HEADER_VALUE_CHARS
MAX_IDEMPOTENCY_KEY_CHARS = 200
# Metadata and tags: the limits the sending service applies (422 `invalid_metadata` and
# `invalid_tag`); the decoder's bounds below are looser so that those codes answer.
MAX_METADATA_KEYS = 20
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 500
MAX_METADATA_BYTES = 4096  # keys and values together, UTF-8
MAX_TAGS = 10
MAX_TAG_CHARS = 64
# Keys and tags: ASCII letters, digits and `_ . : -`, starting with a letter or digit
# (so `?metadata[key]=` and `?tag=` need no escaping).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")
_LOOSE_COUNT = 1000
_LOOSE_CHARS = 10_000
# Standard base64 with its padding, nothing else: what `content_base64` must be.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$(?!\n)"
BASE64_RE = re.compile(BASE64_PATTERN)

AddressText = Annotated[
    str,
    Meta(
        max_length=MAX_ADDRESS_CHARS,
        description="One plain addr-spec (`local@domain`): no display name, brackets,"
        " comments or lists",
        examples=["bob@example.com"],
    ),
]
MAX_DISPLAY_NAME_CHARS = mail_addresses.MAX_DISPLAY_NAME_CHARS
# `"name" <address>`: quotes, space and brackets around the longest name and address.
MAX_NAMED_ADDRESS_CHARS = MAX_ADDRESS_CHARS + MAX_DISPLAY_NAME_CHARS + 5
RecipientText = Annotated[
    str,
    Meta(
        max_length=MAX_NAMED_ADDRESS_CHARS,
        description="A plain addr-spec (`local@domain`), or strictly one `Name <address>`"
        ' (the name as words, or in double quotes without `"` or `\\` inside): no'
        " comments, groups or lists (422 `invalid_address`)",
        examples=["bob@example.com", "Bob Müller <bob@example.com>"],
    ),
]


class NamedAddress(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A recipient with a display name; non-ASCII names are sent as RFC 2047 words."""

    address: AddressText
    name: (
        Annotated[
            str,
            Meta(
                max_length=MAX_DISPLAY_NAME_CHARS,
                description="Any text but line breaks, control characters (422"
                " `header_injection`) and bidi controls (422 `invalid_display_name`)",
                examples=["Bob Müller"],
            ),
        ]
        | None
    ) = None


RecipientEntry = RecipientText | NamedAddress
AddressList = Annotated[list[RecipientEntry], Meta(max_length=MAX_ADDRESSES_PER_FIELD)]


class AttachmentInput(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One file to attach, its content in standard base64."""

    filename: Annotated[str, Meta(min_length=1, max_length=MAX_FILENAME_CHARS)]
    content_type: Annotated[
        str,
        Meta(
            min_length=3,
            max_length=MAX_CONTENT_TYPE_CHARS,
            description="`type/subtype` without parameters; not multipart/* or message/*",
            examples=["application/pdf"],
        ),
    ]
    content_base64: Annotated[
        str,
        Meta(
            description="The file's bytes, standard base64 (RFC 4648 section 4), padded;"
            " anything else is 422 `invalid_base64`",
            # In the schema only: the sending service checks it, answering its own code.
            extra_json_schema={"extra": {"pattern": BASE64_PATTERN}},
        ),
    ]
    content_id: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=MAX_CONTENT_ID_CHARS,
                description="Makes it an inline part (an image the html shows with"
                ' `<img src="cid:CONTENT_ID">`): sent with the html in multipart/related.'
                " Dot-atoms, optionally `left@right`, without angle brackets; needs `html` (422"
                " `invalid_attachment`)",
                examples=["logo@example.com"],
            ),
        ]
        | None
    ) = None


MetadataInput = Annotated[
    dict[
        Annotated[str, Meta(max_length=_LOOSE_CHARS)],
        Annotated[str, Meta(max_length=_LOOSE_CHARS)],
    ],
    Meta(
        max_length=_LOOSE_COUNT,
        description=f"Your own string map, returned with the message, filterable"
        f" (`?metadata[key]=value`) and carried in its events: at most {MAX_METADATA_KEYS}"
        f" keys of 1-{MAX_METADATA_KEY_CHARS} characters (letters, digits, `_ . : -`),"
        f" values of at most {MAX_METADATA_VALUE_CHARS} characters without control"
        f" characters, {MAX_METADATA_BYTES} bytes in all (422 `invalid_metadata`)",
        examples=[{"order_id": "A-1042"}],
    ),
]
TagsInput = Annotated[
    list[Annotated[str, Meta(max_length=_LOOSE_CHARS)]],
    Meta(
        max_length=_LOOSE_COUNT,
        description=f"Labels, returned with the message, filterable (`?tag=`) and carried"
        f" in its events: at most {MAX_TAGS}, each once, 1-{MAX_TAG_CHARS} characters"
        " (letters, digits, `_ . : -`; 422 `invalid_tag`)",
        examples=[["receipt"]],
    ),
]
SendAtInput = Annotated[
    datetime | None,
    Meta(
        description="Deliver at this time (RFC 3339 with an offset), at most"
        " `MAILROOM_SEND_AT_HORIZON` ahead (422 `invalid_send_at`): the message is"
        " `scheduled` until then and can be cancelled. A time already past sends now;"
        " `MAILROOM_MAX_MESSAGE_AGE` counts from it",
        examples=["2026-12-24T09:00:00+01:00"],
    ),
]


class ForwardAs(StrEnum):
    """How ``forward_message`` carries the original."""

    ATTACHMENT = "attachment"  # a message/rfc822 part, the stored bytes unchanged
    INLINE = "inline"  # its bodies quoted below the caller's, its attachments attached again


class SendRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of SendMessage. From is the account's own address and display name."""

    # Each group needs one field given: a non-empty list (422 `no_recipients`) or a body that
    # is not null (422 `no_body`). The OpenAPI schema states them (service.api.requests).
    at_least_one_of: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("to", "cc", "bcc", "reply_to_message"),
        ("text", "html", "forward_message"),
    )

    to: AddressList = msgspec.field(default_factory=list)
    cc: AddressList = msgspec.field(default_factory=list)
    bcc: Annotated[
        list[RecipientEntry],
        Meta(
            max_length=MAX_ADDRESSES_PER_FIELD,
            description="Envelope-only recipients: never written in a header",
        ),
    ] = msgspec.field(default_factory=list)
    reply_to: RecipientEntry | None = None
    subject: (
        Annotated[
            str,
            Meta(
                max_length=MAX_SUBJECT_CHARS,
                description="No CR, LF, control characters or line separators (422"
                " `header_injection`, never stripped); may be empty. Required, except with"
                " `reply_to_message` (default: `Re: ` and the original's subject) and"
                " `forward_message` (default: `Fwd: ` and the original's subject)",
            ),
        ]
        | None
    ) = None
    reply_to_message: Annotated[
        str | None,
        Meta(
            description="A stored message (`msg_...`) of this account to answer: sets"
            " `In-Reply-To` and `References` from it, the subject (`Re: ...`) unless given,"
            " and, when `to`, `cc` and `bcc` are all empty, `to` from its `Reply-To` (else"
            " `From`); 404 `not_found` when there is no such message",
            examples=["msg_01h..."],
        ),
    ] = None
    reply_all: Annotated[
        bool,
        Meta(
            description="With `reply_to_message`: also the original's other `To` and `Cc`"
            " recipients (in `cc`), leaving out this account's own address"
        ),
    ] = False
    forward_message: Annotated[
        str | None,
        Meta(
            description="A stored message (`msg_...`) of this account to forward (not with"
            " `reply_to_message`: 422 `conflicting_fields`): the subject is `Fwd: ` and the"
            " original's subject unless given, `References` threads it with the original (no"
            " `In-Reply-To`), `text` and `html` are optional; recipients are required. 404"
            " `not_found` when there is no such message",
            examples=["msg_01h..."],
        ),
    ] = None
    forward_as: Annotated[
        ForwardAs | None,
        Meta(
            description="With `forward_message`: `attachment` (the default) attaches the"
            " original unchanged as `message/rfc822` (422 `too_long` or `invalid_body` for one"
            " with a line over 998 octets or a NUL byte, which SMTP cannot carry so);"
            " `inline` quotes its bodies below yours after a `Forwarded message` block (its"
            " From, Date, Subject, To, Cc) and attaches its attachments again"
        ),
    ] = None
    text: str | None = None
    html: str | None = None
    attachments: Annotated[list[AttachmentInput], Meta(max_length=MAX_ATTACHMENTS)] = msgspec.field(
        default_factory=list
    )
    headers: Annotated[
        dict[
            Annotated[str, Meta(max_length=MAX_HEADER_NAME_CHARS)],
            Annotated[str, Meta(max_length=MAX_HEADER_VALUE_CHARS)],
        ],
        Meta(
            max_length=MAX_EXTRA_HEADERS,
            description=f"Extra headers: at most {MAX_EXTRA_HEADERS}, names of at most"
            f" {MAX_HEADER_NAME_CHARS} characters, values of at most {MAX_HEADER_VALUE_CHARS}"
            " (422 otherwise). Structure, address, trace and MIME headers are protected"
            " (422 `protected_header`)",
            examples=[{"X-Campaign": "spring"}],
        ),
    ] = msgspec.field(default_factory=dict)

    metadata: MetadataInput = msgspec.field(default_factory=dict)
    tags: TagsInput = msgspec.field(default_factory=list)
    send_at: SendAtInput = None

    @property
    def recipient_count(self) -> int:
        return len(self.to) + len(self.cc) + len(self.bcc)


class RawSendRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of SendRawMessage as JSON: a complete message in base64, with options."""

    raw_base64: Annotated[
        str,
        Meta(
            description="The whole RFC 5322 message (headers and body), standard base64,"
            " padded (422 `invalid_base64`)",
            extra_json_schema={"extra": {"pattern": BASE64_PATTERN}},
        ),
    ]
    recipients: (
        Annotated[
            list[AddressText],
            Meta(
                description="The envelope recipients; default: every To, Cc and Bcc address",
                max_length=MAX_ADDRESSES_PER_FIELD,
            ),
        ]
        | None
    ) = None
    metadata: MetadataInput = msgspec.field(default_factory=dict)
    tags: TagsInput = msgspec.field(default_factory=list)
    send_at: SendAtInput = None


class AttemptOutcome(StrEnum):
    """What one delivery attempt (one SMTP transaction, or a failed connection) gave."""

    SENT = "sent"  # the server accepted the message for every recipient tried
    PARTIAL = "partial"  # accepted for some recipients; others refused or deferred
    DEFERRED = "deferred"  # nothing accepted; will be retried
    FAILED = "failed"  # nothing accepted; permanent
    # The service stopped (shutdown grace ran out, or a crash found at the next start) with
    # the message taken for sending: the server may or may not have it; it is queued again.
    INTERRUPTED = "interrupted"


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One delivery attempt with the server's reply (``smtp_*`` null: no reply, e.g. a
    connection that could not be made)."""

    at: datetime
    outcome: AttemptOutcome
    smtp_code: int | None
    smtp_message: str | None
    error_code: str | None


class RecipientBounce(msgspec.Struct, frozen=True, kw_only=True):
    """What a delivery status notification (RFC 3464) said of a recipient that bounced."""

    status: Annotated[
        str | None,
        Meta(description="The enhanced status code reported (`Status:`)", examples=["5.1.1"]),
    ]
    diagnostic_code: Annotated[
        str | None,
        Meta(
            description="The remote server's answer as reported (`Diagnostic-Code:`, with its"
            " type)",
            examples=["smtp; 550 5.1.1 <bob@example.org>: Recipient address rejected"],
        ),
    ]
    remote_mta: Annotated[str | None, Meta(description="The server that refused (`Remote-MTA:`)")]
    message_id: Annotated[
        str, Meta(description="The stored DSN message (`msg_...`) that reported the bounce")
    ]
    at: Annotated[datetime, Meta(description="When Mailroom linked the DSN")]


class Recipient(msgspec.Struct, frozen=True, kw_only=True):
    """An envelope recipient and what the server last said about it (``bounce``: the
    delivery status notification that reported it undeliverable afterwards, if any)."""

    address: str
    name: Annotated[
        str | None, Meta(description="The display name it was sent with (null: none)")
    ] = None
    kind: RecipientKind
    status: RecipientStatus
    smtp_code: int | None = None
    smtp_message: str | None = None
    bounce: RecipientBounce | None = None


class OutgoingError(msgspec.Struct, frozen=True):
    """Why a message failed, or why its last attempt did not deliver it."""

    code: str
    detail: str


class OutgoingMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A message in the outbox and everything that happened to it."""

    id: str
    account_id: str
    message_id: str
    status: OutgoingStatus
    subject: str
    size: int
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None
    sent_at: datetime | None
    expires_at: datetime
    attempt_count: int
    idempotency_key: str | None
    recipients: list[Recipient]
    attempts: list[Attempt]
    error: OutgoingError | None
    bounces: Annotated[
        list[str],
        Meta(
            description="Stored messages (`msg_...`, oldest first) that are delivery status"
            " notifications about this message (their `bounce_of` is this message's id)"
        ),
    ] = msgspec.field(default_factory=list)
    metadata: Annotated[dict[str, str], Meta(description="As given when sent")] = msgspec.field(
        default_factory=dict
    )
    tags: Annotated[list[str], Meta(description="As given when sent")] = msgspec.field(
        default_factory=list
    )
    send_at: Annotated[
        datetime | None,
        Meta(description="When delivery was asked to start (`send_at` of the request, UTC)"),
    ] = None
    thread_id: Annotated[
        str | None,
        Meta(
            description="The conversation this message belongs to (`thr_...`), from its own"
            " `References`, `In-Reply-To` and `Message-ID` as a stored message's; lists it"
            " among the stored messages at `GET .../messages?thread_id=`"
        ),
    ] = None


class NewRecipient(msgspec.Struct, frozen=True):
    address: str
    kind: RecipientKind
    name: str | None = None  # the display name in its header (never for Bcc)


class NewOutgoing(msgspec.Struct, frozen=True, kw_only=True):
    """An accepted send request, ready to be committed with its exact bytes."""

    id: str
    account_id: str
    message_id: str
    mail_from: str
    subject: str
    smtputf8: bool
    raw: bytes
    recipients: tuple[NewRecipient, ...]
    idempotency_key: str | None
    request_hash: str | None
    created_at: datetime
    expires_at: datetime
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    tags: list[str] = msgspec.field(default_factory=list)
    send_at: datetime | None = None  # only when later than created_at
    thread_id: str | None = None  # set by the sending service before it is accepted
    # The root its headers name, when not itself: the sending service looks it up (a
    # stored or sent root may have joined an older thread). Not stored.
    thread_root: str | None = None

    @property
    def thread(self) -> str:
        """Its thread as stored: as given, else named after its own Message-ID."""
        return self.thread_id or thread_id_of(self.message_id)

    @property
    def due_at(self) -> datetime:
        """When delivery may first take it."""
        return self.send_at or self.created_at

    def as_message(self) -> OutgoingMessage:
        """The message as it stands right after acceptance."""
        return OutgoingMessage(
            id=self.id,
            account_id=self.account_id,
            message_id=self.message_id,
            status=OutgoingStatus.SCHEDULED if self.send_at else OutgoingStatus.QUEUED,
            subject=self.subject,
            size=len(self.raw),
            created_at=self.created_at,
            updated_at=self.created_at,
            next_attempt_at=self.due_at,
            sent_at=None,
            expires_at=self.expires_at,
            attempt_count=0,
            idempotency_key=self.idempotency_key,
            recipients=[
                Recipient(
                    address=r.address, name=r.name, kind=r.kind, status=RecipientStatus.PENDING
                )
                for r in self.recipients
            ],
            attempts=[],
            error=None,
            metadata=self.metadata,
            tags=self.tags,
            send_at=self.send_at,
            thread_id=self.thread,
        )


class OutboxFilter(msgspec.Struct, frozen=True, kw_only=True):
    """More conditions on a page of the outbox than its stored status (all must hold).

    ``scheduled``: True keeps only messages whose ``send_at`` is after ``now`` (a queued
    one is shown as ``scheduled``), False only those without or with one reached.
    ``tags``: each is among the message's tags; ``metadata``: each key has that value.
    """

    scheduled: bool | None = None
    now: datetime | None = None
    tags: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()


class ClaimedRecipient(msgspec.Struct, frozen=True):
    position: int
    address: str
    status: RecipientStatus


class ClaimedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A message the delivery worker took (status ``sending``) with what it needs."""

    id: str
    account_id: str
    message_id: str  # the Message-ID header, for logs
    mail_from: str
    smtputf8: bool
    raw: bytes
    attempt_count: int
    created_at: datetime
    expires_at: datetime
    recipients: tuple[ClaimedRecipient, ...]

    @property
    def open_recipients(self) -> tuple[ClaimedRecipient, ...]:
        """Recipients still to deliver to: never tried, or deferred by the server."""
        return tuple(
            r
            for r in self.recipients
            if r.status in (RecipientStatus.PENDING, RecipientStatus.DEFERRED)
        )


class RecipientUpdate(msgspec.Struct, frozen=True):
    position: int
    status: RecipientStatus
    smtp_code: int | None
    smtp_message: str | None


class DeliveryOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """The result of working on one claimed message, to be written back in a batch.

    ``attempt`` is None when no attempt was made (expired before trying, or released at
    shutdown); ``count_attempt`` says whether the attempt counts against the schedule.
    """

    outgoing_id: str
    status: OutgoingStatus
    at: datetime
    next_attempt_at: datetime | None
    sent_at: datetime | None
    attempt: Attempt | None
    count_attempt: bool
    recipients: tuple[RecipientUpdate, ...]
    error: OutgoingError | None


class DueAccount(msgspec.Struct, frozen=True):
    """An account with messages due now, for the delivery dispatcher."""

    account_id: str
    due: int
    updated_at: datetime
    tenant: str
