"""Replying to a stored message: threading headers, subject and recipients from it."""

from __future__ import annotations

import email
import email.policy
from typing import Any

from litestar.testing import AsyncTestClient

from tests.outbox.conftest import send, stored_message, wait_status
from tests.servers.dovecot import Dovecot
from tests.servers.smtp import SMTPDServer

ORIGINAL = (
    b"From: Bob Mueller <bob@example.org>\r\n"
    b"Reply-To: Bob Desk <desk@example.org>\r\n"
    b"To: Alice <alice@example.com>, Carol <carol@example.org>\r\n"
    b"Cc: dave@example.org, alice@example.com\r\n"
    b"Subject: Order 1042\r\n"
    b"Message-ID: <orig.3@example.org>\r\n"
    b"In-Reply-To: <orig.2@example.org>\r\n"
    b"References: <orig.1@example.org> <orig.2@example.org>\r\n"
    b"Date: Thu, 01 Jan 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"Where is my order?\r\n"
)


async def test_reply_and_reply_all_thread_and_address_as_a_mail_client(
    client: AsyncTestClient[Any], dovecot: Dovecot, smtpd: SMTPDServer
) -> None:
    account_id, message_id = await stored_message(client, dovecot, ORIGINAL, smtpd)
    reply = await send(client, account_id, to=[], subject=None, reply_to_message=message_id)
    assert reply["subject"] == "Re: Order 1042"
    assert [r["address"] for r in reply["recipients"]] == ["desk@example.org"]
    everyone = await send(
        client,
        account_id,
        to=[],
        subject=None,
        text="All of you\n",
        reply_to_message=message_id,
        reply_all=True,
    )
    assert [(r["address"], r["kind"]) for r in everyone["recipients"]] == [
        ("desk@example.org", "to"),
        ("carol@example.org", "cc"),
        ("dave@example.org", "cc"),
    ]
    own_subject = await send(
        client, account_id, to=["zed@example.org"], subject="Other", reply_to_message=message_id
    )
    assert [r["address"] for r in own_subject["recipients"]] == ["zed@example.org"]
    for accepted in (reply, everyone, own_subject):
        done = await wait_status(client, account_id, accepted["id"])
        assert done["status"] == "sent", done
    first, second, third = (
        email.message_from_bytes(m.data, policy=email.policy.default) for m in smtpd.messages
    )
    for message in (first, second, third):
        assert message["In-Reply-To"] == "<orig.3@example.org>"
        assert message["References"] == (
            "<orig.1@example.org> <orig.2@example.org> <orig.3@example.org>"
        )
    assert first["Subject"] == "Re: Order 1042"
    assert [(a.display_name, a.addr_spec) for a in first["To"].addresses] == [
        ("Bob Desk", "desk@example.org")
    ]
    assert [a.addr_spec for a in second["Cc"].addresses] == [
        "carol@example.org",
        "dave@example.org",
    ]
    assert third["Subject"] == "Other"


async def test_reply_errors(
    client: AsyncTestClient[Any], dovecot: Dovecot, smtpd: SMTPDServer
) -> None:
    account_id, _ = await stored_message(client, dovecot, ORIGINAL, smtpd)
    listed = await client.get(
        f"/v1/accounts/{account_id}/messages", params={"message_id": "<orig.3@example.org>"}
    )
    assert [m["message_id"] for m in listed.json()["items"]] == ["<orig.3@example.org>"]
    other = await client.get(
        f"/v1/accounts/{account_id}/messages", params={"message_id": "<orig.2@example.org>"}
    )
    assert other.json()["items"] == []
    missing = await send(
        client, account_id, expect=404, to=[], subject=None, reply_to_message="msg_nothing"
    )
    assert missing["code"] == "not_found"
    no_subject = await send(client, account_id, expect=422, subject=None)
    assert no_subject["code"] == "validation_error"
    alone = await send(client, account_id, expect=422, reply_all=True)
    assert alone["code"] == "validation_error"
