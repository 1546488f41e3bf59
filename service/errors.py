"""Errors of the service layer, free of HTTP.

Hierarchy::

    ServiceError                 any failure a caller should see, with a stable ``code``
    ├── BadRequest               the request cannot be read as sent        (code: ambiguous_header)
    ├── Unauthorized             missing or wrong API key                  (code: unauthorized)
    ├── NotFound                 no such resource for this caller          (code: not_found)
    ├── Conflict                 state forbids the operation               (code: conflict, ...)
    ├── Invalid                  input rejected; ``errors`` lists fields   (code: validation_error)
    ├── TooLarge                 input over a configured size limit        (message_too_large, ...)
    ├── TooManyRequests          a concurrency or rate limit is reached    (code: too_many_requests)
    ├── UnsupportedMediaType     a JSON route got another content type     (unsupported_media_type)
    ├── Unavailable              a dependency (database) is not ready      (code: unavailable)
    ├── StorageFull              the disk is full: nothing was stored      (code: storage_full)
    └── Upstream                 a mail server failed; ``code`` says how   (auth_failed, …)

Packages below the service layer (``pop3``, ``smtp``, ``repository``) have their own base
exceptions; services translate them with ``raise X(...) from exc``. The API layer maps these
classes to HTTP statuses in exactly one place (``service.api.problems``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldError:
    """One rejected input field: a dotted path (``incoming.port``) and why."""

    field: str
    message: str


class ServiceError(Exception):
    """Base of every error the service reports to callers."""

    code: str = "internal_error"  # a subclass names its own; an uncoded error is a bug
    title: str = "Error"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class BadRequest(ServiceError):
    code = "ambiguous_header"
    title = "Bad request"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"
    title = "Unsupported media type"


class StorageFull(ServiceError):
    code = "storage_full"
    title = "Insufficient storage"


class Unauthorized(ServiceError):
    code = "unauthorized"
    title = "Unauthorized"


class NotFound(ServiceError):
    code = "not_found"
    title = "Not found"


class Conflict(ServiceError):
    """The resource's state forbids the request; ``resource_id`` names the blocker if any."""

    code = "conflict"
    title = "Conflict"

    def __init__(
        self, detail: str, *, code: str | None = None, resource_id: str | None = None
    ) -> None:
        super().__init__(detail, code=code)
        self.resource_id = resource_id


class Invalid(ServiceError):
    code = "validation_error"
    title = "Invalid request"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        errors: list[FieldError] | None = None,
    ) -> None:
        super().__init__(detail, code=code)
        self.errors = errors or []


class TooLarge(ServiceError):
    code = "request_too_large"
    title = "Payload too large"


class TooManyRequests(ServiceError):
    code = "too_many_requests"
    title = "Too many requests"


class Unavailable(ServiceError):
    code = "unavailable"
    title = "Service unavailable"


class Upstream(ServiceError):
    """A mail server (POP3/SMTP) failed; ``code`` is the stable reason."""

    code = "protocol_error"
    title = "Mail server error"
