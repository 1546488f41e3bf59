"""Accounts API: CRUD, defaults, write-only passwords, pagination, errors."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.api.conftest import OTHER_TENANT_KEY, account_body

PROBLEM = "application/problem+json"


async def create(client: AsyncTestClient[Any], **overrides: Any) -> dict[str, Any]:
    response = await client.post("/v1/accounts", json=account_body(**overrides))
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_create_get_roundtrip_and_default_ports(client: AsyncTestClient[Any]) -> None:
    created = await create(client)
    assert created["id"].startswith("acc_")
    assert created["incoming"] == {
        "protocol": "pop3",
        "host": "pop.example.com",
        "port": 995,
        "security": "tls",
        "username": "alice",
        "password_set": True,
    }
    assert created["outgoing"]["port"] == 587
    assert created["retrieval"] == {
        "leave_on_server": True,
        "delete_after_days": None,
        "max_message_bytes": None,
        "poll_interval_minutes": None,
    }
    fetched = (await client.get(f"/v1/accounts/{created['id']}")).json()
    assert fetched == created


@pytest.mark.parametrize(
    ("incoming", "outgoing", "pop3_port", "smtp_port"),
    [
        ("tls", "tls", 995, 465),
        ("starttls", "starttls", 110, 587),
        ("none", "none", 110, 25),
    ],
)
async def test_default_port_follows_security(
    client: AsyncTestClient[Any], incoming: str, outgoing: str, pop3_port: int, smtp_port: int
) -> None:
    body = account_body()
    body["incoming"]["security"] = incoming
    body["outgoing"]["security"] = outgoing
    response = await client.post("/v1/accounts", json=body)
    assert response.status_code == 201
    assert response.json()["incoming"]["port"] == pop3_port
    assert response.json()["outgoing"]["port"] == smtp_port


async def test_passwords_never_in_responses(client: AsyncTestClient[Any]) -> None:
    created = await create(client)
    texts = [
        (await client.get(f"/v1/accounts/{created['id']}")).text,
        (await client.get("/v1/accounts")).text,
        (
            await client.patch(
                f"/v1/accounts/{created['id']}", json={"incoming": {"password": "new-Pw-77"}}
            )
        ).text,
    ]
    for text in texts:
        assert "pop-secret-Zq9" not in text
        assert "smtp-secret-Xk4" not in text
        assert "new-Pw-77" not in text
        assert '"password"' not in text


@pytest.mark.sqlite_only  # reads the SQLite file itself
async def test_no_password_in_clear_in_database_file(
    client: AsyncTestClient[Any], settings: Any
) -> None:
    await create(client)
    with open(settings.database, "rb") as handle:
        raw = handle.read()
    wal = settings.database + "-wal"
    try:
        with open(wal, "rb") as handle:
            raw += handle.read()
    except FileNotFoundError:
        pass
    assert b"alice" in raw  # the file does hold the account (the check is not vacuous)
    for secret in (b"pop-secret-Zq9", b"smtp-secret-Xk4"):
        assert secret not in raw
        assert secret.decode().encode("utf-16-le") not in raw
    row = (
        sqlite3.connect(settings.database)
        .execute("SELECT in_password, out_password FROM accounts")
        .fetchone()
    )
    assert row[0].startswith("v1.") and row[1].startswith("v1.")


async def test_patch_merges_and_moves_default_port(client: AsyncTestClient[Any]) -> None:
    created = await create(client)
    response = await client.patch(
        f"/v1/accounts/{created['id']}",
        json={"incoming": {"security": "starttls"}, "retrieval": {"poll_interval_minutes": 5}},
    )
    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["incoming"]["security"] == "starttls"
    assert updated["incoming"]["port"] == 110
    assert updated["incoming"]["host"] == "pop.example.com"
    assert updated["retrieval"]["poll_interval_minutes"] == 5
    assert updated["updated_at"] > created["updated_at"]
    # an explicit port is kept when the mode changes
    response = await client.patch(
        f"/v1/accounts/{created['id']}", json={"outgoing": {"port": 2525, "security": "none"}}
    )
    assert response.json()["outgoing"]["port"] == 2525


async def test_patch_removes_smtp_auth_only_as_a_pair(client: AsyncTestClient[Any]) -> None:
    created = await create(client)
    url = f"/v1/accounts/{created['id']}"
    response = await client.patch(url, json={"outgoing": {"password": None}})
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"
    response = await client.patch(url, json={"outgoing": {"username": None, "password": None}})
    assert response.status_code == 200
    assert response.json()["outgoing"]["password_set"] is False
    assert response.json()["outgoing"]["username"] is None


async def test_delete_then_404(client: AsyncTestClient[Any]) -> None:
    created = await create(client)
    assert (await client.delete(f"/v1/accounts/{created['id']}")).status_code == 204
    response = await client.get(f"/v1/accounts/{created['id']}")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["code"] == "not_found"
    assert (await client.delete(f"/v1/accounts/{created['id']}")).status_code == 404


async def test_pagination_walks_every_account_once(client: AsyncTestClient[Any]) -> None:
    ids = [(await create(client, name=f"n{i}"))["id"] for i in range(7)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/v1/accounts", params=params)).json()
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    assert pages == 3
    default = (await client.get("/v1/accounts")).json()
    assert len(default["items"]) == 7 and default["next_cursor"] is None


@pytest.mark.parametrize(
    ("params", "field"),
    [({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"cursor": "bm9wZQ"}, "cursor")],
)
async def test_bad_pagination_params(
    client: AsyncTestClient[Any], params: dict[str, Any], field: str
) -> None:
    response = await client.get("/v1/accounts", params=params)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == field


async def test_other_tenant_sees_nothing(client: AsyncTestClient[Any]) -> None:
    created = await create(client)
    other = {"Authorization": f"Bearer {OTHER_TENANT_KEY}"}
    assert (await client.get(f"/v1/accounts/{created['id']}", headers=other)).status_code == 404
    listing = (await client.get("/v1/accounts", headers=other)).json()
    assert listing["items"] == []
    patched = await client.patch(f"/v1/accounts/{created['id']}", json={"name": "x"}, headers=other)
    assert patched.status_code == 404
    assert (await client.delete(f"/v1/accounts/{created['id']}", headers=other)).status_code == 404
    assert (await client.get(f"/v1/accounts/{created['id']}")).json()["name"] == "Alice"
