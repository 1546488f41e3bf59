"""Request ids: every request gets one, every response and log line carries it.

``RequestIdMiddleware`` is a pure ASGI middleware. It takes the caller's ``X-Request-ID``
when it is a safe token (1 to ``MAX_REQUEST_ID_LENGTH`` characters of ``[A-Za-z0-9._-]``,
so it cannot forge log lines or headers), otherwise it makes one (32 random hex digits). The id is

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

``AccessLogMiddleware`` (also a router layer, inside ``RequestIdMiddleware`` so its lines
carry the id) logs one INFO line per request: method, route template, status, duration.

``check_json_request`` is a ``before_request`` hook for the ``/v1`` routes: it refuses, before
the body is decoded, a header that must appear once given twice (400 ``ambiguous_header``),
a body that is not JSON by its Content-Type (415 ``unsupported_media_type``; a body without
a Content-Type too) and JSON nested deeper than ``MAX_JSON_DEPTH`` (400 ``malformed_json``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from litestar import Litestar, Request
from litestar.enums import ScopeType
from litestar.exceptions import ClientException, SerializationException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.context import request_id_var
from service.domain.ids import random_hex
from service.errors import BadRequest, UnsupportedMediaType
from service.logs import log_event
from service.metrics import observe_request

REQUEST_ID_HEADER = "x-request-id"  # ASGI header names are lower case
MAX_REQUEST_ID_LENGTH = 64
_SAFE_REQUEST_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_REQUEST_ID_LENGTH}}}")
_HEADER_NAME = REQUEST_ID_HEADER.encode("ascii")
# Messages that open a response and so carry its headers.
_RESPONSE_START = frozenset({"http.response.start", "websocket.accept"})

ASGIMiddlewareFactory = Callable[[ASGIApp], ASGIApp]

# Deepest nesting of arrays and objects a request body may have. Real bodies are 3 deep;
# the decoder recurses once per level, so a hostile body must be refused before it runs.
MAX_JSON_DEPTH = 64
# Headers that mean one thing only when given once ("first one wins" would let a proxy
# and the service each read a different one).
SINGLE_HEADERS = ("idempotency-key", "content-type")
JSON_MEDIA_TYPE = "application/json"
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPENERS_AS_ONE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_BRACKET_RUN = re.compile(rb"\[+|\]+")
_OPEN = ord("[")
_WORTH_ANOTHER_PASS = 8  # another pass while the last one removed 1/8 of the text or more

access_logger = logging.getLogger("mailroom.http")


def is_safe_request_id(value: str) -> bool:
    """Whether a caller's id may be reused as is: short, and only ``[A-Za-z0-9._-]``."""
    return _SAFE_REQUEST_ID.fullmatch(value) is not None


REQUEST_ID_BYTES = 16  # 128 random bits: unique without coordination between processes


def new_request_id() -> str:
    """A fresh id: 32 lower-case hex digits, 128 random bits (``random_hex``: seeded from
    the OS, no system call per request)."""
    return random_hex(REQUEST_ID_BYTES)


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


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``body`` nests arrays/objects more than ``limit`` deep.

    Cheap for real bodies (too few openers to nest that deep). Otherwise strings are cut
    out (their brackets do not count), the innermost pairs removed, and the rest walked
    run by run (one step per run of ``[`` or ``]``), stopping at the first level too deep.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", body).translate(_OPENERS_AS_ONE, _NOT_BRACKETS)
    # Each pass removes the innermost pairs, one level of every branch; passes go on while
    # they shrink the text well (wide bodies), so the walk below sees few runs.
    while limit > 0:
        shorter = brackets.replace(b"[]", b"")
        removed = len(brackets) - len(shorter)
        brackets, limit = shorter, limit - 1
        if removed * _WORTH_ANOTHER_PASS < len(shorter) + removed:
            break
    depth = 0
    for run in _BRACKET_RUN.finditer(brackets):
        size = run.end() - run.start()
        depth += size if brackets[run.start()] == _OPEN else -size
        if depth > limit:
            return True
    return False


def is_json_media_type(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters ignored."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == JSON_MEDIA_TYPE or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def reject_repeated(request: Request[Any, Any, Any], names: tuple[str, ...]) -> None:
    """400 ``ambiguous_header`` when one of ``names`` is given more than once."""
    for name in names:
        if len(request.headers.getall(name, [])) > 1:
            raise BadRequest(f"the {name} header is given more than once; send it once")


async def check_json_request(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: refuse an ambiguous, non-JSON or too deeply nested request.

    Runs after routing and the guards, before the body is decoded; returns ``None`` so the
    handler runs when the request is acceptable.
    """
    reject_repeated(request, SINGLE_HEADERS)
    if "data" not in request.route_handler.parsed_fn_signature.parameters:
        return  # the route reads no body
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json_media_type(content_type):
        raise UnsupportedMediaType(
            f"the body must be {JSON_MEDIA_TYPE}, not {content_type[:100]!r}"
        )
    body = await request.body()  # kept by Litestar: the decoder reads it from there
    if body and content_type is None:
        raise UnsupportedMediaType(f"a body needs Content-Type: {JSON_MEDIA_TYPE}")
    if json_too_deep(body):
        # The same path a body that is not JSON takes (400 ``malformed_json``).
        raise ClientException(f"nested deeper than {MAX_JSON_DEPTH} levels") from (
            SerializationException("nested too deeply")
        )


class AccessLogMiddleware:
    """Pure ASGI middleware: one INFO line per HTTP request, after its response.

    Fields: ``method``, ``route`` (the template, ``unmatched`` for 404/405 on no route; never
    the raw path, which may carry ids), ``status`` and ``duration_ms``; the request id comes
    with every line (``RequestIdMiddleware`` must wrap this one). No header, query or body.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await observe_request(self.app, scope, receive, send, _log_request)


def _log_request(method: str, route: str, status: int, seconds: float) -> None:
    log_event(
        access_logger,
        "request",
        method=method,
        route=route,
        status=status,
        duration_ms=round(seconds * 1000, 2),
    )
