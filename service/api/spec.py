"""The OpenAPI document as client generators and linters need it.

Litestar builds the document from the handlers and Structs; two things here shape it:

- :class:`ResponseSchemaPlugin` replaces Litestar's schema of response Structs (those
  without ``forbid_unknown_fields``; requests are ``service.api.requests``'s) so that
  ``required`` says what the server sends: msgspec encodes every field, so all are
  required, except on an ``omit_defaults`` Struct, where a field at its default is left
  out: optional, and never ``null`` when its default is ``None``.
- :class:`MailroomOpenAPIConfig` makes the document object Litestar fills finish itself
  with :func:`finalize` whenever it is rendered, so the served document and the committed
  one (``service.openapi``) are the same. :func:`finalize` writes what Litestar has no
  parameter for: plain nullable types instead of one-item ``oneOf`` wrappers, the response
  headers the server sends, error codes narrowed per response, OpenAPI ``links`` from
  creating operations, ``security: []`` on open routes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from types import NoneType, UnionType
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin

import msgspec
from litestar._openapi.schema_generation.plugins.struct import (
    StructSchemaPlugin as _LitestarStructs,
)
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import OpenAPI
from litestar.plugins.core._msgspec import kwarg_definition_from_field
from litestar.types.empty import Empty
from litestar.typing import FieldDefinition

from service.api.event_spec import add_webhooks
from service.codes import ErrorCode
from service.domain.outbox import RecipientText

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.openapi.spec import Schema

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_REF = "#/components/schemas/Problem"
JSON_MEDIA_TYPES = ("application/json", PROBLEM_MEDIA_TYPE)

# Response headers, declared once under components/headers.
REQUEST_ID = "X-Request-ID"
LOCATION = "Location"
IDEMPOTENCY_REPLAYED = "Idempotency-Replayed"
CONTENT_DISPOSITION = "Content-Disposition"
RETRY_AFTER = "Retry-After"
WWW_AUTHENTICATE = "WWW-Authenticate"

HEADERS: dict[str, dict[str, Any]] = {
    REQUEST_ID: {
        "description": "The request's id: the caller's own `X-Request-ID` when it is 1 to 64"
        " characters of `[A-Za-z0-9._-]`, else a new one. Every log line of the request and"
        " every problem body (`request_id`) carry it.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$", "maxLength": 64},
    },
    LOCATION: {
        "description": "The path of the created resource",
        "required": True,
        "schema": {"type": "string", "format": "uri-reference"},
    },
    IDEMPOTENCY_REPLAYED: {
        "description": "`true`: the answer replays an earlier request with the same"
        " Idempotency-Key; nothing was queued again",
        "required": True,
        "schema": {"type": "string", "enum": ["true"]},
    },
    CONTENT_DISPOSITION: {
        "description": "`attachment` with the file name (`filename*` when it is not ASCII)",
        "required": True,
        "schema": {"type": "string"},
    },
    RETRY_AFTER: {
        "description": "Seconds to wait before trying again",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    },
    WWW_AUTHENTICATE: {
        "description": "The scheme to authenticate with: `Bearer`",
        "required": True,
        "schema": {"type": "string"},
    },
}

# Headers only some operations send, by (operationId, status).
OPERATION_HEADERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("SendMessage", "202"): (LOCATION,),
    ("SendMessage", "200"): (LOCATION, IDEMPOTENCY_REPLAYED),
    ("SendRawMessage", "202"): (LOCATION,),
    ("SendRawMessage", "200"): (LOCATION, IDEMPOTENCY_REPLAYED),
}
# Statuses whose problem `code` is narrowed to the codes the operation can answer: a
# conflict's or a limit's code says which state blocked the request. Other statuses say it
# by themselves (404 `not_found`) or can carry most of the catalogue; they keep the plain
# `Problem`, since a narrowed response becomes a class of its own in some generators.
NARROWED_STATUSES = frozenset({"409", "429"})
# Headers every response of a status carries.
STATUS_HEADERS: dict[str, tuple[str, ...]] = {
    "401": (WWW_AUTHENTICATE,),
    "429": (RETRY_AFTER,),
}


def _link(operation_id: str, description: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": operation_id, "description": description, "parameters": parameters}


_ACCOUNT = "$response.body#/id"
# What a client (or a stateful tester) can call next with the id a creating operation
# answered: every route under a new account, a queued message, a started retrieval.
LINKS: dict[str, dict[str, dict[str, Any]]] = {
    "CreateAccount": {
        name: _link(name, f"{name} on the account just created", account_id=_ACCOUNT)
        for name in (
            "GetAccount",
            "UpdateAccount",
            "DeleteAccount",
            "VerifyAccount",
            "StartRetrieval",
            "ListRetrievals",
            "ListMessages",
            "SendMessage",
            "SendRawMessage",
            "ListOutgoingMessages",
        )
    },
    "SendMessage": {
        name: _link(
            name,
            f"{name} on the message just queued",
            account_id="$request.path.account_id",
            outgoing_id="$response.body#/id",
        )
        for name in ("GetOutgoingMessage", "GetRawOutgoingMessage", "CancelOutgoingMessage")
    },
    "SendRawMessage": {
        name: _link(
            name,
            f"{name} on the message just queued",
            account_id="$request.path.account_id",
            outgoing_id="$response.body#/id",
        )
        for name in ("GetOutgoingMessage", "GetRawOutgoingMessage", "CancelOutgoingMessage")
    },
    "StartRetrieval": {
        name: _link(
            name,
            f"{name} on the retrieval just started",
            account_id="$request.path.account_id",
            retrieval_id="$response.body#/id",
        )
        for name in ("GetRetrieval", "CancelRetrieval")
    },
}


class ResponseSchemaPlugin(_LitestarStructs):
    """Response Struct schemas whose ``required`` and nullability follow what msgspec
    encodes."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        """Structs that are not request bodies (those forbid unknown fields)."""
        if not super().is_plugin_supported_field(field_definition):
            return False
        config = getattr(field_definition.type_, "__struct_config__", None)
        return bool(config is not None and not config.forbid_unknown_fields)

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        """The component schema of a response Struct (rules: the module docstring)."""
        struct_type = field_definition.type_
        config = struct_type.__struct_config__
        type_hints = field_definition.get_type_hints(include_extras=True, resolve_generics=True)
        info = msgspec.inspect.type_info(struct_type)
        assert isinstance(info, msgspec.inspect.StructType)
        properties: dict[str, FieldDefinition] = {}
        required: list[str] = []
        for field in info.fields:
            has_default = not field.required
            omitted = config.omit_defaults and has_default
            annotation = type_hints[field.name]
            if omitted and field.default is None:
                # Left out when None, so never sent as null.
                annotation = _without_none(annotation)
            kwargs: dict[str, Any] = {}
            if kwarg_definition := kwarg_definition_from_field(field)[0]:
                kwargs["kwarg_definition"] = kwarg_definition
            properties[field.encode_name] = FieldDefinition.from_annotation(
                annotation=annotation,
                name=field.encode_name,
                default=(
                    field.default
                    if field.default not in {msgspec.NODEFAULT, msgspec.UNSET}
                    else Empty
                ),
                **kwargs,
            )
            if not omitted:
                required.append(field.encode_name)
        return schema_creator.create_component_schema(
            field_definition, required=sorted(required), property_fields=properties
        )


def _without_none(annotation: Any) -> Any:
    """``X | None`` as ``X`` (other annotations unchanged)."""
    if get_origin(annotation) in (Union, UnionType):
        rest = tuple(a for a in get_args(annotation) if a is not NoneType)
        return rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007
    return annotation


@dataclass
class _FinishedOpenAPI(OpenAPI):
    """The document Litestar fills in; rendered through :func:`finalize`."""

    def to_schema(self) -> dict[str, Any]:
        return finalize(super().to_schema())


@dataclass
class MailroomOpenAPIConfig(OpenAPIConfig):
    """``OpenAPIConfig`` whose document finishes itself with :func:`finalize`."""

    def to_openapi_schema(self) -> OpenAPI:
        base = super().to_openapi_schema()
        return _FinishedOpenAPI(**{f.name: getattr(base, f.name) for f in fields(base)})


def finalize(document: dict[str, Any]) -> dict[str, Any]:
    """The document as rendered by Litestar, finished (a new dict; the input is kept)."""
    doc = copy.deepcopy(document)
    components = doc.setdefault("components", {})
    components["schemas"] = _recipient_text(_plain_unions(components.get("schemas", {})))
    components["headers"] = copy.deepcopy(HEADERS)
    for item in doc.get("paths", {}).values():
        for method, operation in item.items():
            if method in {"get", "put", "post", "patch", "delete", "head", "options"}:
                _finish_operation(operation)
    add_webhooks(doc)
    return doc


def _header_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


def _finish_operation(operation: dict[str, Any]) -> None:
    operation_id = operation.get("operationId", "")
    if "security" not in operation:
        operation["security"] = []  # an open route (the /v1 router declares its own)
    for key in ("parameters", "requestBody"):
        if key in operation:
            operation[key] = _plain_unions(operation[key])
    for status, response in operation.get("responses", {}).items():
        response["content"] = _plain_unions(response.get("content", {})) or None
        if response["content"] is None:
            del response["content"]
        names = (
            REQUEST_ID,
            *STATUS_HEADERS.get(status, ()),
            *OPERATION_HEADERS.get((operation_id, status), ()),
        )
        if status.startswith("2") and _is_download(response):
            names = (*names, CONTENT_DISPOSITION)
        headers = response.get("headers") or {}
        headers.update({name: _header_ref(name) for name in names})
        response["headers"] = headers
        _narrow_problem(status, response)
        if status.startswith("2") and operation_id in LINKS:
            response["links"] = copy.deepcopy(LINKS[operation_id])


def _is_download(response: dict[str, Any]) -> bool:
    """A body of bytes offered as a file (raw messages, attachments), not a text page."""
    content = response.get("content", {})
    return any(
        media.get("schema", {}).get("format") == "binary" and not media_type.startswith("text/")
        for media_type, media in content.items()
    )


def _narrow_problem(status: str, response: dict[str, Any]) -> None:
    """A problem response whose examples name some codes says only those can come."""
    media = response.get("content", {}).get(PROBLEM_MEDIA_TYPE)
    if not media or media.get("schema") != {"$ref": PROBLEM_REF}:
        return
    for example in (media.get("examples") or {}).values():
        example.pop("id", None)  # Litestar's key of the example, not an Example field
    codes = [
        example["value"]["code"]
        for example in (media.get("examples") or {}).values()
        if isinstance(example.get("value"), dict) and "code" in example["value"]
    ]
    if status not in NARROWED_STATUSES or not codes or set(codes) >= set(ErrorCode):
        return
    media["schema"] = {
        "allOf": [
            {"$ref": PROBLEM_REF},
            {
                "type": "object",
                "required": ["code"],
                "properties": {"code": {"type": "string", "enum": sorted(set(codes))}},
            },
        ]
    }


#: The string form of a recipient, as msgspec states it (Litestar drops the bounds and the
#: description of a string that is one member of a union).
_RECIPIENT_TEXT = msgspec.json.schema(RecipientText)


def _recipient_text(node: Any) -> Any:
    """Every ``oneOf [string, NamedAddress]`` below ``node`` with the string form's rules."""
    if isinstance(node, list):
        return [_recipient_text(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _recipient_text(value) for key, value in node.items()}
    choices = out.get("oneOf")
    if (
        isinstance(choices, list)
        and {"$ref": "#/components/schemas/NamedAddress"} in choices
        and {"type": "string"} in choices
    ):
        out["oneOf"] = [dict(_RECIPIENT_TEXT) if c == {"type": "string"} else c for c in choices]
    return out


def _plain_unions(node: Any) -> Any:
    """One-item ``oneOf`` wrappers unwrapped and ``oneOf [T, null]`` as ``type: [T, "null"]``,
    everywhere below ``node``. Generators turn the wrappers into classes such as
    ``DisplayName2``; the plain form is what a person would write."""
    if isinstance(node, list):
        return [_plain_unions(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _plain_unions(value) for key, value in node.items()}
    choices = out.get("oneOf")
    if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict):
        del out["oneOf"]
        out.update(choices[0])
    elif isinstance(choices, list) and len(choices) == 2 and {"type": "null"} in choices:
        other = next(c for c in choices if c != {"type": "null"})
        if isinstance(other.get("type"), str) and "$ref" not in other:
            del out["oneOf"]
            out.update(other)
            out["type"] = [other["type"], "null"]
    return out
