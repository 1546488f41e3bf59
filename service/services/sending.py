"""Accepting send requests: validate, compose, commit durably, then wake delivery.

A 202 means the message is in the outbox on disk (``synchronous=FULL``) with its final
bytes: Message-ID and Date are fixed here, at acceptance, so every later attempt (also
one after a crash) sends the very same message.

Validation is strict and never repairs input (``service.mail``): each refusal has its
own stable ``code``. Limits come from the settings: recipients (422
``too_many_recipients``), one attachment (413 ``attachment_too_large``) and the composed
message (413 ``message_too_large``).

``Idempotency-Key``: the same key with the same request (a hash of its canonical JSON)
returns the original message, flagged as a replay, and nothing is queued again; the same
key with another request is 409 ``idempotency_key_reused``. Keys are per account.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import policy as email_policy
from email.parser import BytesHeaderParser
from typing import Any

import msgspec

from service.domain.accounts import Account
from service.domain.enums import OutgoingStatus, RecipientKind
from service.domain.ids import new_id
from service.domain.outbox import (
    BASE64_RE,
    MAX_METADATA_BYTES,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_CHARS,
    MAX_SUBJECT_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    NAME_RE,
    AttachmentInput,
    ForwardAs,
    NamedAddress,
    NewOutgoing,
    NewRecipient,
    OutboxFilter,
    OutgoingMessage,
    RawSendRequest,
    RecipientEntry,
    SendRequest,
)
from service.domain.threads import answer_references, root_to_look_up, thread_id_for
from service.domain.time import to_text, utcnow
from service.errors import Conflict, FieldError, Invalid, NotFound, TooLarge
from service.mail import (
    Attachment,
    ComposedMessage,
    Draft,
    Mailbox,
    MailInputError,
    compose,
    make_message_id,
)
from service.mail.addresses import parse_address, validate_display_name
from service.mail.forward import (
    attach_original,
    attachable,
    forward_headers,
    inline_forward,
)
from service.mail.parse import msg_ids, references_of, summarize
from service.mail.rawsend import prepare_raw
from service.repository.errors import DuplicateError
from service.repository.notify import Notifier, Topic
from service.repository.outbox import ExistingKey, OutboxRepository
from service.repository.pages import Page
from service.services.accounts import AccountService
from service.services.messages import MessageService

# Composing a large message (base64 of big attachments) takes long enough to stall every
# other request: above this many input bytes it runs in a thread.
COMPOSE_IN_THREAD_BYTES = 256 * 1024
OUTGOING_ID_PREFIX = "out"


@dataclass(frozen=True, slots=True)
class SendLimits:
    """The configurable limits on one send request (from the settings)."""

    max_recipients: int
    max_attachment_bytes: int
    max_send_bytes: int
    max_message_age_s: float
    send_at_horizon_s: float = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Accepted:
    """The message a send request stands for; ``replayed``: an Idempotency-Key replay."""

    message: OutgoingMessage
    replayed: bool


# Fields added since requests were first hashed: left out at their defaults, so a key
# stored before they existed still matches the same request retried after an upgrade.
_LATER_FIELDS: dict[str, object] = {
    "metadata": {},
    "tags": [],
    "send_at": None,
    "reply_to_message": None,
    "reply_all": False,
    "forward_message": None,
    "forward_as": None,
}


def request_hash(request: SendRequest) -> str:
    """SHA-256 of the request's canonical JSON (fields and header names sorted)."""
    fields = msgspec.to_builtins(request)
    for name, default in _LATER_FIELDS.items():
        if fields.get(name) == default:
            del fields[name]
    for attachment in fields.get("attachments", ()):
        if attachment.get("content_id") is None:
            attachment.pop("content_id", None)
    return hashlib.sha256(msgspec.json.encode(fields, order="sorted")).hexdigest()


