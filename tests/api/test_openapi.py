"""The committed OpenAPI document is what the app serves, and it is complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.openapi import openapi_document, render

SPEC = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
OPEN_PATHS = {"/health", "/ready", "/metrics"}


def test_committed_spec_equals_generated() -> None:
    assert SPEC.read_text(encoding="utf-8") == render(), (
        "openapi/openapi.json is stale: run `python -m service.openapi openapi/openapi.json`"
    )


async def test_served_spec_equals_committed(client: AsyncTestClient[Any]) -> None:
    served = (await client.get("/docs/openapi.json")).json()
    assert served == json.loads(SPEC.read_text(encoding="utf-8"))


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    spec = openapi_document()
    return [
        (path, method, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]


@pytest.mark.parametrize(("path", "method", "op"), operations())
def test_every_operation_is_documented(path: str, method: str, op: dict[str, Any]) -> None:
    assert op.get("operationId"), (path, method)
    assert op["operationId"][0].isupper()
    assert op.get("summary"), (path, method)
    assert op.get("description"), (path, method)
    responses = op["responses"]
    assert any(code.startswith("2") for code in responses)
    assert any(code.startswith("4") for code in responses), (path, method)
    assert "500" in responses, (path, method)
    for code, response in responses.items():
        # Every answer carries the request id; problem bodies are problem+json.
        assert response["headers"]["X-Request-ID"] == {
            "$ref": "#/components/headers/X-Request-ID"
        }, (path, method, code)
        if code[0] in "45" and path.startswith("/v1"):
            assert set(response["content"]) == {"application/problem+json"}, (path, code)
    if path.startswith("/v1"):
        assert op.get("security") == [{"BearerAuth": []}]
        for code in ("401", "422"):
            assert code in responses, (path, method, code)
            content = responses[code]["content"]
            assert "application/problem+json" in content
        if "{" in path:
            assert "404" in responses, (path, method)
    else:
        assert path in OPEN_PATHS
        assert op["security"] == [], path  # open, said explicitly (Redocly security-defined)
