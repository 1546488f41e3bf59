"""GET /v1/events: cursor paging, filters, long-polling, tenancy, bad input."""

from __future__ import annotations

from typing import Any

from litestar.testing import AsyncTestClient

from tests.api.conftest import OTHER_TENANT_KEY
from tests.waiting import until
from tests.webhooks.conftest import register
from tests.webhooks.receiver import Receiver


async def _json(request: Any) -> Any:
    return (await request).json()


async def _disable_event(client: AsyncTestClient[Any], receiver: Receiver) -> str:
    """Make one event (an endpoint answering 410 is disabled: ``webhook.disabled``)."""
    receiver.default_status = 410
    hook = (await register(client, receiver))["webhook"]
    await client.post(f"/v1/webhooks/{hook['id']}/test")
    return str(hook["id"])


async def test_the_feed_pages_by_cursor_per_tenant_with_filters(
    client: AsyncTestClient[Any], receiver: Receiver
) -> None:
    empty = (await client.get("/v1/events", params={"wait": 0.2})).json()
    assert empty == {"items": [], "next_cursor": None}
    hook_id = await _disable_event(client, receiver)
    # (The test client blocks this loop, where the receiver runs: poll, do not long-poll.)
    answer = await until(
        lambda: _json(client.get("/v1/events")), lambda body: len(body["items"]) == 1
    )
    [event] = answer["items"]
    assert event["type"] == "webhook.disabled" and event["data"]["webhook_id"] == hook_id
    assert answer["next_cursor"] == event["cursor"]
    # Nothing after the cursor: the same cursor comes back (store it either way).
    again = (await client.get("/v1/events", params={"after": event["cursor"]})).json()
    assert again == {"items": [], "next_cursor": event["cursor"]}
    # Another tenant sees nothing of it.
    other = {"Authorization": f"Bearer {OTHER_TENANT_KEY}"}
    assert (await client.get("/v1/events", headers=other)).json()["items"] == []
    # Filters.
    sent = await client.get("/v1/events", params={"types": "outgoing.sent,outgoing.failed"})
    assert sent.json()["items"] == []
    mine = await client.get("/v1/events", params={"types": "webhook.disabled"})
    assert [e["id"] for e in mine.json()["items"]] == [event["id"]]


async def test_bad_parameters_are_422(client: AsyncTestClient[Any]) -> None:
    for params in (
        {"after": "c1.abc"},
        {"after": "e1.1"},
        {"types": "mail.exploded"},
        {"wait": 31},
        {"limit": 0},
    ):
        response = await client.get("/v1/events", params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["code"] == "validation_error"