def prepare(
    account: Account,
    request: SendRequest,
    *,
    limits: SendLimits,
    now: datetime,
    idempotency_key: str | None = None,
    hash_of_request: str | None = None,
    original: bytes | None = None,
) -> NewOutgoing:
    """Validate ``request`` for ``account`` and build the outbox row with its bytes.

    Pure (no I/O): the API's rules in one place, testable without a database.
    ``original``: the raw bytes of the stored message ``request`` forwards (its
    ``forward_message``; subject and References already filled by :func:`forward_request`).

    :raises Invalid: 422 with the ``service.mail`` code (``invalid_address``,
        ``header_injection``, ``protected_header``...), ``too_many_recipients``,
        ``no_body`` or ``invalid_base64``.
    :raises TooLarge: 413 ``attachment_too_large`` or ``message_too_large``.
    """
    attachments, _ = _check_request(request, limits, original)
    return _build(
        account,
        request,
        attachments,
        limits=limits,
        now=now,
        idempotency_key=idempotency_key,
        hash_of_request=hash_of_request,
        original=original,
    )


def _check_request(
    request: SendRequest, limits: SendLimits, original: bytes | None = None
) -> tuple[list[Attachment], int]:
    """The checks that need no composing; returns the decoded attachments and the total
    size of the bodies, attachments and the forwarded message."""
    if request.subject is None:
        raise _invalid("subject", "required (may be empty)", "validation_error")
    count = request.recipient_count
    if count == 0:
        raise _invalid("to", "at least one recipient (to, cc or bcc) is required", "no_recipients")
    if count > limits.max_recipients:
        raise _invalid(
            "to",
            f"{count} recipients; at most {limits.max_recipients} (to, cc and bcc together)",
            "too_many_recipients",
        )
    if request.text is None and request.html is None and original is None:
        raise _invalid("text", "give `text`, `html` or both", "no_body")
    _check_metadata(request.metadata)
    _check_tags(request.tags)
    attachments = [
        _decode_attachment(index, item, limits) for index, item in enumerate(request.attachments)
    ]
    total = sum(len(a.data) for a in attachments)
    total += sum(len(body.encode("utf-8", "surrogatepass")) for body in _bodies(request))
    total += len(original or b"")
    if total > limits.max_send_bytes:
        # The composed message is larger still (base64, headers): refuse before composing.
        raise TooLarge(
            f"the bodies, attachments and forwarded message alone are {total} bytes; the"
            " limit for a message"
            f" is {limits.max_send_bytes}",
            code="message_too_large",
        )
    return attachments, total


def _check_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > MAX_METADATA_KEYS:
        raise _invalid(
            "metadata", f"{len(metadata)} keys; at most {MAX_METADATA_KEYS}", "invalid_metadata"
        )
    total = 0
    for key, value in metadata.items():
        if not NAME_RE.match(key) or len(key) > MAX_METADATA_KEY_CHARS:
            raise _invalid(
                "metadata",
                f"key {key[:80]!r}: 1-{MAX_METADATA_KEY_CHARS} letters, digits or `_ . : -`,"
                " starting with a letter or digit",
                "invalid_metadata",
            )
        field = f"metadata.{key}"
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise _invalid(
                field,
                f"{len(value)} characters; at most {MAX_METADATA_VALUE_CHARS}",
                "invalid_metadata",
            )
        if not value.isprintable():
            raise _invalid(field, "control characters are not allowed", "invalid_metadata")
        total += len(key.encode()) + len(value.encode("utf-8", "surrogatepass"))
    if total > MAX_METADATA_BYTES:
        raise _invalid(
            "metadata",
            f"{total} bytes of keys and values; at most {MAX_METADATA_BYTES}",
            "invalid_metadata",
        )


