"""The request side of the contract, against the real process: strict bodies, OPTIONS,
cursors and timestamps exactly as the OpenAPI document states them."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.domain.outbox import MAX_NAMED_ADDRESS_CHARS
from tests.process import start, stop

SPEC = json.loads((Path(__file__).resolve().parents[2] / "openapi" / "openapi.json").read_text())
KEY = "contract-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def account(**incoming: Any) -> dict[str, Any]:
    return {
        "name": "Alice",
        "email": "alice@example.com",
        "incoming": {"host": "127.0.0.1", "username": "alice", "password": "pw", **incoming},
        "outgoing": {"host": "127.0.0.1"},
    }


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    directory = tmp_path_factory.mktemp("contract")
    proc, base = start(
        {
            "MAILROOM_DATABASE": str(directory / "mailroom.db"),
            "MAILROOM_API_KEYS": KEY,
            "MAILROOM_ALLOWED_NETWORKS": str(ipaddress.ip_network("127.0.0.0/8")),
        }
    )
    try:
        with httpx.Client(base_url=base, headers=AUTH, timeout=30) as client:
            yield client
    finally:
        stop(proc)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"incoming": {"port": "110"}}, "incoming.port"),
        ({"outgoing": {"host": "127.0.0.1", "allow_insecure_auth": "true"}}, "outgoing"),
        ({"incoming": {"port": 110.5}}, "incoming.port"),
        ({"retrieval": {"leave_on_server": 1}}, "retrieval.leave_on_server"),
    ],
)
def test_a_body_of_the_wrong_types_is_refused_not_coerced(
    api: httpx.Client, patch: dict[str, Any], field: str
) -> None:
    body = account()
    for key, value in patch.items():
        body[key] = {**body[key], **value} if key != "retrieval" else value
    response = api.post("/v1/accounts", json=body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "validation_error"
    assert problem["errors"][0]["field"].startswith(field), problem


def test_an_integer_written_with_a_zero_fraction_is_an_integer(api: httpx.Client) -> None:
    # JSON Schema: 110.0 is an integer, so the schema accepts it and so does the server.
    response = api.post(
        "/v1/accounts",
        content=json.dumps(account(port=110.0)),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["incoming"]["port"] == 110


def test_options_lists_every_method_of_the_path(api: httpx.Client) -> None:
    created = api.post("/v1/accounts", json=account()).json()
    for template, item in SPEC["paths"].items():
        path = re.sub(r"\{[^}]+\}", "x", template.replace("{index}", "0")).replace(
            "/accounts/x", f"/accounts/{created['id']}"
        )
        response = api.options(path)
        assert response.status_code == 204, (template, response.text)
        allowed = {m.strip() for m in response.headers["allow"].split(",")}
        documented = {m.upper() for m in item if m in {"get", "post", "patch", "delete", "put"}}
        assert documented <= allowed, (template, allowed)
        assert allowed - documented <= {"OPTIONS", "HEAD"}, (template, allowed)


def test_cursors_are_what_the_document_says(api: httpx.Client) -> None:
    for _ in range(3):
        api.post("/v1/accounts", json=account())
    parameter = next(
        p for p in SPEC["paths"]["/v1/accounts"]["get"]["parameters"] if p["name"] == "cursor"
    )
    pattern = re.compile(parameter["schema"]["pattern"])
    first = api.get("/v1/accounts", params={"limit": 1}).json()
    assert pattern.search(first["next_cursor"])
    second = api.get("/v1/accounts", params={"limit": 1, "cursor": first["next_cursor"]})
    assert second.status_code == 200 and second.json()["items"] != first["items"]
    # Any cursor of that form is a position (here: past every id, so an empty page).
    assert api.get("/v1/accounts", params={"cursor": "c1.zzz"}).json()["items"] == []
    for bad in ("bm9wZQ", "c1.", "c1.ABC", "c1.acc_x\n"):
        response = api.get("/v1/accounts", params={"cursor": bad})
        assert response.status_code == 422, bad
        assert response.json()["errors"][0]["field"] == "cursor"


@pytest.mark.parametrize(
    ("since", "status"),
    [
        ("2024-05-01T12:00:00Z", 200),
        ("2024-05-01t12:00:00.5+02:00", 200),
        ("0.5", 422),  # was read as a Unix time
        ("2024-05-01", 422),
        ("2024-02-30T00:00:00Z", 422),
        ("0001-01-01T00:00:00+01:00", 422),  # before year 1 in UTC
    ],
)
def test_since_is_an_rfc3339_date_time(api: httpx.Client, since: str, status: int) -> None:
    created = api.post("/v1/accounts", json=account()).json()
    response = api.get(f"/v1/accounts/{created['id']}/messages", params={"since": since})
    assert response.status_code == status, response.text


def test_send_request_schema_states_the_rules_the_server_applies() -> None:
    schema = SPEC["components"]["schemas"]["SendRequest"]
    assert schema["additionalProperties"] is False
    # "At least one of" as one `not`: the body is none of "every field of a group empty".
    groups = [set(empty["properties"]) for empty in schema["not"]["anyOf"]]
    # A reply takes its recipients from the message it answers; a forward needs no body.
    assert groups == [
        {"to", "cc", "bcc", "reply_to_message"},
        {"text", "html", "forward_message"},
    ]
    assert "anyOf" not in schema and "allOf" not in schema
    text, named = schema["properties"]["to"]["items"]["oneOf"]
    assert text["type"] == "string" and text["maxLength"] == MAX_NAMED_ADDRESS_CHARS
    assert named == {"$ref": "#/components/schemas/NamedAddress"}
    assert schema["properties"]["headers"]["propertyNames"]["maxLength"] == 76
    for name, component in SPEC["components"]["schemas"].items():
        if name.endswith(("Input", "Patch")) or name == "SendRequest":
            assert component.get("additionalProperties") is False, name
