"""Tenants: every /v1 route of the OpenAPI document answers 404 to another tenant.

One real process serves two tenants. Tenant A owns an account with a retrieved message
(with an attachment), a retrieval and an outgoing message. For every operation in the
committed spec, tenant B calling it with A's ids gets 404 `not_found`; tenant A's own
read calls succeed (so the matrix is not vacuous), and after B's writes A's resources
are untouched.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.process import start, stop
from tests.retrieval.conftest import DATA
from tests.servers.dovecot import Dovecot
from tests.servers.smtp import running_smtp_sink
from tests.waiting import wait_for

SPEC = json.loads((Path(__file__).resolve().parents[2] / "openapi" / "openapi.json").read_text())
KEY_A = "tenant-a-key-0123456789"
KEY_B = "tenant-b-key-0123456789"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
BODIES: dict[str, Any] = {
    "UpdateAccount": {"name": "stolen"},
    "SendMessage": {"to": ["x@example.com"], "subject": "hi", "text": "hi"},
    "SendRawMessage": {
        "raw_base64": base64.b64encode(
            b"From: a@example.com\r\nTo: x@example.com\r\nSubject: hi\r\n\r\nhi\r\n"
        ).decode()
    },
}
NO_BODY = {
    "StartRetrieval",
    "CancelRetrieval",
    "DeleteAccount",
    "DeleteMessage",
    "CancelOutgoingMessage",
    "VerifyAccount",
}


def operations() -> list[tuple[str, str, str]]:
    return [
        (method.upper(), path, op["operationId"])
        for path, item in SPEC["paths"].items()
        if "{account_id}" in path
        for method, op in item.items()
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, dovecot: Dovecot) -> Iterator[dict[str, str]]:
    mailbox = dovecot.add_user()
    mailbox.deliver((DATA / "attachments.eml").read_bytes())
    directory = tmp_path_factory.mktemp("tenants")
    with running_smtp_sink() as sink:
        proc, base = start(
            {
                "MAILROOM_DATABASE": str(directory / "mailroom.db"),
                "MAILROOM_API_KEYS": f"a:{KEY_A},b:{KEY_B}",
                "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
            }
        )
        try:
            http = httpx.Client(base_url=base, timeout=30)
            account = http.post(
                "/v1/accounts",
                headers=A,
                json={
                    "name": "a",
                    "email": "a@example.com",
                    "incoming": {
                        "host": dovecot.host,
                        "port": dovecot.pop3_port,
                        "security": "none",
                        "username": mailbox.user,
                        "password": mailbox.password,
                    },
                    "outgoing": {"host": sink.host, "port": sink.port, "security": "none"},
                },
            ).json()["id"]
            retrieval = http.post(f"/v1/accounts/{account}/retrievals", headers=A).json()["id"]
            wait_for(
                lambda: (
                    http.get(f"/v1/accounts/{account}/retrievals/{retrieval}", headers=A).json()[
                        "status"
                    ]
                    == "succeeded"
                ),
                interval=0.05,
            )
            message = http.get(f"/v1/accounts/{account}/messages", headers=A).json()["items"][0]
            outgoing = http.post(
                f"/v1/accounts/{account}/outbox", headers=A, json=BODIES["SendMessage"]
            ).json()["id"]
            yield {
                "base": base,
                "account_id": account,
                "retrieval_id": retrieval,
                "message_id": message["id"],
                "outgoing_id": outgoing,
                "index": "0",
            }
        finally:
            stop(proc)


@pytest.mark.parametrize(("method", "path", "operation"), operations())
def test_other_tenant_gets_404(
    world: dict[str, str], method: str, path: str, operation: str
) -> None:
    url = world["base"] + path.format(**world)
    if operation not in BODIES and operation not in NO_BODY and method != "GET":
        raise AssertionError(f"add a body for {operation} to this matrix")
    body = BODIES.get(operation)
    response = httpx.request(method, url, headers=B, json=body, timeout=30)
    assert response.status_code == 404, (operation, response.status_code, response.text)
    assert response.json()["code"] == "not_found"
    if method == "GET":
        assert httpx.get(url, headers=A, timeout=30).status_code == 200, operation


def test_tenant_a_resources_survive_tenant_b(world: dict[str, str]) -> None:
    base, account = world["base"], world["account_id"]
    got = httpx.get(f"{base}/v1/accounts/{account}", headers=A).json()
    assert got["name"] == "a"
    message = httpx.get(f"{base}/v1/accounts/{account}/messages/{world['message_id']}", headers=A)
    assert message.status_code == 200
    listing = httpx.get(f"{base}/v1/accounts", headers=B).json()
    assert listing["items"] == []


@pytest.mark.parametrize("field", ["forward_message", "reply_to_message"])
def test_other_tenant_cannot_forward_or_answer_a_message_of_a(
    world: dict[str, str], field: str
) -> None:
    """B's own account naming A's stored message: 404, as if it did not exist."""
    base = world["base"]
    own = httpx.post(
        f"{base}/v1/accounts",
        headers=B,
        json={
            "name": f"b-{field}",
            "email": "b@example.com",
            "incoming": {
                "host": "127.0.0.1",
                "port": 1110,
                "security": "none",
                "username": "b",
                "password": "b",
            },
            "outgoing": {"host": "127.0.0.1", "port": 2525, "security": "none"},
        },
        timeout=30,
    )
    assert own.status_code == 201, own.text
    account = f"{base}/v1/accounts/{own.json()['id']}"
    try:
        response = httpx.post(
            f"{account}/outbox",
            headers=B,
            json={"to": ["x@example.com"], "text": "hi", field: world["message_id"]},
            timeout=30,
        )
    finally:
        # B has no account in the other tests of this module.
        assert httpx.delete(account, headers=B, timeout=30).status_code == 204
    assert response.status_code == 404, response.text
    assert response.json()["code"] == "not_found"
