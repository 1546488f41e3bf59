"""The outbox: send requests, their delivery state, the Sent Items copy, cancelling."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.exceptions import ClientException, SerializationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType
from litestar.params import HeaderParameter, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED
from msgspec import Meta

from service.api.dependencies import AccountId, OutgoingId, outbox_of, tenant_of
from service.api.middleware import is_json_media_type
from service.api.pagination import DEFAULT_PAGE_SIZE, Cursor, Limit, after_of, list_response
from service.api.problems import (
    COMMON_ERRORS,
    NOT_FOUND,
    SEND_INPUT_CODES,
    UNSUPPORTED_BODY,
    problem_spec,
)
from service.api.raw import OCTET_STREAM, RFC822, RawMessageOperation, raw_message_response
from service.api.requests import decode_strict
from service.api.schemas import OutgoingMessageList
from service.codes import ErrorCode
from service.domain.enums import OutgoingStatus
from service.domain.outbox import (
    BASE64_RE,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_VALUE_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    NAME_RE,
    OutgoingMessage,
    RawSendRequest,
    SendRequest,
)
from service.errors import FieldError, Invalid, UnsupportedMediaType

REPLAY_HEADER = "Idempotency-Replayed"

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_CHARS,
        # Printable ASCII (space included); `(?!\n)` because Python's `$` also matches
        # before a final newline.
        pattern=r"^[\x20-\x7e]+$(?!\n)",
        description="Makes the request safe to retry: the same key with the same body"
        " returns the original message (200, `Idempotency-Replayed: true`) and sends"
        " nothing again; with a different body it is 409 `idempotency_key_reused`. Keys are"
        " per account.",
        required=False,
    ),
]
StatusFilter = Annotated[
    OutgoingStatus | None,
    QueryParameter(
        description="Only messages in this status (`scheduled`: accepted with a `send_at`"
        " still ahead)"
    ),
]
TagFilter = Annotated[
    list[Annotated[str, Meta(max_length=MAX_TAG_CHARS)]] | None,
    QueryParameter(
        max_items=MAX_TAGS,
        description="Only messages with this tag; repeated, with every one of them",
    ),
]
_METADATA_PARAM = re.compile(r"metadata\[(.*)\]\Z", re.DOTALL)


def metadata_filter(request: Request[Any, Any, Any]) -> tuple[tuple[str, str], ...]:
    """The ``metadata[key]=value`` query parameters, each key once (422 otherwise)."""
    found: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        match = _METADATA_PARAM.match(name)
        if match is None:
            continue
        key = match.group(1)
        field = f"query.{name}"
        if not NAME_RE.match(key) or len(key) > MAX_METADATA_KEY_CHARS:
            raise Invalid(
                f"{field}: not a metadata key",
                errors=[FieldError(field, "not a metadata key (letters, digits, `_ . : -`)")],
            )
        if key in found:
            raise Invalid(f"{field}: given twice", errors=[FieldError(field, "give each key once")])
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise Invalid(
                f"{field}: too long",
                errors=[FieldError(field, f"at most {MAX_METADATA_VALUE_CHARS} characters")],
            )
        found[key] = value
    return tuple(found.items())


SEND_ERRORS = {
    **COMMON_ERRORS,
    **NOT_FOUND,
    **UNSUPPORTED_BODY,
    409: problem_spec(
        "The Idempotency-Key was used with a different request (`idempotency_key_reused`)",
        ErrorCode.IDEMPOTENCY_KEY_REUSED,
        ErrorCode.CONFLICT,
    ),
    413: problem_spec(
        "Too large: the body (`request_too_large`), one attachment (`attachment_too_large`)"
        " or the composed message (`message_too_large`)",
        ErrorCode.REQUEST_TOO_LARGE,
        ErrorCode.ATTACHMENT_TOO_LARGE,
        ErrorCode.MESSAGE_TOO_LARGE,
    ),
    422: problem_spec(
        "Invalid input; `code` says which rule: `validation_error` (the body's shape),"
        " `invalid_address`, `header_injection` (CR, LF, controls or line separators in a"
        " subject, name or header value), `protected_header`, `invalid_header_name`,"
        " `duplicate_header`, `too_many_recipients`, `no_recipients`, `no_body`,"
        " `invalid_base64`, `invalid_attachment`, `invalid_body`, `too_long`, `too_many`,"
        " `invalid_metadata`, `invalid_tag`, `invalid_send_at`, `conflicting_fields`"
        " (`reply_to_message` with `forward_message`)",
        *SEND_INPUT_CODES,
    ),
}


RAW_SEND_ERRORS = {
    **SEND_ERRORS,
    415: problem_spec(
        "The body is not `message/rfc822`, `application/octet-stream` or `application/json`"
        " (`unsupported_media_type`)",
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    ),
    422: problem_spec(
        "Invalid message or options; `code` says which rule: `validation_error` (the JSON"
        " body's shape), `header_injection` (a header line that is not a field or its"
        " continuation), `invalid_header_name`, `duplicate_header`, `from_not_allowed`,"
        " `invalid_address`, `invalid_message_id`, `invalid_body` (NUL), `too_long` (a line"
        " over 998 octets), `no_recipients`, `too_many_recipients`, `invalid_base64`,"
        " `invalid_metadata`, `invalid_tag`, `invalid_send_at`",
        *SEND_INPUT_CODES,
        ErrorCode.FROM_NOT_ALLOWED,
    ),
}
_RAW_SEND_SCHEMA = msgspec.json.schema_components(
    [RawSendRequest], ref_template="#/components/schemas/{name}"
)[1]["RawSendRequest"]
for _property in _RAW_SEND_SCHEMA["properties"].values():
    # `extra` is Litestar's way to add schema keywords; msgspec writes it as is.
    _property.update(_property.pop("extra", {}))


@dataclass
class RawSendOperation(Operation):
    """Documents the request body: the message itself, or base64 in JSON with options."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            description="The message itself (CRLF or LF line ends) as `message/rfc822` or,"
            " the same, `application/octet-stream` (documented so, as client generators know"
            " no `message/*` body), or JSON with it in base64 and the envelope, metadata, tags"
            " and `send_at`",
            content={
                OCTET_STREAM: OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.STRING,
                        format=OpenAPIFormat.BINARY,
                        content_media_type=RFC822,
                    )
                ),
                "application/json": OpenAPIMediaType(schema=_RAW_SEND_SCHEMA),
            },
        )


