"""SendRawMessage: a complete message, checked, fixed up where allowed, sent as is."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.outbox.conftest import create_account, get_message, wait_status
from tests.servers.smtp import SMTPDServer

RAW = (
    b"From: Alice Example <alice@example.com>\n"
    b"To: Bob <bob@example.org>, carol@example.org\n"
    b"Cc: dave@example.org\n"
    b"Bcc: Secret Eve <eve@example.org>,\n"
    b" zed@example.org\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n"
    b"X-Custom: kept as is\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"Content-Transfer-Encoding: 8bit\n"
    b"\n"
    b"Hallo Bob, sch\xc3\xb6ne Gr\xc3\xbc\xc3\x9fe.\n"
    b".leading dot\n"
)


def raw_url(account_id: str) -> str:
    return f"/v1/accounts/{account_id}/outbox/raw"


async def post_raw(
    client: AsyncTestClient[Any], account_id: str, data: bytes, expect: int = 202
) -> dict[str, Any]:
    response = await client.post(
        raw_url(account_id), content=data, headers={"Content-Type": "message/rfc822"}
    )
    assert response.status_code == expect, response.text
    return dict(response.json())


async def test_a_raw_message_is_sent_as_is_without_bcc_and_with_ids_added(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    accepted = await post_raw(client, account_id, RAW)
    assert accepted["status"] == "queued"
    assert accepted["subject"] == "Grüße"
    assert [(r["address"], r["kind"], r["name"]) for r in accepted["recipients"]] == [
        ("bob@example.org", "to", "Bob"),
        ("carol@example.org", "to", None),
        ("dave@example.org", "cc", None),
        ("eve@example.org", "bcc", None),  # named in the Bcc header, which is not sent
        ("zed@example.org", "bcc", None),
    ]
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent", done
    assert [r["name"] for r in done["recipients"]] == ["Bob", None, None, None, None]
    [received] = smtpd.messages
    assert received.mail_from == "alice@example.com"
    assert set(received.rcpt_tos) == {
        "bob@example.org",
        "carol@example.org",
        "dave@example.org",
        "eve@example.org",
        "zed@example.org",
    }
    expected_tail = RAW.replace(
        b"Bcc: Secret Eve <eve@example.org>,\n zed@example.org\n", b""
    ).replace(b"\n", b"\r\n")
    message_id = accepted["message_id"].encode()
    assert received.data.startswith(b"Date: ")
    _, _, rest = received.data.partition(b"\r\n")
    second, _, tail = rest.partition(b"\r\n")
    assert second == b"Message-ID: " + message_id
    assert tail == expected_tail
    assert b"eve@" not in received.data and b"Bcc" not in received.data
    raw = await client.get(f"/v1/accounts/{account_id}/outbox/{accepted['id']}/raw")
    assert raw.content == received.data


async def test_json_form_with_envelope_metadata_and_existing_ids(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    message = (
        b"Date: Thu, 01 Jan 2026 10:00:00 +0000\r\n"
        b"Message-ID: <given.1@example.com>\r\n"
        b"From: alice@example.com\r\n"
        b"To: list@example.org\r\n"
        b"Subject: Hi\r\n\r\nbody\r\n"
    )
    response = await client.post(
        raw_url(account_id),
        json={
            "raw_base64": base64.b64encode(message).decode(),
            "recipients": ["one@example.org", "two@example.org"],
            "metadata": {"ticket": "T-9"},
            "tags": ["raw"],
        },
        headers={"Idempotency-Key": "raw-1"},
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["message_id"] == "<given.1@example.com>"
    assert accepted["metadata"] == {"ticket": "T-9"} and accepted["tags"] == ["raw"]
    assert [(r["address"], r["kind"]) for r in accepted["recipients"]] == [
        ("one@example.org", "bcc"),
        ("two@example.org", "bcc"),
    ]
    again = await client.post(
        raw_url(account_id),
        json={
            "raw_base64": base64.b64encode(message).decode(),
            "recipients": ["one@example.org", "two@example.org"],
            "metadata": {"ticket": "T-9"},
            "tags": ["raw"],
        },
        headers={"Idempotency-Key": "raw-1"},
    )
    assert again.status_code == 200 and again.json()["id"] == accepted["id"]
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent", done
    [received] = smtpd.messages
    assert received.data == message
    assert received.rcpt_tos == ("one@example.org", "two@example.org")
    assert (await get_message(client, account_id, accepted["id"]))["tags"] == ["raw"]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"From: mallory@example.net\r\nTo: bob@example.org\r\n\r\nx\r\n", "from_not_allowed"),
        (b"To: bob@example.org\r\n\r\nx\r\n", "from_not_allowed"),
        (
            b"From: alice@example.com, bob@example.org\r\nTo: bob@example.org\r\n\r\nx\r\n",
            "from_not_allowed",
        ),
        (b"From: alice@example.com\r\nSubject: no one\r\n\r\nx\r\n", "no_recipients"),
        (
            b"From: alice@example.com\r\nTo: bob@example.org\r\nnot a header\r\n\r\nx\r\n",
            "header_injection",
        ),
        (
            b"From: alice@example.com\r\nTo: bob@example.org\r\nBad Name: x\r\n\r\nx\r\n",
            "invalid_header_name",
        ),
        (b" folded: first\r\nFrom: alice@example.com\r\n\r\nx\r\n", "header_injection"),
        (
            b"From: alice@example.com\r\nTo: bob@example.org\r\nTo: eve@example.org\r\n\r\nx\r\n",
            "duplicate_header",
        ),
        (
            b"From: alice@example.com\r\nTo: bob@example.org\r\nMessage-ID: nope\r\n\r\nx\r\n",
            "invalid_message_id",
        ),
        (b"From: alice@example.com\r\nTo: bob@[127.0.0.1]\r\n\r\nx\r\n", "invalid_address"),
        (b"From: alice@example.com\r\nTo: bob@example.org\r\n\r\nx\x00y\r\n", "invalid_body"),
        (
            b"From: alice@example.com\r\nTo: bob@example.org\r\n\r\n" + b"x" * 999 + b"\r\n",
            "too_long",
        ),
        (b"", "header_injection"),
    ],
)
async def test_bad_raw_messages_are_422_and_nothing_is_sent(
    client: AsyncTestClient[Any], smtpd: SMTPDServer, data: bytes, code: str
) -> None:
    account_id = await create_account(client, smtpd)
    problem = await post_raw(client, account_id, data, expect=422)
    assert problem["code"] == code, problem
    assert (await client.get(f"/v1/accounts/{account_id}/outbox")).json()["items"] == []


async def test_bad_raw_bodies(client: AsyncTestClient[Any], smtpd: SMTPDServer) -> None:
    account_id = await create_account(client, smtpd)
    text = await client.post(
        raw_url(account_id), content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert text.status_code == 415 and text.json()["code"] == "unsupported_media_type"
    bad64 = await client.post(raw_url(account_id), json={"raw_base64": "a b"})
    assert bad64.status_code == 422 and bad64.json()["code"] == "invalid_base64"
    shape = await client.post(raw_url(account_id), json={"raw": "x"})
    assert shape.status_code == 422 and shape.json()["code"] == "validation_error"
    broken = await client.post(
        raw_url(account_id), content=b"{", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["code"] == "malformed_json"
    big = await client.post(
        raw_url(account_id),
        json={"raw_base64": base64.b64encode(RAW).decode(), "send_at": "2026-01-01T00:00:00"},
    )
    assert big.status_code == 422 and big.json()["code"] == "invalid_send_at"
    assert smtpd.messages == []


async def test_octet_stream_is_the_same_as_rfc822(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    message = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    response = await client.post(
        raw_url(account_id), content=message, headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 202, response.text
    done = await wait_status(client, account_id, response.json()["id"])
    assert done["status"] == "sent", done
    [received] = smtpd.messages
    assert received.data.endswith(message)
