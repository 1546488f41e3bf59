"""The OpenAPI 3.1 ``webhooks`` section: one entry per event type, with its payload schema
(from ``service.domain.event_payloads``), the Standard Webhooks headers, and what an
endpoint's answers mean. Generated clients get a type per event."""

from __future__ import annotations

from typing import Any

import msgspec

from service.domain.event_payloads import PAYLOADS
from service.domain.events import EventType

REF = "#/components/schemas/{name}"

DESCRIPTIONS = {
    EventType.MESSAGE_RECEIVED: "A retrieval stored a message (one event per message).",
    EventType.RETRIEVAL_SUCCEEDED: "A retrieval ended successfully.",
    EventType.RETRIEVAL_FAILED: "A retrieval failed; `error_code` says why.",
    EventType.OUTGOING_SENT: "An outgoing message was accepted by the SMTP server for every"
    " recipient; per-recipient replies included.",
    EventType.OUTGOING_DEFERRED: "A delivery attempt did not deliver to every recipient and"
    " will be retried at `next_attempt_at`.",
    EventType.OUTGOING_FAILED: "An outgoing message failed for good (refused, or expired).",
    EventType.OUTGOING_BOUNCED: "A retrieved delivery status notification reported"
    " recipients of a sent message as failed.",
    EventType.ACCOUNT_PAUSED: "Delivery of an account stopped for a reason a person must fix"
    " (e.g. the SMTP password was refused).",
    EventType.ACCOUNT_RESUMED: "A pause ended (new outgoing settings, or a restart for causes"
    " a restart may fix).",
    EventType.WEBHOOK_DISABLED: "A webhook endpoint was disabled: it answered 410, or failed"
    " for the whole retry window. Belongs to no account.",
    EventType.WEBHOOK_TEST: "Sent by `POST /v1/webhooks/{webhook_id}/test` to that endpoint only.",
}

_HEADERS = [
    (
        "webhook-id",
        "The event id: the same on every retry of this event; de-duplicate by it",
        {"type": "string", "pattern": "^evt_[0-9a-z]{26}$"},
    ),
    ("webhook-timestamp", "Unix seconds when the request was signed", {"type": "string"}),
    (
        "webhook-signature",
        "`v1,<base64 HMAC-SHA256 of id.timestamp.body>`; during a secret rotation one per"
        " secret in force, separated by spaces (Standard Webhooks)",
        {"type": "string"},
    ),
]


def _camel(event_type: EventType) -> str:
    return "".join(part.capitalize() for part in event_type.value.replace(".", "_").split("_"))


def add_webhooks(document: dict[str, Any]) -> None:
    """Add the ``webhooks`` section and the event schemas to ``document`` (in place)."""
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    payloads = sorted(set(PAYLOADS.values()), key=lambda t: t.__name__)
    (_, components) = msgspec.json.schema_components(payloads, ref_template=REF)
    for name, schema in components.items():
        schemas.setdefault(name, schema)
    webhooks: dict[str, Any] = {}
    for event_type, payload in PAYLOADS.items():
        name = _camel(event_type) + "Event"
        schemas[name] = {
            "type": "object",
            "title": name,
            "description": f"The `{event_type.value}` event as webhooks and `/v1/events` carry it.",
            "required": ["id", "type", "created_at", "tenant", "account_id", "data"],
            "properties": {
                "id": {"type": "string", "description": "Unique; the `webhook-id` header"},
                "type": {"type": "string", "const": event_type.value},
                "created_at": {"type": "string", "format": "date-time"},
                "tenant": {"type": "string"},
                "account_id": {"type": ["string", "null"]},
                "data": {"$ref": REF.format(name=payload.__name__)},
            },
        }
        webhooks[event_type.value] = {
            "post": {
                "operationId": _camel(event_type) + "Webhook",
                "summary": f"`{event_type.value}`",
                "description": DESCRIPTIONS[event_type]
                + " Signed per the Standard Webhooks specification; retried with the same"
                " `webhook-id` on timeouts, connection errors, 429 and 5xx.",
                "tags": ["Webhooks"],
                "security": [],
                "parameters": [
                    {
                        "name": header,
                        "in": "header",
                        "required": True,
                        "description": text,
                        "schema": schema,
                    }
                    for header, text, schema in _HEADERS
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF.format(name=name)}}},
                },
                "responses": {
                    "200": {"description": "Received (any 2xx)"},
                    "410": {"description": "Gone: Mailroom disables the endpoint"},
                    "429": {
                        "description": "Too many requests: retried later (`Retry-After` is"
                        " honoured)"
                    },
                    "500": {"description": "Failed: retried with exponential backoff"},
                },
            }
        }
    document["webhooks"] = webhooks
