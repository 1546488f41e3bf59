"""The HTTP edge: undecodable, non-JSON and ambiguous requests, and the request log line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.api.middleware import MAX_JSON_DEPTH, json_too_deep
from service.codes import ErrorCode
from service.repository.database import DIRECTORY_MODE, FILE_MODE, Database
from tests.api.conftest import account_body
from tests.api.test_errors import assert_problem

JSON = {"content-type": "application/json"}


def nested(depth: int) -> bytes:
    """A JSON body ``depth`` levels deep, arrays and objects alternating."""
    opening = "".join('{"a":' if level % 2 else "[" for level in range(depth))
    closing = "".join("}" if level % 2 else "]" for level in reversed(range(depth)))
    return (opening + "1" + closing).encode()


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000, 100_000])
async def test_deeply_nested_json_is_400_malformed(
    client: AsyncTestClient[Any], depth: int
) -> None:
    for url in ("/v1/accounts", "/v1/accounts/acc_nothing/outbox"):
        response = await client.post(url, content=nested(depth), headers=JSON)
        assert_problem(response, 400, "malformed_json")
    # Also where it hides in a field that the schema would otherwise refuse.
    body = account_body()
    text = json.dumps(body)[:-1] + ', "display_name": ' + nested(depth).decode() + "}"
    response = await client.post("/v1/accounts", content=text.encode(), headers=JSON)
    assert_problem(response, 400, "malformed_json")


async def test_nesting_within_the_bound_reaches_validation(client: AsyncTestClient[Any]) -> None:
    response = await client.post("/v1/accounts", content=nested(MAX_JSON_DEPTH), headers=JSON)
    assert_problem(response, 422, "validation_error")


def test_depth_bound_ignores_brackets_in_strings() -> None:
    deep_text = json.dumps({"subject": "[" * 10_000, "to": ["{" * 500]}).encode()
    assert not json_too_deep(deep_text)
    assert json_too_deep(nested(MAX_JSON_DEPTH + 1))
    assert not json_too_deep(nested(MAX_JSON_DEPTH))
    wide = json.dumps([[[i]] for i in range(10_000)]).encode()
    assert not json_too_deep(wide)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/jsonx",
        "text/json",
    ],
)
async def test_a_body_that_is_not_json_is_415(
    client: AsyncTestClient[Any], content_type: str
) -> None:
    payload = json.dumps(account_body()).encode()
    response = await client.post(
        "/v1/accounts", content=payload, headers={"content-type": content_type}
    )
    body = assert_problem(response, 415, "unsupported_media_type")
    assert "application/json" in body["detail"]
    sent = await client.post(
        "/v1/accounts/acc_x/outbox",
        content=b'{"to":["a@example.com"],"subject":"s"}',
        headers={"content-type": content_type},
    )
    assert_problem(sent, 415, "unsupported_media_type")
    assert (await client.get("/v1/accounts")).json()["items"] == []


async def test_a_body_without_content_type_is_415(client: AsyncTestClient[Any]) -> None:
    # Strict: a body of unknown type is not guessed to be JSON.
    payload = json.dumps(account_body()).encode()
    request = client.build_request("POST", "/v1/accounts", content=payload)
    assert "content-type" not in request.headers
    assert_problem(await client.send(request), 415, "unsupported_media_type")
    empty = client.build_request("POST", "/v1/accounts", content=b"")
    assert_problem(await client.send(empty), 422, "validation_error")  # no body at all


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/merge-patch+json",
    ],
)
async def test_json_media_types_are_accepted(
    client: AsyncTestClient[Any], content_type: str
) -> None:
    payload = json.dumps(account_body()).encode()
    response = await client.post(
        "/v1/accounts", content=payload, headers={"content-type": content_type}
    )
    assert response.status_code == 201, response.text


async def test_routes_without_a_body_ignore_the_content_type(client: AsyncTestClient[Any]) -> None:
    response = await client.get("/v1/accounts", headers={"content-type": "text/plain"})
    assert response.status_code == 200


async def test_problem_codes_are_catalogue_members(client: AsyncTestClient[Any]) -> None:
    responses = [
        await client.get("/v1/nothing"),
        await client.put("/v1/accounts"),
        await client.get("/v1/accounts/acc_missing"),
        await client.post("/v1/accounts", json={}),
        await client.post("/v1/accounts", content=b"{", headers=JSON),
    ]
    for response in responses:
        assert response.json()["code"] in set(ErrorCode), response.text


async def test_one_log_line_per_request(
    client: AsyncTestClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom.http")
    created = await client.post(
        "/v1/accounts", json=account_body(), headers={"X-Request-ID": "req-create-1"}
    )
    account_id = created.json()["id"]
    await client.get(f"/v1/accounts/{account_id}", headers={"X-Request-ID": "req-get-2"})
    await client.get("/nowhere", headers={"X-Request-ID": "req-miss-3"})
    lines = [r for r in caplog.records if r.name == "mailroom.http"]
    assert len(lines) == 3
    fields = [getattr(r, "fields", {}) for r in lines]
    assert [(f["method"], f["route"], f["status"]) for f in fields] == [
        ("POST", "/v1/accounts", 201),
        ("GET", "/v1/accounts/{account_id}", 200),
        ("GET", "unmatched", 404),
    ]
    assert all(isinstance(f["duration_ms"], float) and f["duration_ms"] >= 0 for f in fields)
    assert [r.levelno for r in lines] == [logging.INFO] * 3
    assert account_id not in " ".join(r.getMessage() + json.dumps(f) for r, f in zip(lines, fields))


async def test_database_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "data" / "store"
    db = Database(str(directory / "mailroom.db"))
    await db.open()
    try:
        async with db.transaction() as conn:
            await conn.execute("PRAGMA user_version=0")
        names = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}
        assert {"mailroom.db", "mailroom.db-wal", "mailroom.db-shm"} <= set(names)
        assert set(names.values()) == {FILE_MODE}, names
        assert directory.stat().st_mode & 0o777 == DIRECTORY_MODE
    finally:
        await db.close()


async def test_an_existing_database_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "mailroom.db"
    db = Database(str(path))
    await db.open()
    await db.close()
    path.chmod(0o644)
    db = Database(str(path))
    await db.open()
    try:
        assert path.stat().st_mode & 0o777 == FILE_MODE
    finally:
        await db.close()
