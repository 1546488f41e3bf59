"""Retrievals (POP3) and the message store."""

from __future__ import annotations

import re
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.params import QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from service.api.dependencies import (
    AccountId,
    AttachmentIndex,
    MessageId,
    Messages,
    RetrievalId,
    Retrievals,
    Tenant,
)
from service.api.pagination import DEFAULT_PAGE_SIZE, Cursor, Limit, after_of, list_response
from service.api.problems import COMMON_ERRORS, NOT_FOUND, problem_spec
from service.api.raw import (
    OCTET_STREAM,
    RFC822,
    UNTRUSTED_CONTENT_HEADERS,
    AttachmentOperation,
    RawMessageOperation,
    raw_message_response,
    wants_octets,
)
from service.api.requests import TIMESTAMP_PATTERN, parse_timestamp
from service.api.schemas import MessageDetail, MessageSummaryList, RetrievalList
from service.codes import ErrorCode
from service.domain.retrievals import MessageFilter, Retrieval
from service.domain.threads import THREAD_ID_PATTERN
from service.mail.parse import safe_content_disposition
from service.services.retrieval import CANCEL_WAIT_S, MAX_WAIT_S

_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")


class RetrievalController(Controller):
    path = "/accounts/{account_id:str}/retrievals"
    tags = ["Retrievals"]

    @post(
        operation_id="StartRetrieval",
        summary="Retrieve new mail from the account's POP3 server now",
        description="Answers at once with the queued retrieval; poll it for progress."
        " 409 `retrieval_running` (with `resource_id`) while one runs for the account."
        " 429 `too_many_retrievals` when the service's retrieval slots, or the tenant's"
        " share of them (`MAILROOM_MAX_RETRIEVALS_PER_TENANT`), are all in use; the"
        " detail says which.",
        status_code=HTTP_202_ACCEPTED,
        responses={
            **COMMON_ERRORS,
            **NOT_FOUND,
            409: problem_spec(
                "A retrieval is already running (`retrieval_running`)",
                ErrorCode.RETRIEVAL_RUNNING,
            ),
            429: problem_spec(
                "All retrieval slots, or this tenant's share of them, are in use"
                " (`too_many_retrievals`); `Retry-After` says when to try again",
                ErrorCode.TOO_MANY_RETRIEVALS,
            ),
        },
    )
    async def start_retrieval(
        self, account_id: AccountId, tenant: Tenant, retrievals: Retrievals
    ) -> Retrieval:
        return await retrievals.trigger(tenant, account_id)

    @get(
        operation_id="ListRetrievals",
        summary="List the account's retrievals, newest first",
        description="A page of the account's retrievals, newest first; follow"
        " `next_cursor` for the next page.",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def list_retrievals(
        self,
        account_id: AccountId,
        tenant: Tenant,
        retrievals: Retrievals,
        limit: Limit = DEFAULT_PAGE_SIZE,
        cursor: Cursor = None,
    ) -> RetrievalList:
        page = await retrievals.page(tenant, account_id, after=after_of(cursor), limit=limit)
        return list_response(RetrievalList, page, lambda r: r)

    @get(
        "/{retrieval_id:str}",
        operation_id="GetRetrieval",
        summary="Get a retrieval with its progress and outcome",
        description="Counts grow while it runs; `status` ends `succeeded`, `failed` or"
        " `cancelled`, and `error` says why it did not succeed. With `wait`, the answer"
        " comes when the retrieval ends or when that many seconds have passed, whichever"
        f" is first (a long poll; at most {MAX_WAIT_S} s, 422 `validation_error` above):"
        " `status` says which.",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def get_retrieval(
        self,
        account_id: AccountId,
        retrieval_id: RetrievalId,
        tenant: Tenant,
        retrievals: Retrievals,
        wait: Annotated[
            float | None,
            QueryParameter(
                ge=0,
                le=MAX_WAIT_S,
                # Litestar leaves a bound of 0 out of the schema (it tests truthiness).
                schema_extra={"minimum": 0},
                description="Seconds to wait for the retrieval to end before answering"
                f" (at most {MAX_WAIT_S}); without it, the answer is immediate",
            ),
        ] = None,
    ) -> Retrieval:
        if wait:
            return await retrievals.wait(tenant, account_id, retrieval_id, wait)
        return await retrievals.get(tenant, account_id, retrieval_id)

    @post(
        "/{retrieval_id:str}/cancel",
        operation_id="CancelRetrieval",
        summary="Cancel a queued or running retrieval",
        description="The retrieval stops at its next safe point: what it already downloaded"
        " is stored, and its POP3 session is dropped without QUIT, so nothing is deleted on"
        " the server in that session. It ends `cancelled` (error code `cancelled`) and frees"
        " its slot. Answers with the retrieval as it ended, after waiting for it to stop"
        f" (at most {CANCEL_WAIT_S:g} s; a retrieval already deleting and quitting may still"
        " end `succeeded`). 409 `retrieval_finished` if it had already ended.",
        status_code=HTTP_200_OK,
        responses={
            **COMMON_ERRORS,
            **NOT_FOUND,
            409: problem_spec(
                "The retrieval has already ended (`retrieval_finished`)",
                ErrorCode.RETRIEVAL_FINISHED,
            ),
        },
    )
    async def cancel_retrieval(
        self,
        account_id: AccountId,
        retrieval_id: RetrievalId,
        tenant: Tenant,
        retrievals: Retrievals,
    ) -> Retrieval:
        return await retrievals.cancel(tenant, account_id, retrieval_id)


class MessageController(Controller):
    path = "/accounts/{account_id:str}/messages"
    tags = ["Messages"]

    @get(
        operation_id="ListMessages",
        summary="List stored messages, newest first, or one conversation oldest first",
        description="Summaries of the messages in the local store, newest first, filtered by"
        " the query; follow `next_cursor` for the next page. With `thread_id`: the whole"
        " conversation oldest first (by `Date`, then arrival, then id), the account's own"
        " outgoing messages of it included (`direction: sent`, `id` `out_...`; cancelled"
        " and failed ones left out); the other filters apply to both (`since`: the time"
        " a sent copy was accepted).",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def list_messages(
        self,
        account_id: AccountId,
        tenant: Tenant,
        messages: Messages,
        limit: Limit = DEFAULT_PAGE_SIZE,
        cursor: Cursor = None,
        since: Annotated[
            str | None,
            QueryParameter(
                pattern=TIMESTAMP_PATTERN,
                schema_extra={"format": "date-time"},
                description="Retrieved at or after this time (RFC 3339, with its offset)",
            ),
        ] = None,
        from_: Annotated[
            str | None,
            QueryParameter(name="from", max_length=200, description="`from` contains this"),
        ] = None,
        subject: Annotated[
            str | None, QueryParameter(max_length=200, description="`subject` contains this")
        ] = None,
        to: Annotated[
            str | None,
            QueryParameter(max_length=200, description="one of the `to` addresses contains this"),
        ] = None,
        q: Annotated[
            str | None,
            QueryParameter(
                max_length=200, description="`subject`, `from` or one of `to` contains this"
            ),
        ] = None,
        has_attachments: Annotated[bool | None, QueryParameter()] = None,
        message_id: Annotated[
            str | None,
            QueryParameter(
                max_length=1000,
                description="Only messages with exactly this Message-ID (with its angle"
                " brackets, e.g. `<abc@example.org>`)",
            ),
        ] = None,
        thread_id: Annotated[
            str | None,
            QueryParameter(
                pattern=THREAD_ID_PATTERN,
                description="Only this conversation (a message's `thread_id`, `thr_` and 24"
                " hex digits), oldest first, sent copies included",
            ),
        ] = None,
    ) -> MessageSummaryList:
        flt = MessageFilter(
            since=parse_timestamp(since, "since"),
            from_contains=from_,
            subject_contains=subject,
            to_contains=to,
            text_contains=q,
            has_attachments=has_attachments,
            message_id=message_id,
            thread_id=thread_id,
        )
        page = await messages.page(tenant, account_id, flt, after=after_of(cursor), limit=limit)
        return list_response(MessageSummaryList, page, lambda m: m)

    @get(
        "/{message_id:str}",
        operation_id="GetMessage",
        summary="Get a message parsed: headers, text and html bodies, attachment list",
        description="Bodies are decoded to Unicode (their charset is given). A message the"
        " parser finds malformed is still served; `defects` says what was wrong.",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def get_message(
        self, account_id: AccountId, message_id: MessageId, tenant: Tenant, messages: Messages
    ) -> MessageDetail:
        summary, parsed = await messages.parsed(tenant, account_id, message_id)
        return MessageDetail.of(summary, parsed)

    @get(
        "/{message_id:str}/raw",
        operation_id="GetRawMessage",
        summary="Download the exact bytes retrieved (message/rfc822)",
        description="`message/rfc822`, or `application/octet-stream` when `Accept` asks"
        " for only that.",
        media_type=RFC822,
        responses={**COMMON_ERRORS, **NOT_FOUND},
        response_description="The message as retrieved over POP3",
        operation_class=RawMessageOperation,
    )
    async def get_raw_message(
        self,
        request: Request[Any, Any, Any],
        account_id: AccountId,
        message_id: MessageId,
        tenant: Tenant,
        messages: Messages,
    ) -> Response[bytes]:
        raw = await messages.raw(tenant, account_id, message_id)
        return raw_message_response(raw, f"{message_id}.eml", request.headers.get("accept"))

    @get(
        "/{message_id:str}/attachments/{index:int}",
        operation_id="GetAttachment",
        summary="Download one attachment's decoded bytes",
        description="Served with the attachment's own `content_type` (from the attachment"
        " list; `application/octet-stream` when that is not a valid media type), or as"
        " `application/octet-stream` when `Accept` asks for only that.",
        media_type=OCTET_STREAM,
        responses={**COMMON_ERRORS, **NOT_FOUND},
        response_description="The attachment's decoded bytes",
        operation_class=AttachmentOperation,
    )
    async def get_attachment(
        self,
        request: Request[Any, Any, Any],
        account_id: AccountId,
        message_id: MessageId,
        index: AttachmentIndex,
        tenant: Tenant,
        messages: Messages,
    ) -> Response[bytes]:
        found = await messages.attachment(tenant, account_id, message_id, index)
        media = found.content_type.lower()
        if not _MEDIA_TYPE.fullmatch(media) or wants_octets(request.headers.get("accept"), media):
            media = OCTET_STREAM
        return Response(
            found.data,
            media_type=media,
            headers={
                "Content-Disposition": safe_content_disposition(found.filename),
                **UNTRUSTED_CONTENT_HEADERS,
            },
        )

    @delete(
        "/{message_id:str}",
        operation_id="DeleteMessage",
        summary="Delete a message from the local store (the server copy is untouched)",
        description="Its UIDL stays known, so it is not downloaded again.",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def delete_message(
        self, account_id: AccountId, message_id: MessageId, tenant: Tenant, messages: Messages
    ) -> None:
        await messages.delete(tenant, account_id, message_id)
