"""Real responses match the committed OpenAPI document, field by field and header by header.

The real process (Dovecot and aiosmtpd behind it) is driven through every operation, on
its success and on its documented errors; each answer is checked against the document:
its status is declared, its media type is declared, its JSON body validates against the
declared schema made strict (a field the schema does not name fails, so does a null where
the schema has no null, so does a missing `required` field), and every required header
the document declares is sent, with a value its schema accepts.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from service import errors
from service.api.problems import RETRY_AFTER_S, service_error_handler
from service.codes import ErrorCode
from tests.api.conftest import app_database
from tests.process import start, stop
from tests.servers.dovecot import Dovecot
from tests.servers.smtp import SMTPDServer
from tests.waiting import until

SPEC_PATH = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
KEY = "conformance-key-0123456789abcdef"
ATTACHMENT = b"%PDF-1.4 not really a pdf \x00\xff\x10"


def _strict(node: Any) -> Any:
    """Component schemas with ``additionalProperties: false`` wherever they list properties,
    so a field the server sends but the document does not name fails validation."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


STRICT_COMPONENTS = {**SPEC["components"], "schemas": _strict(SPEC["components"]["schemas"])}


def _operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            if isinstance(op, dict) and "operationId" in op:
                yield path, method, op


OPERATIONS = {op["operationId"]: (path, method, op) for path, method, op in _operations()}


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        section, name = node["$ref"].split("/")[-2:]
        node = SPEC["components"][section][name]
    return node


class Conformance:
    """Calls operations by id and checks each answer against the document."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.seen: set[tuple[str, int]] = set()

    async def call(
        self,
        operation_id: str,
        expect: int,
        *,
        at: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Call ``operation_id`` with path parameters ``at`` (``kwargs`` go to httpx)."""
        template, method, _ = OPERATIONS[operation_id]
        path = re.sub(r"\{(\w+)\}", lambda m: str((at or {})[m.group(1)]), template)
        response = await self.client.request(method.upper(), path, **kwargs)
        assert response.status_code == expect, (operation_id, response.text)
        self.check(operation_id, response)
        return response

    def check(self, operation_id: str, response: httpx.Response) -> None:
        _, _, op = OPERATIONS[operation_id]
        status = str(response.status_code)
        declared = op["responses"].get(status)
        assert declared is not None, f"{operation_id} answered undeclared {status}"
        self.seen.add((operation_id, response.status_code))
        for name, header in declared.get("headers", {}).items():
            header = _resolve(header)
            value = response.headers.get(name)
            if header.get("required"):
                assert value is not None, f"{operation_id} {status}: no {name} header"
            if value is not None:
                typed: Any = int(value) if header["schema"].get("type") == "integer" else value
                Draft202012Validator(header["schema"]).validate(typed)
        content = declared.get("content")
        if not content:
            assert response.content == b"", (operation_id, status)
            return
        media_type = response.headers["content-type"].split(";")[0].strip()
        media = content.get(media_type) or content.get("*/*")
        assert media is not None, f"{operation_id} {status}: {media_type} not declared"
        if media_type.endswith("json"):
            schema = {**media["schema"], "components": STRICT_COMPONENTS}
            Draft202012Validator(schema).validate(response.json())
        else:
            assert media["schema"]["type"] == "string"


@pytest.fixture
async def conformance(tmp_path: Path, dovecot: Dovecot, smtpd: SMTPDServer) -> Any:
    proc, base = start(
        {
            "MAILROOM_DATABASE": app_database(tmp_path),
            # Given, not generated: a PostgreSQL store requires it.
            "MAILROOM_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "MAILROOM_API_KEYS": KEY,
            "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
            "MAILROOM_CA_FILE": dovecot.ca_file,
            # Autoconfig asks only loopback-bound sources here, briefly.
            "MAILROOM_ISPDB_URL": "off",
            "MAILROOM_AUTOCONFIG_TIMEOUT": "2",
        }
    )
    try:
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        ) as client:
            yield Conformance(client)
    finally:
        stop(proc)


