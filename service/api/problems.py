"""Errors to RFC 9457 ``application/problem+json``: the one place they are mapped.

Every error response of the service is built here, from a ``ServiceError`` (the service's
own), a Litestar ``HTTPException`` (routing, body decoding, size limits) or anything else
(a bug: logged with its traceback, answered 500 with no internals).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    SerializationException,
    ValidationException,
)
from litestar.openapi.datastructures import ResponseSpec

from service import errors

PROBLEM_MEDIA_TYPE = "application/problem+json"
logger = logging.getLogger("mailroom.api")

STATUS_OF: dict[type[errors.ServiceError], int] = {
    errors.BadRequest: 400,
    errors.Unauthorized: 401,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.Invalid: 422,
    errors.TooManyRequests: 429,
    errors.Upstream: 502,
    errors.Unavailable: 503,
    errors.StorageFull: 507,
}


class ProblemField(msgspec.Struct, frozen=True):
    field: str
    message: str


class Problem(msgspec.Struct, frozen=True, omit_defaults=True):
    """RFC 9457 problem details with a stable machine-readable ``code``."""

    type: str
    title: str
    status: int
    code: str
    detail: str = ""
    errors: list[ProblemField] = msgspec.field(default_factory=list)
    resource_id: str | None = None
    request_id: str | None = None


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    fields: list[ProblemField] | None = None,
    resource_id: str | None = None,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Problem]:
    body = Problem(
        type=f"https://mailroom.dev/problems/{code}",
        title=title,
        status=status,
        code=code,
        detail=detail,
        errors=fields or [],
        resource_id=resource_id,
        request_id=request_id,
    )
    return Response(
        content=body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


def _request_id(request: Request[Any, Any, Any]) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


def service_error_handler(
    request: Request[Any, Any, Any], exc: errors.ServiceError
) -> Response[Problem]:
    status = next((code for cls, code in STATUS_OF.items() if isinstance(exc, cls)), 500)
    fields = (
        [ProblemField(e.field, e.message) for e in exc.errors]
        if isinstance(exc, errors.Invalid)
        else None
    )
    resource_id = exc.resource_id if isinstance(exc, errors.Conflict) else None
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return problem_response(
        status,
        exc.code,
        exc.title,
        exc.detail,
        fields=fields,
        resource_id=resource_id,
        request_id=_request_id(request),
        headers=headers,
    )


# msgspec: "Expected `int`, got `str` - at `$.incoming.port`"
_AT_PATH = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?\Z", re.S)


def _field_errors(exc: ValidationException) -> list[ProblemField]:
    """Litestar's list of ``{message, key, source}`` as ``{field, message}``."""
    fields: list[ProblemField] = []
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if not isinstance(item, dict):
            continue
        message = str(item.get("message", "invalid value"))
        key = str(item.get("key", "") or "")
        match = _AT_PATH.match(message)
        if match and match.group("path"):
            message, key = match.group("message"), match.group("path").lstrip(".")
        if key in ("", "data"):
            key = "body"
        fields.append(ProblemField(key, message))
    return fields


def http_exception_handler(
    request: Request[Any, Any, Any], exc: HTTPException
) -> Response[Problem]:
    request_id = _request_id(request)
    status = exc.status_code
    if isinstance(exc, ValidationException):
        # Query/path parameters and body fields alike: 422 with each bad field.
        fields = _field_errors(exc)
        return problem_response(
            422,
            "validation_error",
            "Invalid request",
            "; ".join(f"{f.field}: {f.message}" for f in fields) or exc.detail,
            fields=fields,
            request_id=request_id,
        )
    if isinstance(exc.__cause__, SerializationException):
        # The body could not be decoded at all (Litestar wraps it in a 400).
        return problem_response(
            400,
            "malformed_json",
            "Malformed JSON",
            f"the body is not valid JSON: {exc.detail}",
            request_id=request_id,
        )
    if isinstance(exc, NotFoundException):
        return problem_response(
            404, "not_found", "Not found", "no such route or resource", request_id=request_id
        )
    if isinstance(exc, MethodNotAllowedException):
        return problem_response(
            405,
            "method_not_allowed",
            "Method not allowed",
            exc.detail,
            request_id=request_id,
            headers=dict(exc.headers or {}),
        )
    if isinstance(exc, NotAuthorizedException):
        return problem_response(
            401,
            "unauthorized",
            "Unauthorized",
            exc.detail,
            request_id=request_id,
            headers={"WWW-Authenticate": "Bearer"},
        )
    if status == 413:
        return problem_response(
            413,
            "request_too_large",
            "Payload too large",
            "the request body is larger than this service accepts",
            request_id=request_id,
        )
    if status >= 500:
        logger.error("internal HTTP error %s: %s", status, exc.detail)
        return problem_response(
            status, "internal_error", "Internal error", "internal error", request_id=request_id
        )
    return problem_response(
        status,
        re.sub(r"[^a-z0-9]+", "_", (exc.detail or "error").lower()).strip("_")[:40] or "error",
        exc.detail or "Error",
        exc.detail or "",
        request_id=request_id,
    )


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        500,
        "internal_error",
        "Internal error",
        "an unexpected error occurred; it has been logged",
        request_id=_request_id(request),
    )


def problem_spec(description: str) -> ResponseSpec:
    """An OpenAPI response entry for an error status."""
    return ResponseSpec(
        data_container=Problem,
        description=description,
        media_type=PROBLEM_MEDIA_TYPE,
        generate_examples=False,
    )


COMMON_ERRORS = {
    400: problem_spec("Request cannot be read (`malformed_json` and the like)"),
    401: problem_spec("Missing or wrong API key (`unauthorized`)"),
    422: problem_spec("Invalid input (`validation_error`); `errors` lists each bad field"),
}
NOT_FOUND = {404: problem_spec("No such resource for this caller (`not_found`)")}
BAD_BODY = {
    413: problem_spec("Body larger than the configured limit (`request_too_large`)"),
}
