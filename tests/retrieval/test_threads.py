"""Threads end to end: a conversation retrieved from Dovecot out of order, answered
through the API to aiosmtpd, and listed with ``?thread_id=``, received and sent in order."""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.api.conftest import API_KEY
from tests.outbox.conftest import in_app, outbox_settings, send, wait_status
from tests.retrieval.conftest import account_json, all_messages, retrieve
from tests.servers.dovecot import Dovecot, Mailbox
from tests.servers.smtp import SMTPDServer, SMTPTLSFiles

ACCOUNT_EMAIL = "alice@example.com"


@pytest.fixture
async def client(
    tmp_path: Path, smtp_tls_files: SMTPTLSFiles, dovecot: Dovecot
) -> AsyncIterator[AsyncTestClient[Any]]:
    from service.app import create_app

    settings = outbox_settings(tmp_path, smtp_tls_files, ca_file=dovecot.ca_file)
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield test_client
        # Delivery stops in the app's loop before shutdown (the SMTP server is in this one).
        await in_app(test_client, test_client.app.state.delivery.stop)


def mail(
    message_id: str, sender: str, subject: str, minute: int, *threading: str, body: str = "Hi"
) -> bytes:
    lines = [
        f"From: {sender}",
        f"To: Alice <{ACCOUNT_EMAIL}>",
        f"Subject: {subject}",
        f"Date: Thu, 01 Jan 2026 10:{minute:02d}:00 +0000",
        f"Message-ID: {message_id}",
        *threading,
    ]
    return ("\r\n".join(lines) + f"\r\n\r\n{body}\r\n").encode()


ROOT = "<order-7.root@shop.example>"
SECOND = "<order-7.second@example.org>"
THIRD = "<order-7.third@example.org>"
FOURTH = "<order-7.fourth@example.org>"
OTHER = "<newsletter.1@example.net>"
MESSAGES = {
    ROOT: mail(ROOT, "Bob <bob@example.org>", "Order 7", 0),
    SECOND: mail(
        SECOND,
        "Carol <carol@example.org>",
        "Re: Order 7",
        5,
        f"In-Reply-To: {ROOT}",
        f"References: {ROOT}",
    ),
    THIRD: mail(
        THIRD,
        "Bob <bob@example.org>",
        "Re: Order 7",
        10,
        f"In-Reply-To: {SECOND}",
        # Folded, as long chains are.
        f"References: {ROOT}\r\n {SECOND}",
    ),
    # A client that sets only In-Reply-To.
    FOURTH: mail(FOURTH, "Dave <dave@example.org>", "Re: Order 7", 15, f"In-Reply-To: {THIRD}"),
    OTHER: mail(OTHER, "News <news@example.net>", "Offers", 20),
}


async def create_account(
    client: AsyncTestClient[Any], dovecot: Dovecot, mailbox: Mailbox, smtpd: SMTPDServer
) -> str:
    body = account_json(dovecot, mailbox, security="none") | {
        "email": ACCOUNT_EMAIL,
        "outgoing": {"host": smtpd.host, "port": smtpd.port, "security": "none"},
    }
    created = await client.post("/v1/accounts", json=body)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def deliver_and_retrieve(
    client: AsyncTestClient[Any], account_id: str, mailbox: Mailbox, *message_ids: str
) -> dict[str, dict[str, Any]]:
    """Deliver these messages, retrieve, and return every stored one by Message-ID."""
    mailbox.deliver_many(MESSAGES[m] for m in message_ids)
    done = await retrieve(client, account_id)
    assert done["status"] == "succeeded", done
    assert done["messages_downloaded"] == len(message_ids)
    return {m["message_id"]: m for m in await all_messages(client, account_id)}


async def thread_pages(
    client: AsyncTestClient[Any], account_id: str, thread_id: str, limit: int
) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"thread_id": thread_id, "limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        response = await client.get(f"/v1/accounts/{account_id}/messages", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages


