"""Forwarding a stored message retrieved from Dovecot, attached and inline, as the
receiving SMTP server gets it; the refusals; idempotency; 8-bit data and 8BITMIME."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
from email.message import EmailMessage
from typing import Any

from litestar.testing import AsyncTestClient

from tests.outbox.conftest import ClientFactory, send, stored_message, wait_status
from tests.retrieval.conftest import all_messages, retrieve
from tests.servers.dovecot import Dovecot, Mailbox
from tests.servers.postfix import POSTFIX_DOMAIN, Postfix
from tests.servers.smtp import SMTPDServer, SmtpSink
from tests.waiting import until

REPORT = b"%PDF-1.4 quarterly\n" + bytes(range(256))
ORIGINAL = (
    "From: Bob M\u00fcller <bob@example.org>\r\n"
    "To: Alice <alice@example.com>\r\n"
    "Cc: dave@example.org\r\n"
    "Subject: Quartalsbericht f\u00fcr M\u00e4rz\r\n"
    "Message-ID: <report.2@example.org>\r\n"
    "References: <report.1@example.org>\r\n"
    "Date: Thu, 01 Jan 2026 10:00:00 +0000\r\n"
    "MIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="b1"\r\n'
    "\r\n"
    "--b1\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Der Bericht f\u00fcr M\u00e4rz ist angeh\u00e4ngt.\r\n"
    "--b1\r\n"
    "Content-Type: application/pdf\r\n"
    "Content-Disposition: attachment; filename*=utf-8''Bericht%20M%C3%A4rz.pdf\r\n"
    "Content-Transfer-Encoding: base64\r\n"
    "\r\n"
    f"{base64.encodebytes(REPORT).decode().replace(chr(10), chr(13) + chr(10))}"
    "--b1--\r\n"
).encode()


def read(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def text_of(part: EmailMessage | None) -> str:
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


async def test_forward_attached_and_inline_as_the_recipient_reads_them(
    client: AsyncTestClient[Any], dovecot: Dovecot, smtpd: SMTPDServer
) -> None:
    account_id, message_id = await stored_message(client, dovecot, ORIGINAL, smtpd)
    stored_raw = (await client.get(f"/v1/accounts/{account_id}/messages/{message_id}/raw")).content
    attached = await send(
        client,
        account_id,
        to=["Carol <carol@example.org>"],
        subject=None,
        text="FYI, the report.\n",
        forward_message=message_id,
    )
    inline = await send(
        client,
        account_id,
        to=["carol@example.org"],
        subject=None,
        text=None,
        html="<p>See <b>below</b>.</p>",
        forward_message=message_id,
        forward_as="inline",
    )
    assert attached["subject"] == inline["subject"] == "Fwd: Quartalsbericht f\u00fcr M\u00e4rz"
    # References name the original: both forwards join its thread.
    thread = (await client.get(f"/v1/accounts/{account_id}/messages/{message_id}")).json()
    assert attached["thread_id"] == inline["thread_id"] == thread["thread_id"]
    for accepted in (attached, inline):
        done = await wait_status(client, account_id, accepted["id"])
        assert done["status"] == "sent", done
    first, second = smtpd.messages
    assert first.rcpt_tos == ("carol@example.org",)
    # 8-bit data in the attached original: announced to the server.
    assert "BODY=8BITMIME" in first.mail_options
    as_attachment = read(first.data)
    for message in (as_attachment, read(second.data)):
        assert message["Subject"] == "Fwd: Quartalsbericht f\u00fcr M\u00e4rz"
        assert message["References"] == "<report.1@example.org> <report.2@example.org>"
        assert message["In-Reply-To"] is None
    body, original = as_attachment.iter_parts()
    assert text_of(body) == "FYI, the report.\n"
    assert original.get_content_type() == "message/rfc822"
    assert original.get_filename() == "Quartalsbericht f\u00fcr M\u00e4rz.eml"
    boundary = as_attachment.get_boundary()
    assert boundary is not None
    part = first.data.split(b"\r\n--" + boundary.encode())[-2]
    assert part.split(b"\r\n\r\n", 1)[1] == stored_raw == ORIGINAL
    [pdf] = [
        p for p in original.get_content().walk() if p.get_filename() == "Bericht M\u00e4rz.pdf"
    ]
    assert pdf.get_content() == REPORT

    as_inline = read(second.data)
    html = text_of(as_inline.get_body(preferencelist=("html",)))
    assert html.startswith("<p>See <b>below</b>.</p>")
    assert "From: Bob M\u00fcller &lt;bob@example.org&gt;" in html
    plain = text_of(as_inline.get_body(preferencelist=("plain",)))
    assert plain.startswith("See below.\n\n---------- Forwarded message ---------\n")
    assert "Cc: dave@example.org\n" in plain
    assert plain.endswith("Der Bericht f\u00fcr M\u00e4rz ist angeh\u00e4ngt.\n")
    [report] = list(as_inline.iter_attachments())
    assert report.get_filename() == "Bericht M\u00e4rz.pdf"
    assert report.get_content() == REPORT
    assert "BODY=8BITMIME" not in second.mail_options  # re-encoded: 7-bit


async def test_forward_refusals(
    client_factory: ClientFactory, dovecot: Dovecot, smtpd: SMTPDServer
) -> None:
    client = await client_factory(max_send_bytes=len(ORIGINAL) + 4096)
    account_id, message_id = await stored_message(client, dovecot, ORIGINAL, smtpd)
    missing = await send(client, account_id, expect=404, forward_message="msg_nothing")
    assert missing["code"] == "not_found"
    both = await send(
        client, account_id, expect=422, forward_message=message_id, reply_to_message=message_id
    )
    assert both["code"] == "conflicting_fields"
    assert both["errors"][0]["field"] == "forward_message"
    nobody = await send(client, account_id, expect=422, to=[], forward_message=message_id)
    assert nobody["code"] == "no_recipients"
    alone = await send(client, account_id, expect=422, forward_as="inline")
    assert alone["code"] == "validation_error"
    unknown = await send(
        client, account_id, expect=422, forward_message=message_id, forward_as="quoted"
    )
    assert unknown["code"] == "validation_error"
    big = base64.b64encode(b"x" * 4096).decode()
    too_large = await send(
        client,
        account_id,
        expect=413,
        forward_message=message_id,
        attachments=[
            {"filename": "a.bin", "content_type": "application/octet-stream", "content_base64": big}
        ],
    )
    assert too_large["code"] == "message_too_large"
    # Within the limit, with no body of its own: accepted.
    fits = await send(client, account_id, text=None, subject=None, forward_message=message_id)
    assert fits["subject"].startswith("Fwd: ")


async def test_a_forward_with_an_idempotency_key_is_accepted_once(
    client: AsyncTestClient[Any], dovecot: Dovecot, smtpd: SMTPDServer
) -> None:
    account_id, message_id = await stored_message(client, dovecot, ORIGINAL, smtpd)
    key = {"Idempotency-Key": "forward-1"}
    first = await send(client, account_id, headers=key, forward_message=message_id)
    again = await send(client, account_id, expect=200, headers=key, forward_message=message_id)
    assert again["id"] == first["id"]
    other = await send(
        client, account_id, expect=409, headers=key, forward_message=message_id, forward_as="inline"
    )
    assert other["code"] == "idempotency_key_reused"


async def test_an_8bit_original_to_a_server_without_8bitmime_fails_clearly(
    client: AsyncTestClient[Any], dovecot: Dovecot, smtp_sink_factory: Any
) -> None:
    sink: SmtpSink = smtp_sink_factory(extra_args=["-8"])
    account_id, message_id = await stored_message(client, dovecot, ORIGINAL, sink)
    attached = await send(client, account_id, forward_message=message_id)
    done = await wait_status(client, account_id, attached["id"])
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "extension_not_supported"
    # Inline re-encodes everything as 7-bit: the same server takes it.
    inline = await send(client, account_id, forward_message=message_id, forward_as="inline")
    done = await wait_status(client, account_id, inline["id"])
    assert done["status"] == "sent", done


async def test_forwards_through_postfix_read_back_from_dovecot(
    client: AsyncTestClient[Any], dovecot: Dovecot, maildir: Mailbox, postfix_to_dovecot: Postfix
) -> None:
    """Received, forwarded both ways to an address of the same mailbox, retrieved again:
    what a recipient's client reads after a real MTA (8-bit data and all)."""
    account_id, message_id = await stored_message(
        client,
        dovecot,
        ORIGINAL,
        postfix_to_dovecot,
        mailbox=maildir,
        address=f"alice@{POSTFIX_DOMAIN}",
    )
    base = f"/v1/accounts/{account_id}"
    bob = f"bob@{POSTFIX_DOMAIN}"
    accepted = [
        await send(client, account_id, to=[bob], subject=None, forward_message=message_id),
        await send(
            client,
            account_id,
            to=[bob],
            subject="Inline",
            text="Below.",
            forward_message=message_id,
            forward_as="inline",
        ),
    ]
    for outgoing in accepted:
        done = await wait_status(client, account_id, outgoing["id"])
        assert done["status"] == "sent", (done, postfix_to_dovecot.log()[-2000:])
    await until(lambda: asyncio.to_thread(maildir.count), lambda n: n == 3, timeout=60)
    done = await retrieve(client, account_id)
    assert done["status"] == "succeeded", done
    by_subject = {m["subject"]: m for m in await all_messages(client, account_id)}
    attached_id = by_subject["Fwd: Quartalsbericht f\u00fcr M\u00e4rz"]["id"]
    raw = (await client.get(f"{base}/messages/{attached_id}/raw")).content
    message = read(raw)
    assert message["References"] == "<report.1@example.org> <report.2@example.org>"
    boundary = message.get_boundary()
    assert boundary is not None
    part = raw.split(b"\r\n--" + boundary.encode())[-2]
    assert part.split(b"\r\n\r\n", 1)[1] == ORIGINAL
    listed = (await client.get(f"{base}/messages/{attached_id}")).json()
    assert [a["filename"] for a in listed["attachments"]] == [
        "Quartalsbericht f\u00fcr M\u00e4rz.eml"
    ]
    inline_id = by_subject["Inline"]["id"]
    shown = (await client.get(f"{base}/messages/{inline_id}")).json()
    assert "---------- Forwarded message ---------" in shown["text"]["content"]
    assert "Der Bericht f\u00fcr M\u00e4rz ist angeh\u00e4ngt." in shown["text"]["content"]
    [report] = shown["attachments"]
    assert report["filename"] == "Bericht M\u00e4rz.pdf"
    content = await client.get(f"{base}/messages/{inline_id}/attachments/{report['index']}")
    assert content.content == REPORT