def _check_tags(tags: list[str]) -> None:
    if len(tags) > MAX_TAGS:
        raise _invalid("tags", f"{len(tags)} tags; at most {MAX_TAGS}", "invalid_tag")
    seen: set[str] = set()
    for index, tag in enumerate(tags):
        field = f"tags[{index}]"
        if not NAME_RE.match(tag) or len(tag) > MAX_TAG_CHARS:
            raise _invalid(
                field,
                f"1-{MAX_TAG_CHARS} letters, digits or `_ . : -`, starting with a letter or digit",
                "invalid_tag",
            )
        if tag in seen:
            raise _invalid(field, f"{tag!r} is given twice", "invalid_tag")
        seen.add(tag)


def _send_at(value: datetime | None, limits: SendLimits, now: datetime) -> datetime | None:
    """The UTC time to deliver at, or None to deliver now (no `send_at`, or one past)."""
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise _invalid("send_at", "give a time zone offset (RFC 3339)", "invalid_send_at")
    value = value.astimezone(UTC)
    horizon = now + timedelta(seconds=limits.send_at_horizon_s)
    if value > horizon:
        raise _invalid(
            "send_at",
            f"at most {limits.send_at_horizon_s:g} seconds ahead ({to_text(horizon)})",
            "invalid_send_at",
        )
    return value if value > now else None


def _bodies(request: SendRequest) -> list[str]:
    return [body for body in (request.text, request.html) if body is not None]


def _decode_attachment(index: int, item: AttachmentInput, limits: SendLimits) -> Attachment:
    field = f"attachments[{index}].content_base64"
    encoded = item.content_base64
    # Decoded size from the encoded length: refuse a huge one before allocating it.
    estimated = len(encoded) // 4 * 3 - encoded[-2:].count("=")
    if estimated > limits.max_attachment_bytes:
        raise TooLarge(
            f"{field}: about {estimated} bytes decoded; at most {limits.max_attachment_bytes}",
            code="attachment_too_large",
        )
    if not BASE64_RE.match(encoded):
        # Exactly the documented pattern: the decoder alone would accept excess padding.
        raise _invalid(field, "not valid base64 (standard alphabet, padded)", "invalid_base64")
    try:
        # validate=True: only the base64 alphabet and padding, no whitespace or junk that
        # a lenient decoder would silently skip.
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid(field, f"not valid base64: {exc}", "invalid_base64") from None
    if len(data) > limits.max_attachment_bytes:
        raise TooLarge(
            f"{field}: {len(data)} bytes decoded; at most {limits.max_attachment_bytes}",
            code="attachment_too_large",
        )
    return Attachment(
        filename=item.filename,
        content_type=item.content_type,
        data=data,
        content_id=item.content_id,
    )


def _build(
    account: Account,
    request: SendRequest,
    attachments: list[Attachment],
    *,
    limits: SendLimits,
    now: datetime,
    idempotency_key: str | None,
    hash_of_request: str | None,
    original: bytes | None = None,
) -> NewOutgoing:
    """Compose the message (Message-ID and Date fixed now) and build its outbox row;
    with ``original``, the forward of it (see :mod:`service.mail.forward`)."""
    attached: bytes | None = None
    try:
        if original is not None and request.forward_as is ForwardAs.INLINE:
            own_ids = [a.content_id for a in attachments if a.content_id is not None]
            inline = inline_forward(original, request.text, request.html, own_ids)
            request = msgspec.structs.replace(request, text=inline.text, html=inline.html)
            attachments = [*attachments, *inline.attachments]
        elif original is not None:
            attached = attachable(original)
        composed = compose(_draft(account, request, attachments, now))
        if attached is not None and original is not None:
            composed = attach_original(composed, attached, forward_headers(original).filename)
    except MailInputError as exc:
        raise _invalid(exc.field, exc.message, exc.code.value) from None
    return _outgoing(account, request, composed, limits, now, idempotency_key, hash_of_request)