async def test_a_conversation_retrieved_out_of_order_and_answered_is_one_thread(
    client: AsyncTestClient[Any], dovecot: Dovecot, smtpd: SMTPDServer
) -> None:
    mailbox = dovecot.add_user()
    account_id = await create_account(client, dovecot, mailbox, smtpd)

    # First the answers arrive: the second (its root not here yet), the fourth (which
    # names only the third, not here yet) and an unrelated message.
    stored = await deliver_and_retrieve(client, account_id, mailbox, FOURTH, SECOND, OTHER)
    assert stored[SECOND]["references"] == [ROOT]
    assert (stored[FOURTH]["in_reply_to"], stored[FOURTH]["references"]) == (THIRD, [])
    assert stored[FOURTH]["thread_id"] != stored[SECOND]["thread_id"]  # waits for the third

    # Then the root and the third: everything of the conversation is one thread.
    stored = await deliver_and_retrieve(client, account_id, mailbox, THIRD, ROOT)
    thread_id = stored[ROOT]["thread_id"]
    assert stored[THIRD]["references"] == [ROOT, SECOND]
    assert {stored[m]["thread_id"] for m in (ROOT, SECOND, THIRD, FOURTH)} == {thread_id}
    assert stored[OTHER]["thread_id"] != thread_id
    assert all(m["direction"] == "received" for m in stored.values())
    detail = await client.get(f"/v1/accounts/{account_id}/messages/{stored[THIRD]['id']}")
    assert detail.json()["thread_id"] == thread_id
    assert detail.json()["in_reply_to"] == SECOND

    # Answer the fourth through the API; an unrelated send stays out of the thread.
    reply = await send(
        client,
        account_id,
        to=[],
        subject=None,
        text="On its way.\n",
        reply_to_message=stored[FOURTH]["id"],
    )
    assert reply["thread_id"] == thread_id
    unrelated = await send(client, account_id, to=["zed@example.org"], subject="Lunch?")
    assert unrelated["thread_id"] != thread_id
    # A raw send naming only its parent joins the parent's thread as well.
    raw = await client.post(
        f"/v1/accounts/{account_id}/outbox/raw",
        content=(
            f"From: {ACCOUNT_EMAIL}\r\nTo: carol@example.org\r\nSubject: Re: Order 7\r\n"
            f"In-Reply-To: {SECOND}\r\n\r\nNoted.\r\n"
        ).encode(),
        headers={"Content-Type": "message/rfc822"},
    )
    assert raw.status_code == 202, raw.text
    assert raw.json()["thread_id"] == thread_id
    for accepted in (reply, unrelated, raw.json()):
        done = await wait_status(client, account_id, accepted["id"])
        assert done["status"] == "sent", done
        assert done["thread_id"] == accepted["thread_id"]
    [sent] = [
        email.message_from_bytes(m.data, policy=email.policy.default)
        for m in smtpd.messages
        if b"On its way." in m.data
    ]
    assert sent["In-Reply-To"] == FOURTH
    assert sent["References"].split() == [THIRD, FOURTH]

    # The thread, oldest first (by Date; the reply was sent last), page by page.
    expected = [
        ("received", ROOT),
        ("received", SECOND),
        ("received", THIRD),
        ("received", FOURTH),
        ("sent", reply["message_id"]),
        ("sent", raw.json()["message_id"]),
    ]
    for limit in (2, 3, 500):
        pages = await thread_pages(client, account_id, thread_id, limit)
        assert all(len(page) <= limit for page in pages)
        items = [m for page in pages for m in page]
        assert [(m["direction"], m["message_id"]) for m in items] == expected
        assert {m["thread_id"] for m in items} == {thread_id}
    copy = items[-2]
    assert copy["id"] == reply["id"]
    assert copy["uidl"] is None
    assert copy["subject"] == "Re: Order 7"
    assert copy["to"] == ["Dave <dave@example.org>"]
    assert (copy["in_reply_to"], copy["references"]) == (FOURTH, [THIRD, FOURTH])


async def test_thread_filter_validation(
    client: AsyncTestClient[Any], dovecot: Dovecot, smtpd: SMTPDServer
) -> None:
    mailbox = dovecot.add_user()
    account_id = await create_account(client, dovecot, mailbox, smtpd)
    stored = await deliver_and_retrieve(client, account_id, mailbox, ROOT)
    thread_id = stored[ROOT]["thread_id"]
    url = f"/v1/accounts/{account_id}/messages"
    for bad in (
        "thr_",
        "thr_XYZ",
        "msg_01abc",
        thread_id + "0",
        thread_id.upper(),
        thread_id + "\n",
    ):
        response = await client.get(url, params={"thread_id": bad})
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["code"] == "validation_error"
    # Other filters apply within the thread.
    combined = await client.get(url, params={"thread_id": thread_id, "from": "BOB@"})
    assert [m["message_id"] for m in combined.json()["items"]] == [ROOT]
    nothing = await client.get(url, params={"thread_id": thread_id, "subject": "Offers"})
    assert nothing.status_code == 200 and nothing.json()["items"] == []
    # A cursor of the documented form that this list never issued: a page, no error.
    junk = await client.get(url, params={"thread_id": thread_id, "cursor": "c1.zzz"})
    assert junk.status_code == 200, junk.text
    unknown = await client.get(url, params={"thread_id": "thr_" + "0" * 24})
    assert unknown.status_code == 200 and unknown.json()["items"] == []
    other_tenant = await client.get(
        url, params={"thread_id": thread_id}, headers={"Authorization": "Bearer other"}
    )
    assert other_tenant.status_code in (401, 404)
