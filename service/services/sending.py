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
from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec

from service.domain.accounts import Account
from service.domain.enums import OutgoingStatus, RecipientKind
from service.domain.ids import new_id
from service.domain.outbox import (
    BASE64_RE,
    AttachmentInput,
    NewOutgoing,
    NewRecipient,
    OutgoingMessage,
    SendRequest,
)
from service.domain.time import utcnow
from service.errors import Conflict, FieldError, Invalid, NotFound, TooLarge
from service.mail import (
    Attachment,
    ComposedMessage,
    Draft,
    MailInputError,
    compose,
    make_message_id,
    parse_address,
)
from service.repository.errors import DuplicateError
from service.repository.notify import Notifier, Topic
from service.repository.outbox import ExistingKey, OutboxRepository
from service.repository.pages import Page
from service.services.accounts import AccountService

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


@dataclass(frozen=True, slots=True)
class Accepted:
    """The message a send request stands for; ``replayed``: an Idempotency-Key replay."""

    message: OutgoingMessage
    replayed: bool


def request_hash(request: SendRequest) -> str:
    """SHA-256 of the request's canonical JSON (fields and header names sorted)."""
    return hashlib.sha256(msgspec.json.encode(request, order="sorted")).hexdigest()


def prepare(
    account: Account,
    request: SendRequest,
    *,
    limits: SendLimits,
    now: datetime,
    idempotency_key: str | None = None,
    hash_of_request: str | None = None,
) -> NewOutgoing:
    """Validate ``request`` for ``account`` and build the outbox row with its bytes.

    Pure (no I/O): the API's rules in one place, testable without a database.

    :raises Invalid: 422 with the ``service.mail`` code (``invalid_address``,
        ``header_injection``, ``protected_header``...), ``too_many_recipients``,
        ``no_body`` or ``invalid_base64``.
    :raises TooLarge: 413 ``attachment_too_large`` or ``message_too_large``.
    """
    attachments, _ = _check_request(request, limits)
    return _build(
        account,
        request,
        attachments,
        limits=limits,
        now=now,
        idempotency_key=idempotency_key,
        hash_of_request=hash_of_request,
    )


def _check_request(request: SendRequest, limits: SendLimits) -> tuple[list[Attachment], int]:
    """The checks that need no composing; returns the decoded attachments and the total
    size of the bodies and attachments."""
    count = request.recipient_count
    if count == 0:
        raise _invalid("to", "at least one recipient (to, cc or bcc) is required", "no_recipients")
    if count > limits.max_recipients:
        raise _invalid(
            "to",
            f"{count} recipients; at most {limits.max_recipients} (to, cc and bcc together)",
            "too_many_recipients",
        )
    if request.text is None and request.html is None:
        raise _invalid("text", "give `text`, `html` or both", "no_body")
    attachments = [
        _decode_attachment(index, item, limits) for index, item in enumerate(request.attachments)
    ]
    total = sum(len(a.data) for a in attachments)
    total += sum(len(body.encode("utf-8", "surrogatepass")) for body in _bodies(request))
    if total > limits.max_send_bytes:
        # The composed message is larger still (base64, headers): refuse before composing.
        raise TooLarge(
            f"the bodies and attachments alone are {total} bytes; the limit for a message"
            f" is {limits.max_send_bytes}",
            code="message_too_large",
        )
    return attachments, total


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
    return Attachment(filename=item.filename, content_type=item.content_type, data=data)


def _build(
    account: Account,
    request: SendRequest,
    attachments: list[Attachment],
    *,
    limits: SendLimits,
    now: datetime,
    idempotency_key: str | None,
    hash_of_request: str | None,
) -> NewOutgoing:
    """Compose the message (Message-ID and Date fixed now) and build its outbox row."""
    draft = _draft(account, request, attachments, now)
    try:
        composed = compose(draft)
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
        to=request.to,
        cc=request.cc,
        bcc=request.bcc,
        reply_to=request.reply_to,
        subject=request.subject,
        message_id=message_id,
        date=now,
        text=request.text,
        html=request.html,
        attachments=attachments,
        headers=request.headers,
    )


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
    return NewOutgoing(
        id=new_id(OUTGOING_ID_PREFIX),
        account_id=account.id,
        message_id=composed.message_id,
        mail_from=composed.mail_from,
        subject=request.subject,
        smtputf8=composed.smtputf8,
        raw=composed.data,
        recipients=_recipients(request, composed),
        idempotency_key=idempotency_key,
        request_hash=hash_of_request,
        created_at=now,
        expires_at=now + timedelta(seconds=limits.max_message_age_s),
    )


def _recipients(request: SendRequest, composed: ComposedMessage) -> tuple[NewRecipient, ...]:
    """The envelope (deduplicated by the composer), each with the field it came from."""
    envelope = set(composed.recipients)
    kinds: dict[str, RecipientKind] = {}
    for kind, values in (
        (RecipientKind.TO, request.to),
        (RecipientKind.CC, request.cc),
        (RecipientKind.BCC, request.bcc),
    ):
        for value in values:
            # Usually given as normalized already; otherwise recover the spelling the
            # composer used (it validated every address, so this cannot fail).
            spelled = value if value in envelope else parse_address(value).addr_spec
            kinds.setdefault(spelled, kind)
    return tuple(NewRecipient(address, kinds[address]) for address in composed.recipients)


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
    ) -> None:
        """``notifier``: told of each committed message, to wake delivery wherever it runs."""
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
        outgoing = await self._prepare(account, request, idempotency_key, digest)
        try:
            known = await self._outbox.accept(outgoing)
        except DuplicateError:
            # The only rule an insert can break here: the account is gone.
            await self._accounts.get(tenant, account_id)
            raise
        if known is not None:  # the same key was committed concurrently
            return await self._replay(account.id, known, digest)
        if self._notifier is not None:
            # Only after the commit: the delivering process must find the message.
            self._notifier.publish(Topic.OUTBOX, account.id)
        return Accepted(outgoing.as_message(), replayed=False)

    async def _prepare(
        self,
        account: Account,
        request: SendRequest,
        idempotency_key: str | None,
        digest: str | None,
    ) -> NewOutgoing:
        attachments, input_bytes = _check_request(request, self._limits)
        build = functools.partial(
            _build,
            account,
            request,
            attachments,
            limits=self._limits,
            now=utcnow(),
            idempotency_key=idempotency_key,
            hash_of_request=digest,
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
        return Accepted(message, replayed=True)

    async def get(self, tenant: str, account_id: str, outgoing_id: str) -> OutgoingMessage:
        await self._accounts.get(tenant, account_id)
        message = await self._outbox.get(account_id, outgoing_id)
        if message is None:
            raise NotFound(f"no outgoing message {outgoing_id!r}")
        return message

    async def page(
        self,
        tenant: str,
        account_id: str,
        status: OutgoingStatus | None,
        *,
        after: str | None,
        limit: int,
    ) -> Page[OutgoingMessage]:
        await self._accounts.get(tenant, account_id)
        return await self._outbox.page(account_id, status, after=after, limit=limit)

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
                f"the message is {message.status}; only queued or deferred messages can be"
                " cancelled",
                code="not_cancellable",
                resource_id=outgoing_id,
            )
        return message
