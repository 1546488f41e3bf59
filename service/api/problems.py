"""Errors to RFC 9457 ``application/problem+json``: the one place they are mapped.

Every error response of the service is built here, from a ``ServiceError`` (the service's
own), a ``RepositoryError`` that no service translated (a full disk is 507 ``storage_full``,
any other store failure 503 ``unavailable``), a Litestar ``HTTPException`` (routing, body
decoding, size limits) or anything else (a bug: logged with its traceback, answered 500 with
no internals). Every ``code`` is a member of ``service.codes.ErrorCode``.
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
from litestar.openapi.spec import Example

from service import errors
from service.codes import DESCRIPTIONS, ErrorCode
from service.mail.errors import MailErrorCode
from service.repository.errors import (
    DuplicateError,
    RepositoryError,
    StorageFullError,
    StoreUnavailableError,
)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://mailroom.dev/problems/"
# Seconds a 429 asks the caller to wait (``Retry-After``): about one short retrieval.
RETRY_AFTER_S = 5
logger = logging.getLogger("mailroom.api")

# The code of an HTTP error that carries none of its own, by status.
CODE_OF_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.REQUEST_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.VALIDATION_ERROR,
    429: ErrorCode.TOO_MANY_REQUESTS,
    503: ErrorCode.UNAVAILABLE,
    507: ErrorCode.STORAGE_FULL,
}

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
    code: ErrorCode
    detail: str = ""
    errors: list[ProblemField] = msgspec.field(default_factory=list)
    resource_id: str | None = None
    request_id: str | None = None


def code_for_status(status: int) -> ErrorCode:
    """The catalogue's code for an error that has only its HTTP status."""
    if status in CODE_OF_STATUS:
        return CODE_OF_STATUS[status]
    return ErrorCode.INTERNAL_ERROR if status >= 500 else ErrorCode.BAD_REQUEST


def catalogued(code: str, status: int) -> ErrorCode:
    """``code`` as a catalogue member; a code missing from it (a bug) falls back by status."""
    try:
        return ErrorCode(code)
    except ValueError:
        logger.error("error code %r is not in the catalogue (status %d)", code, status)
        return code_for_status(status)


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
    member = catalogued(code, status)
    body = Problem(
        type=f"{PROBLEM_TYPE_BASE}{member}",
        title=title,
        status=status,
        code=member,
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
    headers: dict[str, str] | None = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif status == 429:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
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


def repository_error_handler(
    request: Request[Any, Any, Any], exc: RepositoryError
) -> Response[Problem]:
    """A store failure no service translated: never a 500 for an operational fault."""
    if isinstance(exc, StorageFullError):
        logger.warning("write refused, the disk is full: %s", exc)
        return service_error_handler(
            request, errors.StorageFull("the disk is full: nothing was stored; try again later")
        )
    if isinstance(exc, DuplicateError):
        # A uniqueness race the service did not expect: the other request won.
        logger.warning("unexpected duplicate: %s", exc)
        return service_error_handler(
            request, errors.Conflict("a conflicting change was made at the same time")
        )
    if isinstance(exc, StoreUnavailableError):
        logger.warning("the database cannot be reached: %s", exc)
        return service_error_handler(
            request,
            errors.Unavailable(
                "the database cannot be reached: nothing was stored; try again later",
                code=ErrorCode.STORAGE_UNAVAILABLE,
            ),
        )
    logger.error("store failed on %s %s: %s", request.method, request.url.path, exc)
    return service_error_handler(
        request, errors.Unavailable("the store is not available; try again later")
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
            ErrorCode.VALIDATION_ERROR,
            "Invalid request",
            "; ".join(f"{f.field}: {f.message}" for f in fields) or exc.detail,
            fields=fields,
            request_id=request_id,
        )
    if isinstance(exc.__cause__, SerializationException):
        # The body could not be decoded at all (Litestar wraps it in a 400).
        return problem_response(
            400,
            ErrorCode.MALFORMED_JSON,
            "Malformed JSON",
            f"the body is not valid JSON: {exc.detail}",
            request_id=request_id,
        )
    if isinstance(exc, NotFoundException):
        return problem_response(
            404,
            ErrorCode.NOT_FOUND,
            "Not found",
            "no such route or resource",
            request_id=request_id,
        )
    if isinstance(exc, MethodNotAllowedException):
        return problem_response(
            405,
            ErrorCode.METHOD_NOT_ALLOWED,
            "Method not allowed",
            exc.detail,
            request_id=request_id,
            headers=dict(exc.headers or {}),
        )
    if isinstance(exc, NotAuthorizedException):
        return problem_response(
            401,
            ErrorCode.UNAUTHORIZED,
            "Unauthorized",
            exc.detail,
            request_id=request_id,
            headers={"WWW-Authenticate": "Bearer"},
        )
    if status == 413:
        return problem_response(
            413,
            ErrorCode.REQUEST_TOO_LARGE,
            "Payload too large",
            "the request body is larger than this service accepts",
            request_id=request_id,
        )
    if status >= 500:
        logger.error("internal HTTP error %s: %s", status, exc.detail)
        return problem_response(
            status,
            ErrorCode.INTERNAL_ERROR,
            "Internal error",
            "internal error",
            request_id=request_id,
        )
    return problem_response(
        status,
        code_for_status(status),
        exc.detail or "Error",
        exc.detail or "",
        request_id=request_id,
    )


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    if isinstance(exc, RecursionError):
        # Only a body nested deeper than the decoder's stack gets here (the explicit bound,
        # ``service.api.middleware.MAX_JSON_DEPTH``, normally refuses it first).
        return problem_response(
            400,
            ErrorCode.MALFORMED_JSON,
            "Malformed JSON",
            "the body is nested too deeply",
            request_id=_request_id(request),
        )
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        500,
        ErrorCode.INTERNAL_ERROR,
        "Internal error",
        "an unexpected error occurred; it has been logged",
        request_id=_request_id(request),
    )


