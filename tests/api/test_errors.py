"""Errors are problem+json with a stable code; bad input is 4xx, never 5xx."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient

from tests.api.conftest import account_body

PROBLEM = "application/problem+json"


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = dict(response.json())
    assert body["status"] == status
    assert body["code"] == code
    assert body["title"] and "type" in body
    return body


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": "Basic abc"}],
)
async def test_v1_needs_a_valid_key(client: AsyncTestClient[Any], headers: dict[str, str]) -> None:
    client.headers.pop("Authorization")
    response = await client.get("/v1/accounts", headers=headers)
    body = assert_problem(response, 401, "unauthorized")
    assert "wrong-key" not in body["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


async def test_open_routes_need_no_key(client: AsyncTestClient[Any]) -> None:
    client.headers.pop("Authorization")
    assert (await client.get("/health")).json()["status"] == "ok"
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert (await client.get("/docs/openapi.json")).status_code == 200
    assert (await client.get("/docs/")).status_code == 200


async def test_unknown_route_and_wrong_method(client: AsyncTestClient[Any]) -> None:
    assert_problem(await client.get("/v1/nothing-here"), 404, "not_found")
    assert_problem(await client.get("/nothing"), 404, "not_found")
    assert_problem(await client.put("/v1/accounts"), 405, "method_not_allowed")


async def test_malformed_json(client: AsyncTestClient[Any]) -> None:
    for payload in (b'{"name":', b"not json", b"\xff\xfe"):
        response = await client.post(
            "/v1/accounts", content=payload, headers={"content-type": "application/json"}
        )
        assert_problem(response, 400, "malformed_json")


async def test_oversized_body_is_413(tmp_path: Any) -> None:
    from service.app import create_app
    from tests.api.conftest import API_KEY, make_settings

    app = create_app(make_settings(tmp_path, max_request_bytes=2048))
    async with AsyncTestClient(app=app) as small:
        body = account_body(name="x" * 100)
        body["display_name"] = "y" * 150
        body["incoming"]["password"] = "p" * 1000
        body["outgoing"]["password"] = "q" * 1000
        response = await small.post(
            "/v1/accounts", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert_problem(response, 413, "request_too_large")


def with_field(path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(account_body())
    target = body
    *parents, last = path.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return body


DELETE = object()

BAD_FIELDS = [
    ("name", ""),
    ("name", "a\nb"),
    ("name", 5),
    ("email", "no-at-sign"),
    ("email", "a@b\r\nBcc: x@y"),
    ("display_name", "Al\x00ice"),
    ("incoming", DELETE),
    ("incoming.host", ""),
    ("incoming.host", "bad host"),
    ("incoming.host", "exa_mple.com"),
    ("incoming.host", "a..b"),
    ("incoming.host", "1.2.3"),
    ("incoming.host", "h\n"),
    ("incoming.host", "x" * 254),
    ("incoming.port", 0),
    ("incoming.port", 65536),
    ("incoming.security", "ssl"),
    ("incoming.protocol", "imap"),
    ("incoming.username", ""),
    ("incoming.username", "al\rice"),
    ("incoming.username", DELETE),
    ("incoming.password", "p\nPASS x"),
    ("incoming.password", "p\x00"),
    ("incoming.password", "p\u2028"),
    ("incoming.password", "p" * 1025),
    ("incoming.password", DELETE),
    ("incoming.extra", 1),
    ("outgoing.port", -1),
    ("outgoing.password", DELETE),
    ("outgoing.username", "a\tb"),
    ("outgoing.allow_insecure_auth", "yes"),
    ("retrieval", {"leave_on_server": "no"}),
    ("retrieval", {"delete_after_days": 0}),
    ("retrieval", {"delete_after_days": 5, "leave_on_server": False}),
    ("retrieval", {"max_message_bytes": 10}),
    ("retrieval", {"max_message_bytes": 10**12}),
    ("retrieval", {"poll_interval_minutes": 0}),
    ("retrieval", {"unknown": 1}),
    ("surprise", "field"),
]


@pytest.mark.parametrize(("path", "value"), BAD_FIELDS)
async def test_bad_field_is_422(client: AsyncTestClient[Any], path: str, value: Any) -> None:
    response = await client.post("/v1/accounts", json=with_field(path, value))
    body = assert_problem(response, 422, "validation_error")
    assert body["errors"], body
    top = path.split(".")[0]
    assert any(e["field"].split(".")[0] in (top, "body") for e in body["errors"]), body
    assert (await client.get("/v1/accounts")).json()["items"] == []


CONTROL = st.sampled_from(["\r", "\n", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"])


FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    field=st.sampled_from(
        ["incoming.username", "incoming.password", "outgoing.password", "incoming.host", "name"]
    ),
    prefix=st.text(min_size=0, max_size=8),
    control=CONTROL,
    suffix=st.text(min_size=0, max_size=8),
)
async def test_control_characters_anywhere_are_rejected(
    client: AsyncTestClient[Any], field: str, prefix: str, control: str, suffix: str
) -> None:
    response = await client.post("/v1/accounts", json=with_field(field, prefix + control + suffix))
    assert response.status_code == 422, response.text


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    ),
    field=st.sampled_from(
        [
            "name",
            "email",
            "incoming.port",
            "incoming.security",
            "outgoing.host",
            "retrieval.poll_interval_minutes",
        ]
    ),
)
async def test_any_value_anywhere_is_never_5xx(
    client: AsyncTestClient[Any], value: Any, field: str
) -> None:
    response = await client.post("/v1/accounts", json=with_field(field, value))
    assert response.status_code in (201, 422), response.text
