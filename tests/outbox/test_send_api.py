"""SendMessage and the outbox resources: validation, idempotency, reading, cancelling."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.api.conftest import OTHER_TENANT_KEY
from tests.outbox.conftest import (
    ClientFactory,
    create_account,
    get_message,
    in_app,
    send,
    send_body,
    wait_status,
)
from tests.servers.smtp import SMTPDServer, SmtpSink


def outbox_url(account_id: str, *rest: str) -> str:
    return "/".join([f"/v1/accounts/{account_id}/outbox", *rest])


async def test_accepted_message_is_queued_with_fixed_ids_then_sent(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    response = await client.post(outbox_url(account_id), json=send_body())
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert response.headers["location"] == outbox_url(account_id, accepted["id"])
    assert accepted["status"] == "queued"
    assert accepted["message_id"].startswith("<") and accepted["message_id"].endswith(
        "@example.com>"
    )
    assert accepted["recipients"] == [
        {
            "address": "bob@example.org",
            "name": None,
            "kind": "to",
            "status": "pending",
            "smtp_code": None,
            "smtp_message": None,
            "bounce": None,
        }
    ]
    assert accepted["attempts"] == [] and accepted["error"] is None
    assert accepted["bounces"] == []

    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent"
    assert done["message_id"] == accepted["message_id"]
    assert done["sent_at"] is not None and done["next_attempt_at"] is None
    [attempt] = done["attempts"]
    assert attempt["outcome"] == "sent" and attempt["smtp_code"] == 250
    assert attempt["smtp_message"] == "2.0.0 OK queued as test"
    assert done["recipients"][0]["status"] == "sent"

    [received] = smtpd.messages
    assert received.mail_from == "alice@example.com"
    assert received.rcpt_tos == ("bob@example.org",)
    assert f"Message-ID: {accepted['message_id']}\r\n".encode() in received.data
    assert b"From: Alice Example <alice@example.com>\r\n" in received.data


async def test_raw_is_the_exact_bytes_the_server_received(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    accepted = await send(client, account_id, html="<p>Hi</p>")
    await wait_status(client, account_id, accepted["id"])
    response = await client.get(outbox_url(account_id, accepted["id"], "raw"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("message/rfc822")
    assert response.headers["x-content-type-options"] == "nosniff"
    [received] = smtpd.messages
    assert received.data == response.content


async def test_bcc_is_delivered_but_never_in_a_header(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    accepted = await send(
        client,
        account_id,
        to=["bob@example.org"],
        cc=["carol@example.org"],
        bcc=["secret.dave@example.net"],
    )
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent"
    assert [(r["address"], r["kind"], r["status"]) for r in done["recipients"]] == [
        ("bob@example.org", "to", "sent"),
        ("carol@example.org", "cc", "sent"),
        ("secret.dave@example.net", "bcc", "sent"),
    ]
    [received] = smtpd.messages
    assert received.rcpt_tos == ("bob@example.org", "carol@example.org", "secret.dave@example.net")
    assert b"secret.dave" not in received.data
    assert b"bcc" not in received.data.lower()
    raw = (await client.get(outbox_url(account_id, accepted["id"], "raw"))).content
    assert b"secret.dave" not in raw


@pytest.mark.parametrize(
    ("overrides", "code", "field"),
    [
        ({"subject": "Hi\r\nBcc: victim@example.com"}, "header_injection", "subject"),
        ({"subject": "Hi\nX-Evil: 1"}, "header_injection", "subject"),
        ({"subject": "Hi\rX-Evil: 1"}, "header_injection", "subject"),
        ({"subject": "Hi\u2028X-Evil: 1"}, "header_injection", "subject"),
        ({"subject": "Hi\u0085X-Evil: 1"}, "header_injection", "subject"),
        ({"subject": "Hi\x00"}, "header_injection", "subject"),
        ({"headers": {"X-Tag": "a\r\nBcc: victim@example.com"}}, "header_injection", None),
        ({"headers": {"X-Tag\r\nBcc": "x"}}, "invalid_header_name", None),
        ({"headers": {"Bcc": "victim@example.com"}}, "protected_header", "headers.Bcc"),
        ({"headers": {"Content-Transfer-Encoding": "8bit"}}, "protected_header", None),
        ({"headers": {"MIME-Version": "1.0"}}, "protected_header", None),
        ({"headers": {"Received": "from evil"}}, "protected_header", None),
        ({"headers": {"x-tag": "1", "X-Tag": "2"}}, "duplicate_header", None),
        ({"to": ["Bob <bob@example.org> <eve@example.com>"]}, "invalid_address", "to[0]"),
        ({"to": ["bob@example.org, eve@example.com"]}, "invalid_address", "to[0]"),
        ({"to": ["bob@example.org\r\nRCPT TO:<eve@example.com>"]}, "invalid_address", "to[0]"),
        ({"to": ["(comment)bob@example.org"]}, "invalid_address", "to[0]"),
        ({"cc": ['"bob"@example.org']}, "invalid_address", "cc[0]"),
        ({"bcc": ["bob@[127.0.0.1]"]}, "invalid_address", "bcc[0]"),
        ({"reply_to": "bob@example.org\n"}, "invalid_address", "reply_to"),
        ({"to": [], "cc": [], "bcc": []}, "no_recipients", "to"),
        ({"text": None}, "no_body", "text"),
        (
            {
                "attachments": [
                    {
                        "filename": "a.txt",
                        "content_type": "text/plain",
                        "content_base64": "not base64!",
                    }
                ]
            },
            "invalid_base64",
            "attachments[0].content_base64",
        ),
        (
            {
                "attachments": [
                    {
                        "filename": "a\r\n.txt",
                        "content_type": "text/plain",
                        "content_base64": "aGk=",
                    }
                ]
            },
            "header_injection",
            "attachments[0].filename",
        ),
        (
            {
                "attachments": [
                    {
                        "filename": "a.eml",
                        "content_type": "message/rfc822",
                        "content_base64": "aGk=",
                    }
                ]
            },
            "invalid_attachment",
            "attachments[0].content_type",
        ),
    ],
)
async def test_invalid_requests_are_422_with_a_code_and_nothing_is_sent(
    client: AsyncTestClient[Any],
    smtpd: SMTPDServer,
    overrides: dict[str, Any],
    code: str,
    field: str | None,
) -> None:
    account_id = await create_account(client, smtpd)
    response = await client.post(outbox_url(account_id), json=send_body(**overrides))
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert problem["code"] == code, problem
    if field is not None:
        assert problem["errors"][0]["field"] == field
    listed = (await client.get(outbox_url(account_id))).json()
    assert listed["items"] == []
    assert smtpd.recorder.sessions == []


async def test_body_shape_errors_are_validation_errors(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    for body in (
        {**send_body(), "from": "ceo@example.com"},  # unknown fields are refused
        {**send_body(), "to": "bob@example.org"},  # a string is not a list
        {"to": ["bob@example.org"], "text": "no subject"},  # subject is required
    ):
        response = await client.post(outbox_url(account_id), json=body)
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "validation_error"


async def test_limits_are_settings_with_their_own_codes(
    client_factory: ClientFactory, smtpd: SMTPDServer
) -> None:
    client = await client_factory(max_recipients=3, max_attachment_bytes=100, max_send_bytes=2_000)
    account_id = await create_account(client, smtpd)
    many = [f"r{i}@example.org" for i in range(4)]
    response = await client.post(outbox_url(account_id), json=send_body(to=many[:2], bcc=many[2:]))
    assert response.status_code == 422
    assert response.json()["code"] == "too_many_recipients"

    big = base64.b64encode(b"x" * 101).decode()
    attachment = {"filename": "big.bin", "content_type": "application/octet-stream"}
    response = await client.post(
        outbox_url(account_id),
        json=send_body(attachments=[{**attachment, "content_base64": big}]),
    )
    assert response.status_code == 413
    assert response.json()["code"] == "attachment_too_large"

    # Each attachment is under its limit, the composed message is not.
    small = base64.b64encode(b"y" * 100).decode()
    response = await client.post(
        outbox_url(account_id),
        json=send_body(attachments=[{**attachment, "content_base64": small}] * 12),
    )
    assert response.status_code == 413
    assert response.json()["code"] == "message_too_large"

    response = await client.post(outbox_url(account_id), json=send_body(text="z" * 1_900))
    assert response.status_code == 413
    assert response.json()["code"] == "message_too_large"

    ok = await send(client, account_id, to=many[:3])
    assert ok["status"] == "queued"
    assert smtpd.recorder.messages == [] or len(smtpd.recorder.messages) <= 1


async def test_attachments_and_non_ascii_are_encoded(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    accepted = await send(
        client,
        account_id,
        subject="Grüße aus Köln",
        text="Größe: 1 €",
        html="<p>Größe</p>",
        attachments=[
            {
                "filename": "résumé.pdf",
                "content_type": "application/pdf",
                "content_base64": base64.b64encode(b"%PDF-1.4\x00\xff").decode(),
            }
        ],
    )
    await wait_status(client, account_id, accepted["id"])
    [received] = smtpd.messages
    assert received.data.isascii()
    assert b"Subject: =?utf-8?" in received.data
    assert b"multipart/mixed" in received.data and b"multipart/alternative" in received.data


async def test_idempotency_key_replays_and_refuses_another_body(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    headers = {"Idempotency-Key": "order-42 confirmation"}
    first = await client.post(outbox_url(account_id), json=send_body(), headers=headers)
    assert first.status_code == 202
    assert "idempotency-replayed" not in first.headers
    original = first.json()
    await wait_status(client, account_id, original["id"])

    again = await client.post(outbox_url(account_id), json=send_body(), headers=headers)
    assert again.status_code == 200
    assert again.headers["idempotency-replayed"] == "true"
    replay = again.json()
    assert replay["id"] == original["id"]
    assert replay["message_id"] == original["message_id"]
    assert replay["status"] == "sent"

    other = await client.post(
        outbox_url(account_id), json=send_body(subject="Another"), headers=headers
    )
    assert other.status_code == 409
    assert other.json()["code"] == "idempotency_key_reused"
    assert other.json()["resource_id"] == original["id"]

    # Keys belong to one account: another account may use the same one.
    second_account = await create_account(client, smtpd)
    elsewhere = await client.post(outbox_url(second_account), json=send_body(), headers=headers)
    assert elsewhere.status_code == 202
    await wait_status(client, second_account, elsewhere.json()["id"])

    # Sent once per account, never twice.
    assert len(smtpd.messages) == 2
    listed = (await client.get(outbox_url(account_id))).json()["items"]
    assert [m["id"] for m in listed] == [original["id"]]


async def test_concurrent_requests_with_one_key_make_one_message(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    headers = {"Idempotency-Key": "retry-storm"}
    responses = await asyncio.gather(
        *(client.post(outbox_url(account_id), json=send_body(), headers=headers) for _ in range(10))
    )
    assert sorted(r.status_code for r in responses) == [200] * 9 + [202]
    assert len({r.json()["id"] for r in responses}) == 1
    await wait_status(client, account_id, responses[0].json()["id"])
    listed = (await client.get(outbox_url(account_id))).json()["items"]
    assert len(listed) == 1


@pytest.mark.parametrize("key", [b"", b"x" * 201, b"tab\there", "é".encode()])
async def test_bad_idempotency_keys_are_422(
    client: AsyncTestClient[Any], smtpd: SMTPDServer, key: bytes
) -> None:
    account_id = await create_account(client, smtpd)
    response = await client.post(
        outbox_url(account_id), json=send_body(), headers={"Idempotency-Key": key}
    )
    assert response.status_code == 422, response.text


async def test_other_tenants_and_unknown_ids_are_404(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    accepted = await send(client, account_id)
    other = {"Authorization": f"Bearer {OTHER_TENANT_KEY}"}
    for method, url in (
        ("POST", outbox_url(account_id)),
        ("GET", outbox_url(account_id)),
        ("GET", outbox_url(account_id, accepted["id"])),
        ("GET", outbox_url(account_id, accepted["id"], "raw")),
        ("DELETE", outbox_url(account_id, accepted["id"])),
    ):
        response = await client.request(
            method, url, headers=other, json=send_body() if method == "POST" else None
        )
        assert response.status_code == 404, (method, url, response.text)
        assert response.json()["code"] == "not_found"
    second = await create_account(client, smtpd)
    for url in (outbox_url(second, accepted["id"]), outbox_url(account_id, "out_nope")):
        assert (await client.get(url)).status_code == 404
    assert (await client.post(outbox_url("acc_nope"), json=send_body())).status_code == 404


async def test_list_filters_by_status_and_pages_newest_first(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    ids = [(await send(client, account_id, subject=f"n{i}"))["id"] for i in range(5)]
    for outgoing_id in ids:
        await wait_status(client, account_id, outgoing_id)
    first = (await client.get(outbox_url(account_id), params={"limit": 2})).json()
    assert [m["id"] for m in first["items"]] == ids[::-1][:2]
    rest = (
        await client.get(
            outbox_url(account_id), params={"limit": 10, "cursor": first["next_cursor"]}
        )
    ).json()
    assert [m["id"] for m in rest["items"]] == ids[::-1][2:]
    assert rest["next_cursor"] is None
    sent = (await client.get(outbox_url(account_id), params={"status": "sent"})).json()
    assert len(sent["items"]) == 5
    assert all(m["attempts"] and m["recipients"] for m in sent["items"])
    queued = (await client.get(outbox_url(account_id), params={"status": "queued"})).json()
    assert queued["items"] == []
    bad = await client.get(outbox_url(account_id), params={"status": "lost"})
    assert bad.status_code == 422


async def test_cancel_while_deferred_then_409_once_sent(
    client_factory: ClientFactory, smtp_sink_factory: Any, smtpd: SMTPDServer
) -> None:
    # A long first delay keeps the message deferred while the test cancels it.
    client = await client_factory(retry_delays_s=(60.0,))
    sink: SmtpSink = smtp_sink_factory(soft_reject=["RCPT"])
    deferring = await create_account(client, sink)
    accepted = await send(client, deferring)
    deferred = await wait_status(client, deferring, accepted["id"], ["deferred"], attempts=1)
    assert deferred["recipients"][0]["status"] == "deferred"
    assert 400 <= deferred["recipients"][0]["smtp_code"] < 500

    response = await client.delete(outbox_url(deferring, accepted["id"]))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert response.json()["next_attempt_at"] is None
    again = await client.delete(outbox_url(deferring, accepted["id"]))
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert (await get_message(client, deferring, accepted["id"]))["status"] == "cancelled"

    healthy = await create_account(client, smtpd)
    sent = await send(client, healthy)
    await wait_status(client, healthy, sent["id"])
    refused = await client.delete(outbox_url(healthy, sent["id"]))
    assert refused.status_code == 409
    assert refused.json()["code"] == "not_cancellable"
    assert (await get_message(client, healthy, sent["id"]))["status"] == "sent"


async def test_a_cancelled_message_is_never_sent(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    delivery = client.app.state.delivery
    account_id = await create_account(client, smtpd)
    await in_app(client, delivery.stop)  # nothing is delivered while the test cancels
    accepted = await send(client, account_id)
    response = await client.delete(outbox_url(account_id, accepted["id"]))
    assert response.status_code == 200
    kept = await send(client, account_id)
    await in_app(client, delivery.start)
    await wait_status(client, account_id, kept["id"])
    await in_app(client, delivery.wait_idle)
    assert [m.data for m in smtpd.messages if accepted["message_id"].encode() in m.data] == []
    assert len(smtpd.messages) == 1