def _draft(
    account: Account, request: SendRequest, attachments: list[Attachment], now: datetime
) -> Draft:
    _, _, domain = account.email.rpartition("@")
    try:
        message_id = make_message_id(domain)
    except MailInputError as exc:
        raise _invalid(
            "from",
            f"the account's email {account.email!r} cannot be a sender: {exc.message}",
            exc.code.value,
        ) from None
    return Draft(
        from_address=account.email,
        from_name=account.display_name,
        to=_mailboxes(request.to),
        cc=_mailboxes(request.cc),
        bcc=_mailboxes(request.bcc),
        reply_to=None if request.reply_to is None else _mailbox(request.reply_to),
        subject=request.subject or "",
        message_id=message_id,
        date=now,
        text=request.text,
        html=request.html,
        attachments=attachments,
        headers=request.headers,
    )


def _mailbox(entry: RecipientEntry) -> str | Mailbox:
    if isinstance(entry, NamedAddress):
        return Mailbox(entry.address, entry.name)
    return entry


def _mailboxes(entries: list[RecipientEntry]) -> list[str | Mailbox]:
    return [_mailbox(entry) for entry in entries]


def _outgoing(
    account: Account,
    request: SendRequest,
    composed: ComposedMessage,
    limits: SendLimits,
    now: datetime,
    idempotency_key: str | None,
    hash_of_request: str | None,
) -> NewOutgoing:
    if composed.size > limits.max_send_bytes:
        raise TooLarge(
            f"the composed message is {composed.size} bytes; at most {limits.max_send_bytes}",
            code="message_too_large",
        )
    send_at = _send_at(request.send_at, limits, now)
    return NewOutgoing(
        id=new_id(OUTGOING_ID_PREFIX),
        account_id=account.id,
        message_id=composed.message_id,
        mail_from=composed.mail_from,
        subject=request.subject or "",
        smtputf8=composed.smtputf8,
        raw=composed.data,
        recipients=_recipients(composed),
        idempotency_key=idempotency_key,
        request_hash=hash_of_request,
        created_at=now,
        expires_at=(send_at or now) + timedelta(seconds=limits.max_message_age_s),
        metadata=dict(request.metadata),
        tags=list(request.tags),
        send_at=send_at,
        **_thread_fields(composed.message_id, request.headers),
    )


def _thread_fields(message_id: str, headers: Mapping[str, str]) -> dict[str, str | None]:
    """``thread_id`` and ``thread_root`` of a composed message from the threading headers
    it was given (a reply's and a forward's are among them), read as a stored message's
    are (:mod:`service.domain.threads`), without parsing the composed bytes again."""
    given = {name.lower(): value for name, value in headers.items()}
    in_reply_to = next(iter(msg_ids(given.get("in-reply-to"))), None)
    references = references_of(given.get("references"))
    return _thread_of(message_id, in_reply_to, references)


def _thread_of(
    message_id: str | None, in_reply_to: str | None, references: Sequence[str]
) -> dict[str, str | None]:
    return {
        "thread_id": thread_id_for(message_id, in_reply_to, references, message_id or "out"),
        "thread_root": root_to_look_up(message_id, in_reply_to, references),
    }


def _recipients(composed: ComposedMessage) -> tuple[NewRecipient, ...]:
    """The envelope (deduplicated by the composer), each with the field it came from."""
    kinds: dict[str, RecipientKind] = {}
    for kind, values in (
        (RecipientKind.TO, composed.to),
        (RecipientKind.CC, composed.cc),
        (RecipientKind.BCC, composed.bcc),
    ):
        for value in values:
            kinds.setdefault(value, kind)
    return tuple(
        NewRecipient(
            address,
            kinds[address],
            None if kinds[address] is RecipientKind.BCC else composed.names.get(address),
        )
        for address in composed.recipients
    )


