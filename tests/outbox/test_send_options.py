"""Metadata, tags and scheduled sends: validation, the list filters, events, delivery."""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.domain.outbox import SendRequest
from service.services.sending import request_hash
from tests.api.conftest import API_KEY, app_database
from tests.outbox.conftest import (
    ClientFactory,
    create_account,
    get_message,
    in_app,
    outbox_settings,
    send,
    wait_status,
)
from tests.servers.smtp import SMTPDServer, SMTPTLSFiles
from tests.waiting import feed_until


def outbox_url(account_id: str) -> str:
    return f"/v1/accounts/{account_id}/outbox"


async def listed(client: AsyncTestClient[Any], account_id: str, **params: Any) -> list[str]:
    response = await client.get(outbox_url(account_id), params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def rfc3339(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


async def test_metadata_and_tags_round_trip_and_filter_the_list(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    first = await send(
        client,
        account_id,
        metadata={"order_id": "A-1042", "customer": "Zoë"},
        tags=["receipt", "shop:eu"],
    )
    assert first["metadata"] == {"order_id": "A-1042", "customer": "Zoë"}
    assert first["tags"] == ["receipt", "shop:eu"]
    second = await send(client, account_id, metadata={"order_id": "A-1043"}, tags=["receipt"])
    plain = await send(client, account_id)
    assert plain["metadata"] == {} and plain["tags"] == []

    got = await get_message(client, account_id, first["id"])
    assert got["metadata"] == first["metadata"] and got["tags"] == first["tags"]

    assert await listed(client, account_id, tag="receipt") == [second["id"], first["id"]]
    assert await listed(client, account_id, tag=["receipt", "shop:eu"]) == [first["id"]]
    assert await listed(client, account_id, tag="nothing") == []
    assert await listed(client, account_id, **{"metadata[order_id]": "A-1043"}) == [second["id"]]
    assert await listed(
        client, account_id, **{"metadata[order_id]": "A-1042", "metadata[customer]": "Zoë"}
    ) == [first["id"]]
    assert await listed(client, account_id, **{"metadata[customer]": "zoë"}) == []
    # With paging: the filter holds on every page.
    page = (await client.get(outbox_url(account_id), params={"tag": "receipt", "limit": 1})).json()
    assert [i["id"] for i in page["items"]] == [second["id"]]
    rest = await listed(client, account_id, tag="receipt", cursor=page["next_cursor"])
    assert rest == [first["id"]]

    bad = await client.get(outbox_url(account_id), params={"metadata[bad key]": "x"})
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error"

    # Delivered: the outgoing.sent events carry metadata and tags.
    for message in (first, second, plain):
        await wait_status(client, account_id, message["id"])
    ids = {message["id"] for message in (first, second, plain)}

    def all_sent(items: list[dict[str, Any]]) -> bool:
        return ids <= {e["data"]["outgoing_id"] for e in items}

    events = await feed_until(client, all_sent, types="outgoing.sent")
    by_id = {e["data"]["outgoing_id"]: e["data"] for e in events}
    assert by_id[first["id"]]["metadata"] == first["metadata"]
    assert by_id[first["id"]]["tags"] == ["receipt", "shop:eu"]
    assert by_id[plain["id"]]["metadata"] == {} and by_id[plain["id"]]["tags"] == []
    # Metadata never reaches the message itself.
    for received in smtpd.messages:
        assert b"A-1042" not in received.data and b"receipt" not in received.data


@pytest.mark.parametrize(
    ("overrides", "code", "field"),
    [
        ({"metadata": {f"k{i}": "v" for i in range(21)}}, "invalid_metadata", "metadata"),
        ({"metadata": {"bad key": "v"}}, "invalid_metadata", "metadata"),
        ({"metadata": {"": "v"}}, "invalid_metadata", "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "invalid_metadata", "metadata"),
        ({"metadata": {"k": "v" * 501}}, "invalid_metadata", "metadata.k"),
        ({"metadata": {"k": "a\nb"}}, "invalid_metadata", "metadata.k"),
        (
            {"metadata": {f"k{i}": "v" * 400 for i in range(11)}},
            "invalid_metadata",
            "metadata",
        ),
        ({"tags": [f"t{i}" for i in range(11)]}, "invalid_tag", "tags"),
        ({"tags": ["ok", "ok"]}, "invalid_tag", "tags[1]"),
        ({"tags": ["with space"]}, "invalid_tag", "tags[0]"),
        ({"tags": [""]}, "invalid_tag", "tags[0]"),
        ({"tags": ["t" * 65]}, "invalid_tag", "tags[0]"),
        ({"send_at": "2026-01-01T10:00:00"}, "invalid_send_at", "send_at"),
        ({"send_at": "2999-01-01T10:00:00Z"}, "invalid_send_at", "send_at"),
        ({"metadata": {"k": 1}}, "validation_error", None),
        ({"tags": "receipt"}, "validation_error", None),
        ({"send_at": "tomorrow"}, "validation_error", None),
    ],
)
async def test_bad_metadata_tags_and_send_at_are_422(
    client: AsyncTestClient[Any],
    smtpd: SMTPDServer,
    overrides: dict[str, Any],
    code: str,
    field: str | None,
) -> None:
    account_id = await create_account(client, smtpd)
    problem = await send(client, account_id, expect=422, **overrides)
    assert problem["code"] == code, problem
    if field is not None:
        assert problem["errors"][0]["field"] == field
    assert (await client.get(outbox_url(account_id))).json()["items"] == []


async def test_send_at_horizon_is_configurable(
    client_factory: ClientFactory, smtpd: SMTPDServer
) -> None:
    client = await client_factory(send_at_horizon_s=60.0)
    account_id = await create_account(client, smtpd)
    soon = datetime.now(UTC) + timedelta(seconds=50)
    accepted = await send(client, account_id, send_at=rfc3339(soon))
    assert accepted["status"] == "scheduled"
    late = datetime.now(UTC) + timedelta(seconds=120)
    problem = await send(client, account_id, expect=422, send_at=rfc3339(late))
    assert problem["code"] == "invalid_send_at"


async def test_a_scheduled_message_waits_then_is_delivered(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    at = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    accepted = await send(client, account_id, send_at=at.astimezone().isoformat())
    assert accepted["status"] == "scheduled"
    assert accepted["send_at"] == rfc3339(at)
    assert accepted["next_attempt_at"] == rfc3339(at)
    now_queued = await send(client, account_id)
    past = await send(client, account_id, send_at=rfc3339(datetime.now(UTC) - timedelta(hours=1)))
    assert past["status"] == "queued" and past["send_at"] is None
    assert await listed(client, account_id, status="scheduled") == [accepted["id"]]
    queued_or_sent = await listed(client, account_id)
    assert queued_or_sent == [past["id"], now_queued["id"], accepted["id"]]
    await wait_status(client, account_id, now_queued["id"])
    await wait_status(client, account_id, past["id"])
    assert (await get_message(client, account_id, accepted["id"]))["status"] == "scheduled"
    assert len(smtpd.messages) == 2

    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent", done
    [attempt] = done["attempts"]
    assert datetime.fromisoformat(attempt["at"]) >= at
    assert len(smtpd.messages) == 3
    assert await listed(client, account_id, status="scheduled") == []


async def test_a_scheduled_message_can_be_cancelled(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    at = datetime.now(UTC) + timedelta(days=2)
    accepted = await send(client, account_id, send_at=rfc3339(at))
    assert accepted["status"] == "scheduled"
    # Expiry counts from the scheduled time, not from acceptance.
    assert datetime.fromisoformat(accepted["expires_at"]) > at
    response = await client.delete(f"{outbox_url(account_id)}/{accepted['id']}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert await listed(client, account_id, status="scheduled") == []
    assert await listed(client, account_id, status="cancelled") == [accepted["id"]]


async def test_a_scheduled_message_is_delivered_after_a_restart(
    tmp_path: Path, smtp_tls_files: SMTPTLSFiles, smtpd: SMTPDServer
) -> None:
    database = app_database(tmp_path)
    keys = (os.urandom(32),)

    async def start() -> AsyncTestClient[Any]:
        settings = outbox_settings(tmp_path, smtp_tls_files, database=database, secret_keys=keys)
        test_client: AsyncTestClient[Any] = AsyncTestClient(app=create_app(settings))
        await test_client.__aenter__()
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        return test_client

    async def stop(test_client: AsyncTestClient[Any]) -> None:
        await in_app(test_client, test_client.app.state.delivery.stop)
        await test_client.__aexit__(None, None, None)

    first = await start()
    try:
        account_id = await create_account(first, smtpd)
        at = datetime.now(UTC) + timedelta(seconds=3)
        accepted = await send(first, account_id, send_at=rfc3339(at), metadata={"job": "7"})
    finally:
        await stop(first)
    assert smtpd.messages == []
    await asyncio.sleep(0.5)
    second = await start()
    try:
        assert (await get_message(second, account_id, accepted["id"]))["status"] in (
            "scheduled",
            "queued",
            "sending",
            "sent",
        )
        done = await wait_status(second, account_id, accepted["id"])
        assert done["status"] == "sent", done
        assert done["metadata"] == {"job": "7"}
        assert datetime.fromisoformat(done["attempts"][0]["at"]) >= at
        [received] = smtpd.messages
        assert received.rcpt_tos == ("bob@example.org",)
    finally:
        await stop(second)


def test_request_hash_of_a_request_without_new_fields_is_unchanged() -> None:
    """Idempotency keys stored before metadata, tags, send_at, replies and content ids
    existed still match the same request retried after an upgrade."""
    body = (
        b'{"attachments":[{"content_base64":"aGk=","content_type":"text/plain","filename":"a"}],'
        b'"bcc":[],"cc":[],"headers":{"X-A":"1"},"html":null,"reply_to":null,"subject":"Hi",'
        b'"text":"t","to":["b@example.org"]}'
    )
    request = msgspec.json.decode(body, type=SendRequest)
    assert request_hash(request) == hashlib.sha256(body).hexdigest()
    tagged = msgspec.structs.replace(request, tags=["x"])
    assert request_hash(tagged) != request_hash(request)
