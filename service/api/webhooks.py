"""Webhook endpoints: register, list, change, delete, rotate the secret, send a test, and
read every delivery attempt."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, PathParameter
from msgspec import UNSET, Meta, UnsetType

from service.api.dependencies import ID_MAX, Tenant
from service.api.pagination import DEFAULT_PAGE_SIZE, Cursor, Limit, after_of, list_response
from service.api.problems import BAD_BODY, COMMON_ERRORS, NOT_FOUND, problem_spec
from service.api.schemas import ListResponse
from service.codes import ErrorCode
from service.domain.webhooks import Webhook, WebhookAttempt
from service.services.webhooks import MAX_ACCOUNT_IDS, MAX_URL_CHARS, WebhookService

Webhooks = NamedDependency[WebhookService]
WebhookId = Annotated[str, PathParameter(max_length=ID_MAX, description="A webhook id")]

SubscribedType = Literal[
    "*",
    "message.received",
    "retrieval.succeeded",
    "retrieval.failed",
    "outgoing.sent",
    "outgoing.deferred",
    "outgoing.failed",
    "outgoing.bounced",
    "account.paused",
    "account.resumed",
    "webhook.disabled",
]
Url = Annotated[
    str,
    Meta(
        min_length=8,
        max_length=MAX_URL_CHARS,
        pattern=r"^https?://[^\s]+$(?!\n)",
        description="Where events are POSTed: https, or http to a host inside"
        " `MAILROOM_ALLOWED_NETWORKS`",
    ),
]
EventTypes = Annotated[
    list[SubscribedType],
    Meta(
        min_length=1,
        max_length=16,
        description='Event types to receive, or `["*"]` for all',
    ),
]
AccountIds = Annotated[
    list[Annotated[str, Meta(min_length=1, max_length=ID_MAX)]],
    Meta(max_length=MAX_ACCOUNT_IDS, description="Only events of these accounts"),
]
Description = Annotated[str, Meta(max_length=500)]


class WebhookInput(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: Url
    events: EventTypes
    account_ids: AccountIds | None = None
    enabled: bool = True
    description: Description | None = None


class WebhookPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: Url | UnsetType = UNSET
    events: EventTypes | UnsetType = UNSET
    account_ids: AccountIds | UnsetType | None = UNSET
    enabled: bool | UnsetType = UNSET
    description: Description | UnsetType | None = UNSET


class WebhookOut(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    url: str
    events: list[str]
    account_ids: list[str] | None
    enabled: bool
    description: str | None
    # Why it is disabled: `by_caller`, `gone` (answered 410) or `failing` (a whole day).
    disabled_reason: str | None
    failing_since: datetime | None
    previous_secret_until: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, w: Webhook) -> WebhookOut:
        return cls(
            id=w.id,
            url=w.url,
            events=w.events,
            account_ids=w.account_ids,
            enabled=w.enabled,
            description=w.description,
            disabled_reason=w.disabled_reason,
            failing_since=w.failing_since,
            previous_secret_until=w.previous_secret_until,
            created_at=w.created_at,
            updated_at=w.updated_at,
        )


class WebhookWithSecret(msgspec.Struct, frozen=True, kw_only=True):
    """The endpoint and its signing secret, shown only in this response."""

    webhook: WebhookOut
    secret: str


class WebhookTestOut(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str  # the `webhook-id` the test request carries


class WebhookAttemptOut(msgspec.Struct, frozen=True, kw_only=True):
    delivery_id: str
    event_id: str  # the request's `webhook-id`
    event_type: str
    attempt: int
    at: datetime
    outcome: Literal["delivered", "retrying", "failed"]
    duration_ms: int
    response_status: int | None
    response_body: str | None  # the first 512 characters
    error: str | None

    @classmethod
    def of(cls, a: WebhookAttempt) -> WebhookAttemptOut:
        return cls(
            delivery_id=a.delivery_id,
            event_id=a.event_id,
            event_type=a.event_type,
            attempt=a.attempt,
            at=a.at,
            outcome=a.outcome,  # type: ignore[arg-type]
            duration_ms=a.duration_ms,
            response_status=a.response_status,
            response_body=a.response_body,
            error=a.error,
        )


class WebhookList(ListResponse[WebhookOut], frozen=True):
    pass


class WebhookAttemptList(ListResponse[WebhookAttemptOut], frozen=True):
    pass


URL_ERRORS = {
    422: problem_spec(
        "Invalid input (`validation_error`); a URL whose host resolves into a network the"
        " outbound guard refuses (`host_not_allowed`); plain http to a host outside"
        " `MAILROOM_ALLOWED_NETWORKS` (`https_required`)",
        ErrorCode.VALIDATION_ERROR,
        ErrorCode.HOST_NOT_ALLOWED,
        ErrorCode.HTTPS_REQUIRED,
    ),
}


class WebhookController(Controller):
    path = "/webhooks"
    tags = ["Webhooks"]

    @post(
        operation_id="CreateWebhook",
        summary="Register a webhook endpoint",
        description="Events of the given types (and accounts) are POSTed to `url`, signed per"
        " the Standard Webhooks specification. The signing `secret` (`whsec_...`) is"
        " returned only in this response.",
        responses={**COMMON_ERRORS, **URL_ERRORS, **BAD_BODY},
    )
    async def create_webhook(
        self, data: JSONBody[WebhookInput], tenant: Tenant, webhooks: Webhooks
    ) -> WebhookWithSecret:
        webhook, secret = await webhooks.create(
            tenant,
            url=data.url,
            events=list(dict.fromkeys(data.events)),
            account_ids=data.account_ids,
            enabled=data.enabled,
            description=data.description,
        )
        return WebhookWithSecret(webhook=WebhookOut.of(webhook), secret=secret)

    @get(
        operation_id="ListWebhooks",
        summary="List webhook endpoints",
        description="A page of the caller's endpoints (secrets are never shown).",
        responses=COMMON_ERRORS,
    )
    async def list_webhooks(
        self,
        tenant: Tenant,
        webhooks: Webhooks,
        limit: Limit = DEFAULT_PAGE_SIZE,
        cursor: Cursor = None,
    ) -> WebhookList:
        page = await webhooks.page(tenant, after=after_of(cursor), limit=limit)
        return list_response(WebhookList, page, WebhookOut.of)

    @get(
        "/{webhook_id:str}",
        operation_id="GetWebhook",
        summary="Get a webhook endpoint",
        description="The endpoint, whether it is enabled, and why not (`disabled_reason`).",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def get_webhook(
        self, webhook_id: WebhookId, tenant: Tenant, webhooks: Webhooks
    ) -> WebhookOut:
        return WebhookOut.of(await webhooks.get(tenant, webhook_id))

    @patch(
        "/{webhook_id:str}",
        operation_id="UpdateWebhook",
        summary="Change a webhook endpoint",
        description="Only the fields given change. `enabled: true` re-enables an endpoint"
        " disabled for failing; its waiting deliveries are tried again.",
        responses={**COMMON_ERRORS, **URL_ERRORS, **NOT_FOUND, **BAD_BODY},
    )
    async def update_webhook(
        self,
        webhook_id: WebhookId,
        data: JSONBody[WebhookPatch],
        tenant: Tenant,
        webhooks: Webhooks,
    ) -> WebhookOut:
        changes = {
            name: getattr(data, name)
            for name in data.__struct_fields__
            if getattr(data, name) is not UNSET
        }
        if "events" in changes:
            changes["events"] = list(dict.fromkeys(changes["events"]))
        return WebhookOut.of(await webhooks.update(tenant, webhook_id, changes))

    @delete(
        "/{webhook_id:str}",
        operation_id="DeleteWebhook",
        summary="Delete a webhook endpoint",
        description="Nothing more is sent to it; its attempts are forgotten.",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def delete_webhook(
        self, webhook_id: WebhookId, tenant: Tenant, webhooks: Webhooks
    ) -> None:
        await webhooks.delete(tenant, webhook_id)

    @post(
        "/{webhook_id:str}/rotate-secret",
        operation_id="RotateWebhookSecret",
        summary="Rotate a webhook endpoint's signing secret",
        description="Returns the new secret (only here). The old one keeps signing beside it"
        " (two signatures in `webhook-signature`) until `previous_secret_until`"
        " (`MAILROOM_WEBHOOK_SECRET_GRACE`).",
        status_code=200,
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def rotate_webhook_secret(
        self, webhook_id: WebhookId, tenant: Tenant, webhooks: Webhooks
    ) -> WebhookWithSecret:
        webhook, secret = await webhooks.rotate(tenant, webhook_id)
        return WebhookWithSecret(webhook=WebhookOut.of(webhook), secret=secret)

    @post(
        "/{webhook_id:str}/test",
        operation_id="TestWebhook",
        summary="Send a test event to a webhook endpoint",
        description="Queues a `webhook.test` event for this endpoint only (delivered and"
        " retried like any other); its attempts show at `/deliveries`.",
        status_code=202,
        responses={
            **COMMON_ERRORS,
            **NOT_FOUND,
            409: problem_spec(
                "The endpoint is disabled (`webhook_disabled`)", ErrorCode.WEBHOOK_DISABLED
            ),
        },
    )
    async def test_webhook(
        self, webhook_id: WebhookId, tenant: Tenant, webhooks: Webhooks
    ) -> WebhookTestOut:
        return WebhookTestOut(event_id=await webhooks.test(tenant, webhook_id))

    @get(
        "/{webhook_id:str}/deliveries",
        operation_id="ListWebhookDeliveries",
        summary="List a webhook endpoint's delivery attempts",
        description="Every attempt, newest first: the event, its outcome, the HTTP status, the"
        " duration and the first bytes of the response body (or the connection error).",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def list_webhook_deliveries(
        self,
        webhook_id: WebhookId,
        tenant: Tenant,
        webhooks: Webhooks,
        limit: Limit = DEFAULT_PAGE_SIZE,
        cursor: Cursor = None,
    ) -> WebhookAttemptList:
        page = await webhooks.attempts(tenant, webhook_id, after=after_of(cursor), limit=limit)
        return list_response(WebhookAttemptList, page, WebhookAttemptOut.of)