def problem_spec(description: str, *codes: ErrorCode) -> ResponseSpec:
    """An OpenAPI response entry for an error status that answers one of ``codes``.

    Each code becomes an example of the response; the document then narrows ``code`` to
    these (``service.api.spec``), so a generated client can switch on them.
    """
    return ResponseSpec(
        data_container=Problem,
        description=description,
        media_type=PROBLEM_MEDIA_TYPE,
        generate_examples=False,
        examples=[
            Example(
                id=code.value,
                summary=DESCRIPTIONS[code],
                value={
                    "type": f"{PROBLEM_TYPE_BASE}{code}",
                    "title": _TITLE_OF_STATUS[_STATUS_OF_CODE.get(code, 422)],
                    "status": _STATUS_OF_CODE.get(code, 422),
                    "code": code.value,
                    "detail": DESCRIPTIONS[code].split(": ", 1)[-1],
                },
            )
            for code in codes
        ]
        or None,
    )


# The status of each code an error response can carry (the mail input codes are 422).
_STATUS_OF_CODE: dict[ErrorCode, int] = {
    **{code: status for status, code in CODE_OF_STATUS.items()},
    ErrorCode.MALFORMED_JSON: 400,
    ErrorCode.AMBIGUOUS_HEADER: 400,
    ErrorCode.HOST_NOT_ALLOWED: 422,
    ErrorCode.RETRIEVAL_RUNNING: 409,
    ErrorCode.RETRIEVAL_FINISHED: 409,
    ErrorCode.IDEMPOTENCY_KEY_REUSED: 409,
    ErrorCode.NOT_CANCELLABLE: 409,
    ErrorCode.WEBHOOK_DISABLED: 409,
    ErrorCode.TOO_MANY_RETRIEVALS: 429,
    ErrorCode.ATTACHMENT_TOO_LARGE: 413,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.STORAGE_UNAVAILABLE: 503,
    ErrorCode.CREDENTIALS_UNREADABLE: 503,
    ErrorCode.INTERNAL_ERROR: 500,
}
_TITLE_OF_STATUS = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
    507: "Insufficient storage",
}

# Mail input rules of SendMessage, each refused with its own code.
SEND_INPUT_CODES = (
    ErrorCode.VALIDATION_ERROR,
    *(ErrorCode(code.value) for code in MailErrorCode),
    ErrorCode.TOO_MANY_RECIPIENTS,
    ErrorCode.INVALID_BASE64,
    ErrorCode.NO_BODY,
    ErrorCode.INVALID_METADATA,
    ErrorCode.INVALID_TAG,
    ErrorCode.INVALID_SEND_AT,
    ErrorCode.CONFLICTING_FIELDS,
)

INTERNAL_ERROR = {
    500: problem_spec(
        "A bug (`internal_error`): logged with the request id; nothing internal is shown",
        ErrorCode.INTERNAL_ERROR,
    )
}
# The open routes read no body, parameter or key: a wrong method is all a caller can get
# wrong (405, with `Allow`).
OPEN_ROUTE_ERRORS = {
    405: problem_spec(
        "The path does not answer this method (`method_not_allowed`); `Allow` lists those"
        " it answers",
        ErrorCode.METHOD_NOT_ALLOWED,
    ),
    **INTERNAL_ERROR,
}
COMMON_ERRORS = {
    400: problem_spec(
        "Request cannot be read: `malformed_json` (not JSON, or nested too deeply),"
        " `ambiguous_header` (Authorization, Idempotency-Key or Content-Type given twice)",
        ErrorCode.MALFORMED_JSON,
        ErrorCode.AMBIGUOUS_HEADER,
        ErrorCode.BAD_REQUEST,
    ),
    401: problem_spec("Missing or wrong API key (`unauthorized`)", ErrorCode.UNAUTHORIZED),
    422: problem_spec(
        "Invalid input (`validation_error`); `errors` lists each bad field",
        ErrorCode.VALIDATION_ERROR,
    ),
    **INTERNAL_ERROR,
    503: problem_spec(
        "The store is not available (`unavailable`, `storage_unavailable`), or stored"
        " credentials cannot be decrypted (`credentials_unreadable`); try again later",
        ErrorCode.UNAVAILABLE,
        ErrorCode.STORAGE_UNAVAILABLE,
        ErrorCode.CREDENTIALS_UNREADABLE,
    ),
    507: problem_spec(
        "A write found the disk full (`storage_full`): nothing was stored or changed",
        ErrorCode.STORAGE_FULL,
    ),
}
# Account settings are also refused when a host resolves into a guarded network.
ACCOUNT_INPUT_ERRORS = {
    422: problem_spec(
        "Invalid input (`validation_error`), or a host that resolves into a network the"
        " outbound guard refuses (`host_not_allowed`), or an unknown `preset`"
        " (`unknown_preset`); `errors` lists each bad field",
        ErrorCode.VALIDATION_ERROR,
        ErrorCode.HOST_NOT_ALLOWED,
        ErrorCode.UNKNOWN_PRESET,
    ),
}
NOT_FOUND = {
    404: problem_spec("No such resource for this caller (`not_found`)", ErrorCode.NOT_FOUND)
}
UNSUPPORTED_BODY = {
    415: problem_spec(
        "The body is not `application/json` (or `+json`), or has no Content-Type"
        " (`unsupported_media_type`)",
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    ),
}
BAD_BODY = {
    413: problem_spec(
        "Body larger than the configured limit (`request_too_large`)",
        ErrorCode.REQUEST_TOO_LARGE,
    ),
    **UNSUPPORTED_BODY,
}