def prepare_raw_send(
    account: Account,
    request: RawSendRequest,
    data: bytes,
    *,
    limits: SendLimits,
    now: datetime,
    idempotency_key: str | None = None,
    hash_of_request: str | None = None,
) -> NewOutgoing:
    """Validate a raw message (``data``) and its options, and build its outbox row.

    :raises Invalid: 422 with the ``service.mail`` code, ``too_many_recipients``,
        ``invalid_metadata``, ``invalid_tag`` or ``invalid_send_at``.
    :raises TooLarge: 413 ``message_too_large``.
    """
    if len(data) > limits.max_send_bytes:
        raise TooLarge(
            f"the message is {len(data)} bytes; at most {limits.max_send_bytes}",
            code="message_too_large",
        )
    _check_metadata(request.metadata)
    _check_tags(request.tags)
    send_at = _send_at(request.send_at, limits, now)
    try:
        raw = prepare_raw(data, account_email=account.email, date=now, envelope=request.recipients)
    except MailInputError as exc:
        raise _invalid(exc.field, exc.message, exc.code.value) from None
    if len(raw.recipients) > limits.max_recipients:
        raise _invalid(
            "recipients",
            f"{len(raw.recipients)} recipients; at most {limits.max_recipients}",
            "too_many_recipients",
        )
    if len(raw.data) > limits.max_send_bytes:
        raise TooLarge(
            f"the message is {len(raw.data)} bytes; at most {limits.max_send_bytes}",
            code="message_too_large",
        )
    return NewOutgoing(
        id=new_id(OUTGOING_ID_PREFIX),
        account_id=account.id,
        message_id=raw.message_id,
        mail_from=raw.mail_from,
        subject=raw.subject,
        smtputf8=raw.smtputf8,
        raw=raw.data,
        recipients=tuple(
            NewRecipient(
                address,
                RecipientKind(raw.kinds[address]),
                None if raw.kinds[address] == "bcc" else raw.names.get(address),
            )
            for address in raw.recipients
        ),
        idempotency_key=idempotency_key,
        request_hash=hash_of_request,
        created_at=now,
        expires_at=(send_at or now) + timedelta(seconds=limits.max_message_age_s),
        metadata=dict(request.metadata),
        tags=list(request.tags),
        send_at=send_at,
        **_raw_thread_fields(raw.data),
    )


def _raw_thread_fields(data: bytes) -> dict[str, str | None]:
    head = summarize(data)
    return _thread_of(head.message_id, head.in_reply_to, head.references)


def raw_request_hash(request: RawSendRequest, data: bytes) -> str:
    """SHA-256 of a raw send: the message's own hash and the options, canonical JSON."""
    options = msgspec.structs.replace(request, raw_base64=hashlib.sha256(data).hexdigest())
    return hashlib.sha256(b"raw:" + msgspec.json.encode(options, order="sorted")).hexdigest()


_THREAD_ID = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")


def reply_request(request: SendRequest, original: bytes, account_email: str) -> SendRequest:
    """``request`` with what answering ``original`` (its raw bytes) fills in: In-Reply-To,
    References, the ``Re:`` subject and the recipients, each only where not given."""
    head = BytesHeaderParser(policy=email_policy.default).parsebytes(original)
    message_id = _one_id(head.get("Message-ID"))
    headers = dict(request.headers)
    if message_id is not None:
        found = _THREAD_ID.findall(str(head.get("References") or ""))
        references = answer_references(
            [r for r in found if _valid_id(r)], _one_id(head.get("In-Reply-To")), message_id
        )
        given = {name.lower() for name in headers}
        if "in-reply-to" not in given:
            headers["In-Reply-To"] = message_id
        if "references" not in given:
            headers["References"] = " ".join(references)
    subject = request.subject
    if subject is None:
        original_subject = " ".join(str(head.get("Subject") or "").split())
        subject = (
            original_subject
            if original_subject[:3].lower() == "re:"
            else f"Re: {original_subject}".rstrip()
        )
    to: list[RecipientEntry] = list(request.to)
    cc: list[RecipientEntry] = list(request.cc)
    if not (to or cc or request.bcc):
        own = _spec(account_email)
        targets = _mailboxes_of(head, "Reply-To") or _mailboxes_of(head, "From")
        chosen = [t for t in targets if t.address != own]
        to = list(chosen)
        if request.reply_all:
            seen = {own, *(t.address for t in chosen)}
            for entry in _mailboxes_of(head, "To") + _mailboxes_of(head, "Cc"):
                if entry.address not in seen:
                    seen.add(entry.address)
                    cc.append(entry)
        if not to and cc:
            to, cc = cc[:1], cc[1:]
    return msgspec.structs.replace(
        request, to=to, cc=cc, subject=subject[:MAX_SUBJECT_CHARS], headers=headers
    )


