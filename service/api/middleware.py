"""Request ids: every request gets one, every response and log line carries it.

``RequestIdMiddleware`` is a pure ASGI middleware. It takes the caller's ``X-Request-ID``
when it is a safe token (1 to ``MAX_REQUEST_ID_LENGTH`` characters of ``[A-Za-z0-9._-]``,
so it cannot forge log lines or headers), otherwise it makes one (uuid4 hex). The id is

- stored at ``scope["state"]["request_id"]``, where ``service.api.problems`` reads it into
  error bodies;
- set in ``service.context.request_id_var`` for the duration of the request, so every log
  line carries it (``service.logs`` installs the filter that copies it onto records);
- returned as the ``X-Request-ID`` response header (replacing one a handler set).

Placement. Litestar runs ``Litestar(middleware=[...])`` only once a route has matched, so
requests that fail in routing (404 no such path, 405 wrong method) would bypass it. To cover
every request, wrap the router instead with :func:`wrap_router`, right after building the
app::

    app = Litestar(...)
    wrap_router(app, RequestIdMiddleware)

Both placements work; only the second also tags 404/405 responses.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from litestar import Litestar
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.context import request_id_var

REQUEST_ID_HEADER = "x-request-id"  # ASGI header names are lower case
MAX_REQUEST_ID_LENGTH = 64
_SAFE_REQUEST_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_REQUEST_ID_LENGTH}}}")
_HEADER_NAME = REQUEST_ID_HEADER.encode("ascii")
# Messages that open a response and so carry its headers.
_RESPONSE_START = frozenset({"http.response.start", "websocket.accept"})

ASGIMiddlewareFactory = Callable[[ASGIApp], ASGIApp]


def is_safe_request_id(value: str) -> bool:
    """Whether a caller's id may be reused as is: short, and only ``[A-Za-z0-9._-]``."""
    return _SAFE_REQUEST_ID.fullmatch(value) is not None


def new_request_id() -> str:
    """A fresh id: 32 lower-case hex digits (uuid4)."""
    return uuid.uuid4().hex


def request_id_from_headers(headers: list[tuple[bytes, bytes]]) -> str:
    """The first ``X-Request-ID`` of the request if it is safe, else a new id."""
    for name, value in headers:
        if name.lower() == _HEADER_NAME:
            try:
                candidate = value.decode("ascii")
            except UnicodeDecodeError:
                break
            if is_safe_request_id(candidate):
                return candidate
            break
    return new_request_id()


class RequestIdMiddleware:
    """Pure ASGI middleware giving each HTTP/WebSocket connection a request id.

    Usable as ``Litestar(middleware=[RequestIdMiddleware])`` or, to also cover routing
    failures, through :func:`wrap_router`. Other scope types pass through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in (ScopeType.HTTP, ScopeType.WEBSOCKET):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from_headers(list(scope.get("headers", ())))
        scope.setdefault("state", {})["request_id"] = request_id
        header = (_HEADER_NAME, request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] in _RESPONSE_START:
                headers = [
                    (name, value)
                    for name, value in message.get("headers", ())  # type: ignore[attr-defined]
                    if name.lower() != _HEADER_NAME
                ]
                headers.append(header)
                message["headers"] = headers  # type: ignore[typeddict-unknown-key]
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def wrap_router(app: Litestar, *layers: ASGIMiddlewareFactory) -> Litestar:
    """Wrap ``app``'s router in ``layers`` (the first outermost); returns ``app``.

    Unlike ``Litestar(middleware=...)``, which Litestar applies per route after routing,
    these layers see every HTTP and WebSocket request, including those answered 404 or 405
    by the router, and run inside ``Litestar.__call__`` (so ``scope["state"]`` exists and
    the app's exception handlers still build the error responses they observe). They wrap
    ``Litestar.asgi_handler``, the router with its exception handling, which Litestar builds
    once in ``__init__``. Call it once, right after constructing the app.
    """
    handler: ASGIApp = app.asgi_handler
    for layer in reversed(layers):
        handler = layer(handler)
    app.asgi_handler = handler
    return app
