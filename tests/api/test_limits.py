"""Every length limit the OpenAPI document states is the one the server applies.

The test walks the committed document: each string with ``maxLength``/``minLength`` and each
array with ``maxItems`` in a request body, and each query or header parameter with a
``maxLength``. A value exactly at the limit must not be refused for its length (it is
accepted, or refused for another reason, such as an address that does not resolve); one
past the limit must be 422. The app runs with ``max_recipients`` at its highest accepted
value, so the recipient lists' ``maxItems`` is the binding limit.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.domain.outbox import MAX_ADDRESSES_PER_FIELD
from tests.api.conftest import API_KEY, account_body, make_settings

SPEC = json.loads(
    (Path(__file__).resolve().parents[2] / "openapi" / "openapi.json").read_text("utf-8")
)
SCHEMAS = SPEC["components"]["schemas"]
ATTACHMENT = {"filename": "a.txt", "content_type": "text/plain", "content_base64": "aGk="}
MAIL = {"to": ["bob@example.com"], "subject": "s", "text": "t"}
BODY_OPERATIONS = {
    "CreateAccount": ("POST", "/v1/accounts"),
    "UpdateAccount": ("PATCH", "/v1/accounts/{account_id}"),
    "SendMessage": ("POST", "/v1/accounts/{account_id}/outbox"),
}


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` and take the non-null branch of ``oneOf``, keeping the limits."""
    if "$ref" in schema:
        return resolve(SCHEMAS[schema["$ref"].rsplit("/", 1)[-1]])
    branches = [b for b in schema.get("oneOf", []) if b.get("type") != "null"]
    if branches:
        merged = {k: v for k, v in schema.items() if k != "oneOf"}
        return {**resolve(branches[0]), **merged}
    return schema


def limits(
    schema: dict[str, Any], path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], str, int]]:
    """``(path, kind, value)`` for every limit under ``schema``; ``[]`` marks a list item."""
    schema = resolve(schema)
    found: list[tuple[tuple[str, ...], str, int]] = []
    for kind in ("maxLength", "minLength", "maxItems"):
        if kind in schema and not (kind == "minLength" and schema[kind] == 0):
            found.append((path, kind, schema[kind]))
    for name, sub in schema.get("properties", {}).items():
        found += limits(sub, (*path, name))
    if "items" in schema:
        found += limits(schema["items"], (*path, "[]"))
    return found


def body_limits() -> list[tuple[str, tuple[str, ...], str, int]]:
    cases = []
    for item in SPEC["paths"].values():
        for op in item.values():
            if not isinstance(op, dict) or op.get("operationId") not in BODY_OPERATIONS:
                continue
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            cases += [(op["operationId"], *limit) for limit in limits(schema)]
    return cases


def hostname(n: int) -> str:
    labels, left = [], n
    while left > 0:
        size = min(63, left if left <= 63 else left - 2)  # leave room for "." + a label
        labels.append("h" * size)
        left -= size + 1
    return ".".join(labels)


def address(n: int) -> str:
    local = "a" * min(64, max(1, n - 4))
    return f"{local}@{hostname(n - len(local) - 1)}" if n - len(local) - 1 > 0 else "a" * n


def text_of(field: str, n: int) -> str:
    """A string of exactly ``n`` characters that is valid for ``field`` where it can be."""
    if field == "host":
        return hostname(n)
    if field in ("email", "reply_to", "to", "cc", "bcc"):
        return address(n) if n >= 3 else "a" * n
    if field == "content_type":
        return "application/" + "x" * (n - 12) if n > 12 else ("a/" + "b" * (n - 2))[:n]
    if field == "filename":
        return "f" * (n - 4) + ".txt" if n > 4 else "f" * n
    return "a" * n


def base_body(operation: str) -> dict[str, Any]:
    return {"CreateAccount": account_body(), "UpdateAccount": {}, "SendMessage": dict(MAIL)}[
        operation
    ]