def forward_request(request: SendRequest, original: bytes) -> SendRequest:
    """``request`` with what forwarding ``original`` (its raw bytes) fills in: the ``Fwd:``
    subject and ``References`` (the original's and its Message-ID), each only where not
    given; recipients and bodies stay the caller's (see :func:`prepare`)."""
    found = forward_headers(original)
    headers = dict(request.headers)
    if found.references and "references" not in {name.lower() for name in headers}:
        headers["References"] = found.references
    subject = found.subject if request.subject is None else request.subject
    return msgspec.structs.replace(request, subject=subject[:MAX_SUBJECT_CHARS], headers=headers)


def _valid_id(value: str) -> bool:
    return len(value) <= 250 and value.isascii() and value.isprintable()


def _one_id(value: object) -> str | None:
    found = _THREAD_ID.findall(str(value or ""))
    return found[0] if found and _valid_id(found[0]) else None


def _spec(address: str) -> str:
    try:
        return parse_address(address).addr_spec
    except MailInputError:
        return address


def _mailboxes_of(head: Any, name: str) -> list[NamedAddress]:
    """The valid mailboxes of header ``name`` (others left out), names kept when sendable."""
    header = head.get(name)
    found: list[NamedAddress] = []
    for mailbox in getattr(header, "addresses", ()) if header is not None else ():
        try:
            address = parse_address(mailbox.addr_spec).addr_spec
        except MailInputError:
            continue
        try:
            display = validate_display_name(mailbox.display_name) or None
        except MailInputError:
            display = None
        found.append(NamedAddress(address=address, name=display))
    return found


def _check_forward_fields(request: SendRequest) -> None:
    """A message is answered or forwarded, not both; ``forward_as`` goes with a forward."""
    if request.forward_message is not None and request.reply_to_message is not None:
        raise _invalid(
            "forward_message",
            "give either reply_to_message or forward_message, not both",
            "conflicting_fields",
        )
    if request.forward_as is not None and request.forward_message is None:
        raise _invalid("forward_as", "only with forward_message", "validation_error")


def _invalid(field: str, message: str, code: str) -> Invalid:
    return Invalid(f"{field}: {message}", code=code, errors=[FieldError(field, message)])


