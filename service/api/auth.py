"""Bearer API keys: every ``/v1`` route needs one; the key decides the caller's tenant."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from service.errors import BadRequest, Unauthorized, Unavailable

BEARER = "bearer "


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyRing:
    """Hashes of accepted keys with their tenants; the plain keys are not kept."""

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self._entries = [(tenant, bytes.fromhex(digest)) for tenant, digest in entries]

    def tenant_of(self, presented: str) -> str | None:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: str | None = None
        # Compare against every entry in constant time, and do not stop at a match.
        for tenant, expected in self._entries:
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found


async def require_api_key(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard: resolve the bearer key to a tenant, stored on the connection's state.

    A coroutine on purpose: Litestar runs a plain function guard in its thread pool, a hop
    per request for a few microseconds of hashing.

    Two Authorization headers are 400 ``ambiguous_header``: a proxy and the service could
    each read a different one. Before the stored keys are loaded (the store is not readable
    yet at startup) every request is 503 ``unavailable``, not 401.
    """
    presented = connection.headers.getall("authorization", [])
    if len(presented) > 1:
        raise BadRequest("the Authorization header is given more than once; send it once")
    header = presented[0] if presented else ""
    if not header[: len(BEARER)].lower() == BEARER:
        raise Unauthorized("send `Authorization: Bearer <api key>`")
    ring: KeyRing | None = connection.app.state.get("key_ring")
    if ring is None:
        raise Unavailable("the service is starting: its store cannot be read yet")
    tenant = ring.tenant_of(header[len(BEARER) :].strip())
    if tenant is None:
        raise Unauthorized("the API key is not valid")
    connection.state.tenant = tenant