def with_value(operation: str, path: tuple[str, ...], kind: str, n: int) -> dict[str, Any]:
    body = copy.deepcopy(base_body(operation))
    field = next(p for p in reversed(path) if p != "[]")
    target: Any = body
    for index, part in enumerate(path):
        last = index == len(path) - 1
        following = path[index + 1] if not last else None
        if part == "[]":
            continue
        if last:
            if kind == "maxItems":
                item = ATTACHMENT if part == "attachments" else None
                target[part] = [
                    copy.deepcopy(item) if item else f"r{i}@example.com" for i in range(n)
                ]
            else:
                target[part] = text_of(field, n)
        elif following == "[]":
            template = ATTACHMENT if part == "attachments" else None
            if index + 1 == len(path) - 1:  # the item itself is the string
                target[part] = [text_of(field, n)]
                return body
            target[part] = [copy.deepcopy(template)]
            target = target[part][0]
        else:
            target = target.setdefault(part, {})
    return body


def refused_for_length(response: Any) -> bool:
    if response.status_code != 422:
        return False
    body = response.json()
    if body["code"] in ("too_long", "too_many"):
        return True
    return any(
        "length" in e["message"] or "too long" in e["message"] for e in body.get("errors", [])
    )


@pytest.fixture
async def wide_client(tmp_path: Path) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(make_settings(tmp_path, max_recipients=MAX_ADDRESSES_PER_FIELD))
    async with AsyncTestClient(app=app) as client:
        client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield client


CASES = body_limits()


def test_the_walk_finds_the_limits() -> None:
    found = {(op, ".".join(path), kind) for op, path, kind, _ in CASES}
    assert ("SendMessage", "subject", "maxLength") in found
    assert ("CreateAccount", "incoming.host", "maxLength") in found
    assert ("SendMessage", "to", "maxItems") in found
    assert ("SendMessage", "attachments.[].filename", "maxLength") in found
    subject = next(v for op, p, k, v in CASES if p == ("subject",) and k == "maxLength")
    assert subject == 998  # RFC 5322's line, the mail rules' own limit


@pytest.mark.parametrize(
    ("operation", "path", "kind", "limit"),
    CASES,
    ids=[f"{op}:{'.'.join(p)}:{k}" for op, p, k, _ in CASES],
)
async def test_body_limit_is_the_servers(
    wide_client: AsyncTestClient[Any], operation: str, path: tuple[str, ...], kind: str, limit: int
) -> None:
    account = await wide_client.post("/v1/accounts", json=account_body())
    method, template = BODY_OPERATIONS[operation]
    url = template.format(account_id=account.json()["id"])
    inside, outside = (limit, limit + 1) if kind != "minLength" else (limit, limit - 1)
    at_limit = await wide_client.request(
        method, url, json=with_value(operation, path, kind, inside)
    )
    assert at_limit.status_code < 500, at_limit.text
    assert not refused_for_length(at_limit), at_limit.text
    past = await wide_client.request(method, url, json=with_value(operation, path, kind, outside))
    assert past.status_code == 422, past.text


def parameter_limits() -> list[tuple[str, str, str, str, int]]:
    cases = []
    for url, item in SPEC["paths"].items():
        if set(re_fields(url)) - {"account_id"}:
            continue  # needs a resource id other than the account's
        for method, op in item.items():
            for param in op.get("parameters", []):
                schema = resolve(param.get("schema", {}))
                if param["in"] in ("query", "header") and "maxLength" in schema:
                    cases.append(
                        (method.upper(), url, param["in"], param["name"], schema["maxLength"])
                    )
    return cases


def re_fields(url: str) -> list[str]:
    return [part[1:-1] for part in url.split("/") if part.startswith("{")]


PARAMETERS = parameter_limits()


@pytest.mark.parametrize(
    ("method", "url", "where", "name", "limit"),
    PARAMETERS,
    ids=[f"{m}:{u}:{n}" for m, u, _, n, _ in PARAMETERS],
)
async def test_parameter_limit_is_the_servers(
    client: AsyncTestClient[Any], method: str, url: str, where: str, name: str, limit: int
) -> None:
    account = await client.post("/v1/accounts", json=account_body())
    target = url.format(account_id=account.json()["id"])
    body = MAIL if method == "POST" and target.endswith("/outbox") else None

    async def call(value: str) -> Any:
        if where == "query":
            return await client.request(method, target, params={name: value}, json=body)
        return await client.request(method, target, headers={name: value}, json=body)

    at_limit = await call("k" * limit)
    assert at_limit.status_code < 500, at_limit.text
    assert not refused_for_length(at_limit), at_limit.text
    assert (await call("k" * (limit + 1))).status_code == 422
