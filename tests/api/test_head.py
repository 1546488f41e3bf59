"""HEAD wherever GET works: every GET route of the OpenAPI document answers HEAD with the
GET's status and headers and no body; ``Allow`` lists HEAD beside GET; routes without GET
refuse HEAD with 405."""

from __future__ import annotations

import re
from typing import Any

from litestar.testing import AsyncTestClient

from service.api.head import add_head_to_allow
from tests.api.conftest import account_body

# Headers that differ between two responses to the same request by design.
PER_RESPONSE = {"date", "x-request-id"}


def comparable(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower() not in PER_RESPONSE}


async def test_head_answers_like_get_on_every_get_route(client: AsyncTestClient[Any]) -> None:
    created = await client.post("/v1/accounts", json=account_body())
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    schema = (await client.get("/docs/openapi.json")).json()
    paths = [path for path, item in schema["paths"].items() if "get" in item]
    # The documented routes, the docs page and one of its assets.
    urls = [
        re.sub(r"\{[^}]+\}", "missing", path.replace("{account_id}", account_id)) for path in paths
    ]
    urls += ["/docs/", "/docs/openapi.json", "/docs/assets/swagger-ui.css"]
    assert f"/v1/accounts/{account_id}" in urls
    statuses = set()
    for url in urls:
        got = await client.get(url)
        head = await client.head(url)
        assert head.status_code == got.status_code, url
        assert head.content == b"", url
        if url == "/metrics":  # its body changes with every request (they are counted)
            assert head.headers["content-type"] == got.headers["content-type"]
            continue
        assert comparable(head.headers) == comparable(got.headers), url
        assert int(head.headers["content-length"]) == len(got.content), url
        statuses.add(got.status_code)
    assert 200 in statuses and 404 in statuses  # found and not-found resources both


async def test_allow_lists_head_beside_get(client: AsyncTestClient[Any]) -> None:
    # A GET route refusing another method: 405 whose Allow names HEAD too.
    refused = await client.delete("/health")
    assert refused.status_code == 405
    allowed = {m.strip() for m in refused.headers["allow"].split(",")}
    assert {"GET", "HEAD"} <= allowed
    # A route without GET: HEAD is refused like any other missing method, and not offered.
    created = await client.post("/v1/accounts", json=account_body())
    verify = f"/v1/accounts/{created.json()['id']}/verify"
    head = await client.head(verify)
    assert head.status_code == 405
    assert head.content == b""
    allowed = {m.strip() for m in head.headers["allow"].split(",")}
    assert "POST" in allowed and "HEAD" not in allowed and "GET" not in allowed


def test_add_head_to_allow() -> None:
    assert add_head_to_allow(b"GET, OPTIONS") == b"GET, OPTIONS, HEAD"
    assert add_head_to_allow(b"GET,HEAD") == b"GET, HEAD"
    assert add_head_to_allow(b"OPTIONS, POST") == b"OPTIONS, POST"
    assert add_head_to_allow(b"get") == b"get, HEAD"
    assert add_head_to_allow(b"") == b""