class SendingService:
    """The outbox use cases callers drive: send, read, list, cancel."""

    def __init__(
        self,
        accounts: AccountService,
        outbox: OutboxRepository,
        *,
        limits: SendLimits,
        notifier: Notifier | None = None,
        messages: MessageService | None = None,
    ) -> None:
        """``notifier``: told of each committed message, to wake delivery wherever it runs;
        ``messages``: the stored messages ``reply_to_message`` names."""
        self._messages = messages
        self._accounts = accounts
        self._outbox = outbox
        self._limits = limits
        self._notifier = notifier

    async def send(
        self,
        tenant: str,
        account_id: str,
        request: SendRequest,
        idempotency_key: str | None = None,
    ) -> Accepted:
        """Accept ``request``: 202 once committed, or the replay of an earlier one."""
        account = await self._accounts.get(tenant, account_id)
        digest = request_hash(request) if idempotency_key is not None else None
        if idempotency_key is not None:
            known = await self._outbox.find_key(account.id, idempotency_key)
            if known is not None:
                return await self._replay(account.id, known, digest)
        _check_forward_fields(request)
        original: bytes | None = None
        if request.reply_to_message is not None:
            request = await self._as_reply(tenant, account, request)
        elif request.reply_all:
            raise _invalid("reply_all", "only with reply_to_message", "validation_error")
        elif request.forward_message is not None:
            request, original = await self._as_forward(tenant, account, request)
        outgoing = await self._prepare(account, request, idempotency_key, digest, original)
        outgoing = await self._join_parent_thread(outgoing)
        try:
            known = await self._outbox.accept(outgoing)
        except DuplicateError:
            # The only rule an insert can break here: the account is gone.
            await self._accounts.get(tenant, account_id)
            raise
        if known is not None:  # the same key was committed concurrently
            return await self._replay(account.id, known, digest)
        if self._notifier is not None:
            # Only after the commit: the delivering process must find the message (a
            # scheduled one makes the worker look again when it falls due).
            self._notifier.publish(Topic.OUTBOX, account.id)
        return Accepted(outgoing.as_message(), replayed=False)

    async def _as_reply(self, tenant: str, account: Account, request: SendRequest) -> SendRequest:
        if self._messages is None or request.reply_to_message is None:
            raise _invalid("reply_to_message", "replies are not available", "validation_error")
        original = await self._messages.raw(tenant, account.id, request.reply_to_message)
        return reply_request(request, original, account.email)

    async def _as_forward(
        self, tenant: str, account: Account, request: SendRequest
    ) -> tuple[SendRequest, bytes]:
        if self._messages is None or request.forward_message is None:
            raise _invalid("forward_message", "forwards are not available", "validation_error")
        original = await self._messages.raw(tenant, account.id, request.forward_message)
        return forward_request(request, original), original

    async def send_raw(
        self,
        tenant: str,
        account_id: str,
        request: RawSendRequest,
        data: bytes,
        idempotency_key: str | None = None,
    ) -> Accepted:
        """Accept a raw message (see :func:`prepare_raw_send`) as :meth:`send` does."""
        account = await self._accounts.get(tenant, account_id)
        digest = raw_request_hash(request, data) if idempotency_key is not None else None
        if idempotency_key is not None:
            known = await self._outbox.find_key(account.id, idempotency_key)
            if known is not None:
                return await self._replay(account.id, known, digest)
        build = functools.partial(
            prepare_raw_send,
            account,
            request,
            data,
            limits=self._limits,
            now=utcnow(),
            idempotency_key=idempotency_key,
            hash_of_request=digest,
        )
        if len(data) >= COMPOSE_IN_THREAD_BYTES:
            outgoing = await asyncio.to_thread(build)
        else:
            outgoing = build()
        return await self._commit(tenant, account, outgoing, digest)

    async def _commit(
        self, tenant: str, account: Account, outgoing: NewOutgoing, digest: str | None
    ) -> Accepted:
        outgoing = await self._join_parent_thread(outgoing)
        try:
            known = await self._outbox.accept(outgoing)
        except DuplicateError:
            await self._accounts.get(tenant, account.id)
            raise
        if known is not None:
            return await self._replay(account.id, known, digest)
        if self._notifier is not None:
            self._notifier.publish(Topic.OUTBOX, account.id)
        return Accepted(outgoing.as_message(), replayed=False)

    async def _join_parent_thread(self, outgoing: NewOutgoing) -> NewOutgoing:
        """``outgoing`` in its root's thread when the account has stored or sent the root
        (see :func:`service.domain.threads.root_to_look_up`): a reply to a message that
        named only its parent joins that message's thread."""
        if outgoing.thread_root is None:
            return outgoing
        thread = await self._outbox.thread_of(outgoing.account_id, outgoing.thread_root)
        if thread is None or thread == outgoing.thread_id:
            return outgoing
        return msgspec.structs.replace(outgoing, thread_id=thread)

    async def _prepare(
        self,
        account: Account,
        request: SendRequest,
        idempotency_key: str | None,
        digest: str | None,
        original: bytes | None = None,
    ) -> NewOutgoing:
        attachments, input_bytes = _check_request(request, self._limits, original)
        build = functools.partial(
            _build,
            account,
            request,
            attachments,
            limits=self._limits,
            now=utcnow(),
            idempotency_key=idempotency_key,
            hash_of_request=digest,
            original=original,
        )
        if input_bytes >= COMPOSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(build)
        return build()

    async def _replay(self, account_id: str, known: ExistingKey, digest: str | None) -> Accepted:
        if known.request_hash != digest:
            raise Conflict(
                "this Idempotency-Key was used for a different request; use a new key",
                code="idempotency_key_reused",
                resource_id=known.outgoing_id,
            )
        message = await self._outbox.get(account_id, known.outgoing_id)
        if message is None:
            raise NotFound(f"no outgoing message {known.outgoing_id!r}")
        return Accepted(shown(message, utcnow()), replayed=True)

    async def get(self, tenant: str, account_id: str, outgoing_id: str) -> OutgoingMessage:
        await self._accounts.get(tenant, account_id)
        message = await self._outbox.get(account_id, outgoing_id)
        if message is None:
            raise NotFound(f"no outgoing message {outgoing_id!r}")
        return shown(message, utcnow())

    async def page(
        self,
        tenant: str,
        account_id: str,
        status: OutgoingStatus | None,
        *,
        after: str | None,
        limit: int,
        tags: tuple[str, ...] = (),
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> Page[OutgoingMessage]:
        """A page, newest first; ``scheduled`` and ``queued`` are told apart by ``send_at``
        (both are stored queued)."""
        await self._accounts.get(tenant, account_id)
        now = utcnow()
        scheduled: bool | None = None
        if status is OutgoingStatus.SCHEDULED:
            status, scheduled = OutgoingStatus.QUEUED, True
        elif status is OutgoingStatus.QUEUED:
            scheduled = False
        where = OutboxFilter(scheduled=scheduled, now=now, tags=tags, metadata=metadata)
        page = await self._outbox.page(account_id, status, after=after, limit=limit, where=where)
        return Page(items=[shown(m, now) for m in page.items], next_after=page.next_after)

    async def raw(self, tenant: str, account_id: str, outgoing_id: str) -> bytes:
        await self._accounts.get(tenant, account_id)
        raw = await self._outbox.raw(account_id, outgoing_id)
        if raw is None:
            raise NotFound(f"no outgoing message {outgoing_id!r}")
        return raw

    async def cancel(self, tenant: str, account_id: str, outgoing_id: str) -> OutgoingMessage:
        """Cancel a queued or deferred message; 409 ``not_cancellable`` once it is being
        sent or is done. Cancelling a cancelled message changes nothing."""
        await self._accounts.get(tenant, account_id)
        cancelled = await self._outbox.cancel(account_id, outgoing_id, utcnow())
        message = await self._outbox.get(account_id, outgoing_id)
        if message is None:
            raise NotFound(f"no outgoing message {outgoing_id!r}")
        if not cancelled and message.status is not OutgoingStatus.CANCELLED:
            raise Conflict(
                f"the message is {message.status}; only scheduled, queued or deferred"
                " messages can be cancelled",
                code="not_cancellable",
                resource_id=outgoing_id,
            )
        return message


def shown(message: OutgoingMessage, now: datetime) -> OutgoingMessage:
    """``message`` as callers see it: a queued message whose ``send_at`` is ahead is
    ``scheduled``."""
    if (
        message.status is OutgoingStatus.QUEUED
        and message.send_at is not None
        and message.send_at > now
    ):
        return msgspec.structs.replace(message, status=OutgoingStatus.SCHEDULED)
    return message
