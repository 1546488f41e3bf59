"""What recipients see: sent through a real Postfix into a Dovecot Maildir, read back
over POP3 (RETR) by a retrieval, then parsed as a mail client would."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
from email.message import EmailMessage
from typing import Any

from litestar.testing import AsyncTestClient

from tests.retrieval.conftest import all_messages, retrieve
from tests.servers.dovecot import Dovecot, Mailbox
from tests.servers.postfix import (
    POSTFIX_DOMAIN,
    Postfix,
)
from tests.waiting import until

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


async def test_named_recipients_and_inline_images_as_the_recipient_reads_them(
    client: AsyncTestClient[Any],
    dovecot: Dovecot,
    maildir: Mailbox,
    postfix_to_dovecot: Postfix,
) -> None:
    sender = f"shop@{POSTFIX_DOMAIN}"
    created = await client.post(
        "/v1/accounts",
        json={
            "name": "Shop",
            "email": sender,
            "display_name": "Müller's Shop",
            "incoming": {
                "host": dovecot.host,
                "port": dovecot.pop3_port,
                "security": "none",
                "username": maildir.user,
                "password": maildir.password,
            },
            "outgoing": {
                "host": postfix_to_dovecot.host,
                "port": postfix_to_dovecot.port,
                "security": "none",
            },
        },
    )
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    base = f"/v1/accounts/{account_id}"
    bob = f"bob@{POSTFIX_DOMAIN}"
    html = '<p>Your receipt</p><img src="cid:logo@shop.example">'
    accepted = await client.post(
        f"{base}/outbox",
        json={
            "to": [f"Bob Müller <{bob}>"],
            "subject": "Your receipt",
            "text": "Your receipt\n",
            "html": html,
            "attachments": [
                {
                    "filename": "logo.png",
                    "content_type": "image/png",
                    "content_base64": base64.b64encode(PNG).decode(),
                    "content_id": "logo@shop.example",
                },
                {
                    "filename": "receipt.txt",
                    "content_type": "text/plain",
                    "content_base64": base64.b64encode(b"total: 12 EUR\n").decode(),
                },
            ],
            "tags": ["receipt"],
        },
    )
    assert accepted.status_code == 202, accepted.text
    outgoing_id = accepted.json()["id"]
    sent = await until(
        lambda: client.get(f"{base}/outbox/{outgoing_id}"),
        lambda r: r.json()["status"] in ("sent", "failed"),
    )
    assert sent.json()["status"] == "sent", (sent.json(), postfix_to_dovecot.log()[-2000:])
    await until(lambda: asyncio.to_thread(maildir.count), lambda n: n == 1, timeout=60)

    done = await retrieve(client, account_id)
    assert done["status"] == "succeeded", done
    [stored] = await all_messages(client, account_id)
    raw = (await client.get(f"{base}/messages/{stored['id']}/raw")).content
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    [to] = message["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Bob Müller", bob)
    assert message["From"].addresses[0].display_name == "Müller's Shop"
    # mixed [ alternative [ text, related [ html, image ] ], attachment ]
    assert message.get_content_type() == "multipart/mixed"
    alternative, attached = message.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    plain, related = alternative.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    html_part, image = related.iter_parts()
    assert html_part.get_content().replace("\r\n", "\n") == html + "\n"
    assert image.get_content_type() == "image/png"
    assert image["Content-ID"] == "<logo@shop.example>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == PNG
    assert attached.get_filename() == "receipt.txt"
    assert attached.get_content_disposition() == "attachment"
    assert attached.get_content().replace("\r\n", "\n") == "total: 12 EUR\n"