async def test_every_operation_answers_as_documented(
    conformance: Conformance, dovecot: Dovecot, smtpd: SMTPDServer
) -> None:
    c = conformance
    mailbox = dovecot.add_user()
    await c.call("GetHealth", 200)
    await c.call("GetReadiness", 200)
    await c.call("GetMetrics", 200)
    await c.call("GetMetrics", 200, headers={"Accept": "application/openmetrics-text"})

    account = (
        await c.call(
            "CreateAccount",
            201,
            json={
                "name": "Conformance",
                "email": "conf@example.com",
                "incoming": {
                    "host": dovecot.hostname,
                    "port": dovecot.pop3_port,
                    "security": "starttls",
                    "username": mailbox.user,
                    "password": mailbox.password,
                },
                "outgoing": {"host": smtpd.host, "port": smtpd.port, "security": "none"},
            },
        )
    ).json()
    ids = {"account_id": account["id"]}
    await c.call("ListAccounts", 200)
    await c.call("GetAccount", 200, at=ids)
    await c.call("UpdateAccount", 200, at=ids, json={"display_name": None})
    await c.call("VerifyAccount", 200, at=ids)
    await c.call("ListPresets", 200)
    draft = {
        "name": "Draft",
        "email": "conf@example.com",
        "incoming": {
            "host": dovecot.hostname,
            "port": dovecot.pop3_port,
            "security": "starttls",
            "username": mailbox.user,
            "password": mailbox.password,
        },
        "outgoing": {"host": smtpd.host, "port": smtpd.port, "security": "none"},
    }
    await c.call("VerifySettings", 200, json=draft)
    unknown = await c.call("VerifySettings", 422, json={**draft, "preset": "nosuch"})
    assert unknown.json()["code"] == "unknown_preset"
    await c.call("DiscoverSettings", 200, params={"email": "conf@localhost"})
    await c.call("DiscoverSettings", 422, params={"email": "no-at-sign"})

    send = {
        "to": ["reader@example.com"],
        "subject": "Conformance",
        "text": "Body.\n",
        "attachments": [
            {
                "filename": "report.pdf",
                "content_type": "application/pdf",
                "content_base64": base64.b64encode(ATTACHMENT).decode(),
            }
        ],
    }
    key = {"Idempotency-Key": "conformance-1"}
    sent = await c.call("SendMessage", 202, at=ids, json=send, headers=key)
    assert sent.headers["Location"].endswith(sent.json()["id"])
    replay = await c.call("SendMessage", 200, at=ids, json=send, headers=key)
    assert replay.headers["Idempotency-Replayed"] == "true"
    reused = await c.call(
        "SendMessage", 409, at=ids, json={**send, "subject": "Other"}, headers=key
    )
    assert reused.json()["code"] == "idempotency_key_reused"
    await c.call("SendMessage", 422, at=ids, json={**send, "to": ["not an address"]})
    out = {**ids, "outgoing_id": sent.json()["id"]}
    done = await until(
        lambda: c.call("GetOutgoingMessage", 200, at=out),
        lambda r: r.json()["status"] in ("sent", "failed"),
    )
    assert done.json()["status"] == "sent", done.json()
    await c.call("ListOutgoingMessages", 200, at=ids)
    raw_message = b"From: conf@example.com\r\nTo: reader@example.com\r\n\r\nx\r\n"
    raw_key = {"Content-Type": "message/rfc822", "Idempotency-Key": "conformance-raw"}
    raw_sent = await c.call("SendRawMessage", 202, at=ids, content=raw_message, headers=raw_key)
    assert raw_sent.headers["Location"].endswith(raw_sent.json()["id"])
    raw_replay = await c.call("SendRawMessage", 200, at=ids, content=raw_message, headers=raw_key)
    assert raw_replay.headers["Idempotency-Replayed"] == "true"
    raw_json = {"raw_base64": base64.b64encode(raw_message).decode(), "tags": ["conformance"]}
    await c.call("SendRawMessage", 202, at=ids, json=raw_json)
    rfc822 = {"Content-Type": "message/rfc822"}
    await c.call("SendRawMessage", 422, at=ids, content=b"no header\r\n", headers=rfc822)
    await c.call(
        "SendRawMessage", 415, at=ids, content=b"x", headers={"Content-Type": "text/plain"}
    )
    await c.call("GetRawOutgoingMessage", 200, at=out)
    await c.call(
        "GetRawOutgoingMessage", 200, at=out, headers={"Accept": "application/octet-stream"}
    )
    assert (await c.call("CancelOutgoingMessage", 409, at=out)).json()["code"] == (
        "not_cancellable"
    )

    # What was sent arrives in the POP3 mailbox, attachment and all.
    mailbox.deliver(smtpd.messages[0].data)
    started = await c.call("StartRetrieval", 202, at=ids)
    retrieval = {**ids, "retrieval_id": started.json()["id"]}
    finished = await until(
        lambda: c.call("GetRetrieval", 200, at=retrieval),
        lambda r: r.json()["status"] in ("succeeded", "failed"),
    )
    assert finished.json()["status"] == "succeeded", finished.json()
    await c.call("ListRetrievals", 200, at=ids)
    ended = await c.call("CancelRetrieval", 409, at=retrieval)
    assert ended.json()["code"] == "retrieval_finished"

    listed = await c.call("ListMessages", 200, at=ids, params={"has_attachments": "true"})
    (summary,) = listed.json()["items"]
    message = {**ids, "message_id": summary["id"]}
    detail = (await c.call("GetMessage", 200, at=message)).json()
    (attachment,) = detail["attachments"]
    await c.call("GetRawMessage", 200, at=message)
    got = await c.call("GetAttachment", 200, at={**message, "index": attachment["index"]})
    assert got.content == ATTACHMENT
    assert got.headers["content-type"].startswith("application/pdf")
    octets = await c.call(
        "GetAttachment",
        200,
        at={**message, "index": attachment["index"]},
        headers={"Accept": "application/octet-stream"},
    )
    assert octets.headers["content-type"] == "application/octet-stream"
    await c.call("GetAttachment", 404, at={**message, "index": 7})
    await c.call("DeleteMessage", 204, at=message)

    # Webhooks and the event feed.
    hook_body = {"url": "http://127.0.0.1:9/hook", "events": ["outgoing.sent"]}
    hook = (await c.call("CreateWebhook", 201, json=hook_body)).json()["webhook"]
    at_hook = {"webhook_id": hook["id"]}
    await c.call("ListWebhooks", 200)
    await c.call("GetWebhook", 200, at=at_hook)
    await c.call("UpdateWebhook", 200, at=at_hook, json={"description": "ops"})
    await c.call("RotateWebhookSecret", 200, at=at_hook)
    await c.call("TestWebhook", 202, at=at_hook)
    await c.call("ListWebhookDeliveries", 200, at=at_hook)
    await c.call("CreateWebhook", 422, json={**hook_body, "url": "http://93.184.216.34/"})
    await c.call("UpdateWebhook", 200, at=at_hook, json={"enabled": False})
    await c.call("TestWebhook", 409, at=at_hook)
    await c.call("DeleteWebhook", 204, at=at_hook)
    await c.call("GetWebhook", 404, at=at_hook)
    events = await c.call("ListEvents", 200, params={"types": "outgoing.sent"})
    assert events.json()["items"]
    await c.call("ListEvents", 422, params={"after": "nope"})

    # Errors, as documented.
    await c.call("GetAccount", 404, at={"account_id": "acc_missing"})
    await c.call("ListAccounts", 401, headers={"Authorization": "Bearer wrong"})
    await c.call("ListAccounts", 422, params={"limit": 0})
    await c.call("ListMessages", 422, at=ids, params={"cursor": "not-a-cursor"})
    await c.call("UpdateAccount", 422, at=ids, json={"incoming": {"port": 70000}})
    await c.call(
        "UpdateAccount",
        400,
        at=ids,
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    await c.call("CreateAccount", 415, content=b"name=x", headers={"Content-Type": "text/plain"})
    await c.call("DeleteAccount", 204, at=ids)
    await c.call("GetHealth", 200)

    # Every operation was seen answering (its success at least).
    assert {op for op, _ in c.seen} == set(OPERATIONS)


def test_a_limit_answers_retry_after_as_documented() -> None:
    """429 carries the `Retry-After` the document declares on every 429."""

    class _Request:
        scope: dict[str, Any] = {"state": {"request_id": "req-1"}}

    response = service_error_handler(
        _Request(),  # type: ignore[arg-type]
        errors.TooManyRequests("all slots in use", code=ErrorCode.TOO_MANY_RETRIEVALS),
    )
    assert response.status_code == 429
    assert response.headers["Retry-After"] == str(RETRY_AFTER_S)
    _, _, op = OPERATIONS["StartRetrieval"]
    header = _resolve(op["responses"]["429"]["headers"]["Retry-After"])
    assert header["required"] is True
    Draft202012Validator(header["schema"]).validate(int(response.headers["Retry-After"]))
