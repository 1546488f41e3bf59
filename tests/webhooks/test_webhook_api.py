"""Webhook endpoints through the API: registration rules, signed delivery verified with the
``standardwebhooks`` library, retries with the same ``webhook-id``, 410, rotation, the
attempt log, tenancy."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar.testing import AsyncTestClient

from tests.api.conftest import OTHER_TENANT_KEY
from tests.waiting import feed_until
from tests.webhooks.conftest import ClientFactory, register, until_received
from tests.webhooks.receiver import Receiver


async def test_registration_checks_the_url_and_the_event_types(
    client_factory: ClientFactory,
) -> None:
    client = await client_factory(allowed_networks=())
    cases = [
        ({"url": "http://93.184.216.34/hook", "events": ["*"]}, "https_required"),
        ({"url": "https://169.254.169.254/latest", "events": ["*"]}, "host_not_allowed"),
        ({"url": "https://127.0.0.1/hook", "events": ["*"]}, "host_not_allowed"),
        ({"url": "https://user:pw@example.com/hook", "events": ["*"]}, "validation_error"),
        ({"url": "ftp://example.com/hook", "events": ["*"]}, "validation_error"),
        ({"url": "https://[N\u00d1?EY/hook", "events": ["*"]}, "validation_error"),
        ({"url": "https://example.com:99999/hook", "events": ["*"]}, "validation_error"),
        ({"url": "https://example.com/hook", "events": ["mail.exploded"]}, "validation_error"),
        ({"url": "https://example.com/hook", "events": []}, "validation_error"),
        (
            {"url": "https://example.com/hook", "events": ["*"], "account_ids": ["acc_nope"]},
            "validation_error",
        ),
    ]
    for body, code in cases:
        response = await client.post("/v1/webhooks", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["code"] == code, (body, response.json())
    assert (await client.get("/v1/webhooks")).json()["items"] == []


async def test_crud_is_tenant_scoped_and_never_shows_the_secret_again(
    client: AsyncTestClient[Any], receiver: Receiver
) -> None:
    created = await register(client, receiver, events=["outgoing.sent"], description="ops")
    hook = created["webhook"]
    assert hook["enabled"] is True and hook["events"] == ["outgoing.sent"]
    got = (await client.get(f"/v1/webhooks/{hook['id']}")).json()
    assert "secret" not in got and got["description"] == "ops"
    listed = (await client.get("/v1/webhooks")).json()
    assert [h["id"] for h in listed["items"]] == [hook["id"]]
    patched = await client.patch(
        f"/v1/webhooks/{hook['id']}", json={"events": ["*"], "enabled": False}
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["enabled"] is False
    assert patched.json()["disabled_reason"] == "by_caller"
    test = await client.post(f"/v1/webhooks/{hook['id']}/test")
    assert test.status_code == 409 and test.json()["code"] == "webhook_disabled"
    other = {"Authorization": f"Bearer {OTHER_TENANT_KEY}"}
    assert (await client.get(f"/v1/webhooks/{hook['id']}", headers=other)).status_code == 404
    assert (await client.delete(f"/v1/webhooks/{hook['id']}", headers=other)).status_code == 404
    assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204
    assert (await client.get(f"/v1/webhooks/{hook['id']}")).status_code == 404


async def test_a_test_event_arrives_signed_and_its_attempt_is_logged(
    client: AsyncTestClient[Any], receiver: Receiver
) -> None:
    hook = (await register(client, receiver))["webhook"]
    response = await client.post(f"/v1/webhooks/{hook['id']}/test")
    assert response.status_code == 202, response.text
    event_id = response.json()["event_id"]
    [request] = await until_received(receiver, lambda r: len(r) == 1)
    assert request.verified_with == [0]
    assert request.webhook_id == event_id
    assert request.headers["content-type"] == "application/json"
    body = request.payload
    assert body["type"] == "webhook.test" and body["id"] == event_id
    assert body["data"]["webhook_id"] == hook["id"]
    attempts = await _attempts(client, hook["id"], 1)
    assert attempts[0]["outcome"] == "delivered"
    assert attempts[0]["response_status"] == 200 and attempts[0]["response_body"] == "ok"
    assert attempts[0]["event_id"] == event_id
    # The test event is the endpoint's alone: not in the feed.
    assert (await client.get("/v1/events")).json()["items"] == []


async def test_failures_are_retried_with_the_same_webhook_id(
    client: AsyncTestClient[Any], receiver: Receiver
) -> None:
    receiver.script = [500, 503]
    hook = (await register(client, receiver))["webhook"]
    await client.post(f"/v1/webhooks/{hook['id']}/test")
    requests = await until_received(receiver, lambda r: len(r) == 3)
    assert [r.status for r in requests] == [500, 503, 200]
    assert len({r.webhook_id for r in requests}) == 1
    assert all(r.verified_with == [0] for r in requests)
    attempts = await _attempts(client, hook["id"], 3)
    assert [a["outcome"] for a in attempts] == ["delivered", "retrying", "retrying"]
    assert [a["attempt"] for a in attempts] == [3, 2, 1]
    assert attempts[2]["response_body"] == "failure 500"
    assert (await client.get(f"/v1/webhooks/{hook['id']}")).json()["failing_since"] is None


async def test_a_4xx_fails_without_retry_and_410_disables_the_endpoint(
    client: AsyncTestClient[Any], receiver: Receiver
) -> None:
    receiver.script = [400]
    hook = (await register(client, receiver))["webhook"]
    await client.post(f"/v1/webhooks/{hook['id']}/test")
    await until_received(receiver, lambda r: len(r) == 1)
    [attempt] = await _attempts(client, hook["id"], 1)
    assert attempt["outcome"] == "failed"
    receiver.default_status = 410
    await client.post(f"/v1/webhooks/{hook['id']}/test")
    await until_received(receiver, lambda r: len(r) == 2)
    await _attempts(client, hook["id"], 2)
    got = (await client.get(f"/v1/webhooks/{hook['id']}")).json()
    assert got["enabled"] is False and got["disabled_reason"] == "gone"
    [disabled] = await feed_until(client, bool, types="webhook.disabled")
    assert disabled["data"] == {"webhook_id": hook["id"], "url": receiver.url, "reason": "gone"}
    assert disabled["account_id"] is None
    # Enabled again by the caller: delivered again.
    receiver.default_status = 200
    again = await client.patch(f"/v1/webhooks/{hook['id']}", json={"enabled": True})
    assert again.json()["enabled"] is True and again.json()["disabled_reason"] is None
    await client.post(f"/v1/webhooks/{hook['id']}/test")
    await until_received(receiver, lambda r: len(r) == 3)


async def test_after_rotation_both_secrets_sign_during_the_grace(
    client: AsyncTestClient[Any], receiver: Receiver
) -> None:
    hook = (await register(client, receiver))["webhook"]
    rotated = await client.post(f"/v1/webhooks/{hook['id']}/rotate-secret")
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]
    assert new_secret != receiver.secrets[0]
    receiver.secrets.append(new_secret)
    await client.post(f"/v1/webhooks/{hook['id']}/test")
    [request] = await until_received(receiver, lambda r: len(r) == 1)
    assert request.verified_with == [0, 1]
    assert len(request.headers["webhook-signature"].split(" ")) == 2


async def test_a_slow_endpoint_does_not_delay_another(
    client: AsyncTestClient[Any], receiver: Receiver
) -> None:
    slow = await Receiver().start()
    slow.gate = asyncio.Event()  # the slow endpoint answers nothing until released
    try:
        slow_hook = (await register(client, slow))["webhook"]
        fast_hook = (await register(client, receiver))["webhook"]
        for _ in range(3):
            await client.post(f"/v1/webhooks/{slow_hook['id']}/test")
        await until_received(slow, lambda r: len(r) == 3)
        await client.post(f"/v1/webhooks/{fast_hook['id']}/test")
        await until_received(receiver, lambda r: len(r) == 1)
        # The fast one was served while the slow one still held every request.
        attempts = await client.get(f"/v1/webhooks/{slow_hook['id']}/deliveries")
        assert attempts.json()["items"] == []
        slow.gate.set()
        assert len(await _attempts(client, slow_hook["id"], 3)) == 3
    finally:
        slow.gate.set()
        await slow.stop()


async def _attempts(client: AsyncTestClient[Any], webhook_id: str, count: int) -> list[Any]:
    for _ in range(1000):
        body = (await client.get(f"/v1/webhooks/{webhook_id}/deliveries")).json()
        if len(body["items"]) >= count:
            return list(body["items"])
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} attempts: {body}")


async def test_connections_are_kept_open_between_requests_unless_the_server_closes(
    client: AsyncTestClient[Any], receiver: Receiver
) -> None:
    hook = (await register(client, receiver))["webhook"]
    for n in range(1, 4):
        await client.post(f"/v1/webhooks/{hook['id']}/test")
        await until_received(receiver, lambda r, n=n: len(r) == n)
    assert receiver.connections == 1  # one connection carried the three requests
    receiver.close_connections = True
    for n in range(4, 6):
        await client.post(f"/v1/webhooks/{hook['id']}/test")
        await until_received(receiver, lambda r, n=n: len(r) == n)
    # The 4th went on the kept connection, which the server then closed: a new one.
    assert receiver.connections == 2
    assert all(r.verified_with == [0] and r.status == 200 for r in receiver.requests)


async def test_an_endpoint_failing_for_the_whole_window_is_disabled(
    client_factory: ClientFactory, receiver: Receiver
) -> None:
    client = await client_factory(webhook_retry_window_s=1.0)
    receiver.default_status = 503
    hook = (await register(client, receiver))["webhook"]
    await client.post(f"/v1/webhooks/{hook['id']}/test")
    for _ in range(1500):
        got = (await client.get(f"/v1/webhooks/{hook['id']}")).json()
        if not got["enabled"]:
            break
        await asyncio.sleep(0.02)
    assert got["enabled"] is False and got["disabled_reason"] == "failing"
    # Every attempt failed: retried, or given up once past the window (how many fit in the
    # window, and whether the endpoint is disabled before the last one is recorded as given
    # up, depends on how busy the machine is).
    attempts = await _attempts(client, hook["id"], 1)
    assert {a["outcome"] for a in attempts} <= {"failed", "retrying"}, attempts
    assert all(a["response_status"] == 503 for a in attempts), attempts
    events = await feed_until(client, bool, types="webhook.disabled")
    assert events[0]["data"]["reason"] == "failing"


async def test_an_event_that_failed_its_whole_window_disables_at_once(
    client_factory: ClientFactory, receiver: Receiver
) -> None:
    """The endpoint asks for a retry later than the event's window ends: its only attempt
    is its last, long before the failing limit; the window was spent failing all the same."""
    client = await client_factory(webhook_retry_window_s=1.0, webhook_retry_max_s=5.0)
    receiver.default_status = 503
    receiver.extra_headers = {"Retry-After": "5"}
    hook = (await register(client, receiver))["webhook"]
    await client.post(f"/v1/webhooks/{hook['id']}/test")
    for _ in range(500):
        got = (await client.get(f"/v1/webhooks/{hook['id']}")).json()
        if not got["enabled"]:
            break
        await asyncio.sleep(0.02)
    assert (got["enabled"], got["disabled_reason"]) == (False, "failing")
    [attempt] = await _attempts(client, hook["id"], 1)
    assert (attempt["outcome"], attempt["response_status"]) == ("failed", 503)