def _raw_options(content_type: str | None, body: bytes) -> tuple[RawSendRequest, bytes]:
    """The options and the message bytes of a SendRawMessage body."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type in (RFC822, OCTET_STREAM):
        return RawSendRequest(raw_base64=""), body
    if content_type is None or not is_json_media_type(content_type):
        raise UnsupportedMediaType(
            f"the body must be {RFC822}, {OCTET_STREAM} or application/json, not"
            f" {(content_type or '')[:100]!r}"
        )
    try:
        options: RawSendRequest = decode_strict(body or b"null", RawSendRequest)
    except msgspec.ValidationError as exc:
        raise Invalid(f"the body: {exc}", errors=[FieldError("body", str(exc))]) from None
    except msgspec.DecodeError as exc:
        # The path any body that is not JSON takes (400 ``malformed_json``).
        raise ClientException(str(exc)) from SerializationException(str(exc))
    encoded = options.raw_base64
    if not BASE64_RE.match(encoded):
        raise Invalid(
            "raw_base64: not valid base64 (standard alphabet, padded)",
            code="invalid_base64",
            errors=[FieldError("raw_base64", "not valid base64 (standard alphabet, padded)")],
        )
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Invalid(
            f"raw_base64: not valid base64: {exc}",
            code="invalid_base64",
            errors=[FieldError("raw_base64", f"not valid base64: {exc}")],
        ) from None
    return options, data


class OutboxController(Controller):
    path = "/accounts/{account_id:str}/outbox"
    tags = ["Outbox"]

    @post(
        operation_id="SendMessage",
        summary="Queue a message for delivery through the account's SMTP server",
        description="Validates and composes the message (From is the account), fixes its"
        " Message-ID and Date, commits it durably and only then answers 202. Delivery"
        " happens in the background: poll the message for its status. Bcc recipients are"
        " in the envelope only.",
        status_code=HTTP_202_ACCEPTED,
        response_description="Accepted: the message is queued",
        responses={
            **SEND_ERRORS,
            200: ResponseSpec(
                data_container=OutgoingMessage,
                description="A replay of an earlier request with the same Idempotency-Key"
                f" (header `{REPLAY_HEADER}: true`): the original message, nothing queued",
                generate_examples=False,
            ),
        },
    )
    async def send_message(
        self,
        request: Request[Any, Any, Any],
        account_id: AccountId,
        data: JSONBody[SendRequest],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[OutgoingMessage]:
        accepted = await outbox_of(request).send(
            tenant_of(request), account_id, data, idempotency_key
        )
        message = accepted.message
        headers = {"Location": f"/v1/accounts/{account_id}/outbox/{message.id}"}
        if accepted.replayed:
            headers[REPLAY_HEADER] = "true"
            return Response(message, status_code=HTTP_200_OK, headers=headers)
        return Response(message, status_code=HTTP_202_ACCEPTED, headers=headers)

    @post(
        "/raw",
        operation_id="SendRawMessage",
        summary="Queue a complete MIME message for delivery as it is",
        description="For messages built elsewhere: the body is the message itself"
        " (`message/rfc822`), or JSON with it in base64 plus an optional envelope"
        " (`recipients`), `metadata`, `tags` and `send_at`. Mailroom checks it (header"
        " fields well formed, no NUL, lines of at most 998 octets, one From that is the"
        " account's address, To/Cc/Bcc addresses valid, the size), adds Message-ID and Date"
        " when missing, turns every line break into CRLF, removes Bcc fields (their"
        " addresses stay in the envelope) and sends nothing else differently. The envelope"
        " is To + Cc + Bcc unless `recipients` is given. Answers as SendMessage does.",
        status_code=HTTP_202_ACCEPTED,
        response_description="Accepted: the message is queued (or scheduled)",
        responses={
            **RAW_SEND_ERRORS,
            200: ResponseSpec(
                data_container=OutgoingMessage,
                description="A replay of an earlier request with the same Idempotency-Key"
                f" (header `{REPLAY_HEADER}: true`): the original message, nothing queued",
                generate_examples=False,
            ),
        },
        operation_class=RawSendOperation,
    )
    async def send_raw_message(
        self,
        request: Request[Any, Any, Any],
        account_id: AccountId,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[OutgoingMessage]:
        options, data = _raw_options(request.headers.get("content-type"), await request.body())
        accepted = await outbox_of(request).send_raw(
            tenant_of(request), account_id, options, data, idempotency_key
        )
        message = accepted.message
        headers = {"Location": f"/v1/accounts/{account_id}/outbox/{message.id}"}
        if accepted.replayed:
            headers[REPLAY_HEADER] = "true"
            return Response(message, status_code=HTTP_200_OK, headers=headers)
        return Response(message, status_code=HTTP_202_ACCEPTED, headers=headers)

    @get(
        operation_id="ListOutgoingMessages",
        summary="List the account's outgoing messages, newest first",
        description="A page of the outbox, newest first, optionally only one `status`, only"
        " messages with given `tag`s, and only those whose metadata has given values:"
        " `metadata[KEY]=VALUE` (repeatable for several keys, e.g."
        " `?metadata[order_id]=A-1042&tag=receipt`); follow `next_cursor` for the next page.",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def list_outgoing_messages(
        self,
        request: Request[Any, Any, Any],
        account_id: AccountId,
        limit: Limit = DEFAULT_PAGE_SIZE,
        cursor: Cursor = None,
        status: StatusFilter = None,
        tag: TagFilter = None,
    ) -> OutgoingMessageList:
        page = await outbox_of(request).page(
            tenant_of(request),
            account_id,
            status,
            after=after_of(cursor),
            limit=limit,
            tags=tuple(tag or ()),
            metadata=metadata_filter(request),
        )
        return list_response(OutgoingMessageList, page, lambda m: m)

    @get(
        "/{outgoing_id:str}",
        operation_id="GetOutgoingMessage",
        summary="Get an outgoing message: status, every attempt, every recipient",
        description="`attempts` lists each delivery attempt with the server's reply;"
        " `recipients` what the server last said for each address. `error` is why the"
        " message failed, or why its last attempt did not deliver it.",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def get_outgoing_message(
        self, request: Request[Any, Any, Any], account_id: AccountId, outgoing_id: OutgoingId
    ) -> OutgoingMessage:
        return await outbox_of(request).get(tenant_of(request), account_id, outgoing_id)

    @get(
        "/{outgoing_id:str}/raw",
        operation_id="GetRawOutgoingMessage",
        summary="Download the exact bytes sent (message/rfc822): the Sent Items copy",
        description="`message/rfc822`, or `application/octet-stream` when `Accept` asks"
        " for only that.",
        media_type=RFC822,
        responses={**COMMON_ERRORS, **NOT_FOUND},
        response_description="The message as composed at acceptance, CRLF line ends",
        operation_class=RawMessageOperation,
    )
    async def get_raw_outgoing_message(
        self,
        request: Request[Any, Any, Any],
        account_id: AccountId,
        outgoing_id: OutgoingId,
    ) -> Response[bytes]:
        raw = await outbox_of(request).raw(tenant_of(request), account_id, outgoing_id)
        return raw_message_response(raw, f"{outgoing_id}.eml", request.headers.get("accept"))

    @delete(
        "/{outgoing_id:str}",
        operation_id="CancelOutgoingMessage",
        summary="Cancel a message that is still queued or deferred",
        description="Answers with the cancelled message (cancelling it again changes"
        " nothing). 409 `not_cancellable` once it is being sent or is sent or failed.",
        status_code=HTTP_200_OK,
        responses={
            **COMMON_ERRORS,
            **NOT_FOUND,
            409: problem_spec(
                "The message is sending, sent or failed (`not_cancellable`)",
                ErrorCode.NOT_CANCELLABLE,
            ),
        },
    )
    async def cancel_outgoing_message(
        self, request: Request[Any, Any, Any], account_id: AccountId, outgoing_id: OutgoingId
    ) -> OutgoingMessage:
        return await outbox_of(request).cancel(tenant_of(request), account_id, outgoing_id)
