"""HEAD wherever GET works (RFC 9110, 9.3.2): the GET response's status and headers, no body.

Litestar routes a method only to handlers declared for it, so a plain ``@get`` route answers
HEAD with 405. :class:`HeadMiddleware` (a router layer, see ``wrap_router``) routes a HEAD
request as a GET and drops the body it produces, keeping every header (``Content-Length``,
``Content-Type``, ``ETag``...) as a GET would send it. The layers outside it, the server
included, still see ``HEAD``: the method is switched only while the router runs and put back
before the response starts. Where GET is allowed, ``Allow`` headers (405 responses and
``OPTIONS``) list HEAD too.
"""

from __future__ import annotations

from typing import Final

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

HEAD: Final = "HEAD"
GET: Final = "GET"
_ALLOW = b"allow"


def add_head_to_allow(value: bytes) -> bytes:
    """``value`` (an ``Allow`` header) with HEAD added when it lists GET and not HEAD."""
    methods = [part.strip() for part in value.split(b",") if part.strip()]
    upper = {method.upper() for method in methods}
    if b"GET" in upper and b"HEAD" not in upper:
        methods.append(b"HEAD")
    return b", ".join(methods)


class HeadMiddleware:
    """Pure ASGI: answer HEAD like GET without a body; add HEAD to ``Allow`` beside GET."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        is_head = scope["method"] == HEAD

        async def send_head_aware(message: Message) -> None:
            if message["type"] == "http.response.start":
                if is_head:
                    # The server decides framing from the scope's method: it must see HEAD.
                    scope["method"] = HEAD
                headers = message.get("headers")
                if headers:
                    message["headers"] = [
                        (name, add_head_to_allow(value) if name.lower() == _ALLOW else value)
                        for name, value in headers
                    ]
            elif message["type"] == "http.response.body" and is_head:
                if message.get("more_body", False):
                    return  # a HEAD response has no body: drop every chunk but the last
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        if is_head:
            # The same scope object, so what the router records on it (the matched route
            # template, path parameters) is seen by the layers outside too.
            scope["method"] = GET
        try:
            await self.app(scope, receive, send_head_aware)
        finally:
            if is_head:
                scope["method"] = HEAD
