"""The outbox: send requests, their delivery state, the Sent Items copy, cancelling."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from service.api.dependencies import AccountId, OutgoingId, outbox_of, tenant_of
from service.api.pagination import DEFAULT_PAGE_SIZE, Cursor, Limit, after_of, list_response
from service.api.problems import (
    COMMON_ERRORS,
    NOT_FOUND,
    SEND_INPUT_CODES,
    UNSUPPORTED_BODY,
    problem_spec,
)
from service.api.raw import RFC822, RawMessageOperation, raw_message_response
from service.api.schemas import OutgoingMessageList
from service.codes import ErrorCode
from service.domain.enums import OutgoingStatus
from service.domain.outbox import MAX_IDEMPOTENCY_KEY_CHARS, OutgoingMessage, SendRequest

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
    OutgoingStatus | None, QueryParameter(description="Only messages in this status")
]

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
        " `invalid_base64`, `invalid_attachment`, `invalid_body`, `too_long`, `too_many`",
        *SEND_INPUT_CODES,
    ),
}


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

    @get(
        operation_id="ListOutgoingMessages",
        summary="List the account's outgoing messages, newest first",
        description="A page of the outbox, newest first, optionally only one `status`;"
        " follow `next_cursor` for the next page.",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def list_outgoing_messages(
        self,
        request: Request[Any, Any, Any],
        account_id: AccountId,
        limit: Limit = DEFAULT_PAGE_SIZE,
        cursor: Cursor = None,
        status: StatusFilter = None,
    ) -> OutgoingMessageList:
        page = await outbox_of(request).page(
            tenant_of(request), account_id, status, after=after_of(cursor), limit=limit
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
