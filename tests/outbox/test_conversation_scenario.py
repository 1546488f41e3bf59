"""A whole conversation as mail clients see it (issue 15's scenario).

A real Postfix routes mail for its domain into separate Dovecot Maildirs: the shop's
(the Mailroom account), Bob's, Carol's and Dave's. Bob writes to the shop with Carol in
copy, through Postfix's SMTP port as another server would; Mailroom retrieves it, sends
through Postfix's submission port (TLS, the shop's login checked by Dovecot), replies,
receives Bob's answer, replies to all, and forwards the first message with its attachment
both ways. Each recipient reads their mail with a real POP3 client (RETR from Dovecot), and
the shop's thread lists the six messages, received and sent, in order.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import poplib
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.outbox.conftest import ClientFactory, wait_status
from tests.retrieval.conftest import retrieve
from tests.servers.dovecot import Dovecot, Mailbox
from tests.servers.postfix import POSTFIX_DOMAIN, Postfix, bouncing_postfix_for_test
from tests.waiting import until

PDF = b"%PDF-1.4\n% an invoice\n" + bytes(range(256)) * 8
SHOP = f"shop@{POSTFIX_DOMAIN}"
BOB = f"bob@{POSTFIX_DOMAIN}"
CAROL = f"carol@{POSTFIX_DOMAIN}"
DAVE = f"dave@{POSTFIX_DOMAIN}"


@pytest.fixture
def people(dovecot: Dovecot) -> dict[str, Mailbox]:
    return {name: dovecot.add_user() for name in ("shop", "bob", "carol", "dave")}


@pytest.fixture
def postfix_routes(dovecot: Dovecot, people: dict[str, Mailbox]) -> Iterator[Postfix]:
    """Postfix delivering bob@, carol@ and dave@ into their Maildirs, the rest to the shop,
    with a submission port (implicit TLS, SASL logins checked by the Dovecot)."""
    routes = {name: people[name].user for name in ("bob", "carol", "dave")}
    with bouncing_postfix_for_test(
        dovecot.directory / "mail",
        people["shop"].user,
        routes,
        submission=(dovecot.auth_socket, dovecot.ca),
    ) as server:
        yield server


@pytest.fixture
async def client(client_factory: ClientFactory, dovecot: Dovecot) -> AsyncTestClient[Any]:
    """The service trusting the CA of the Dovecot (and so of Postfix's submission port)."""
    return await client_factory(ca_file=dovecot.ca_file)


def submit(postfix: Postfix, message: EmailMessage) -> None:
    """Send as a mail client does: SMTP to Postfix, envelope from the headers."""
    with smtplib.SMTP(postfix.host, postfix.port, timeout=30) as smtp:
        smtp.send_message(message)


def read_mail(dovecot: Dovecot, mailbox: Mailbox) -> list[bytes]:
    """Every message in ``mailbox``, read with a POP3 client (RETR), oldest first."""
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=30)
    try:
        pop.user(mailbox.user)
        pop.pass_(mailbox.password)
        count, _ = pop.stat()
        found = []
        for number in range(1, count + 1):
            _, lines, _ = pop.retr(number)
            found.append(b"\r\n".join(lines) + b"\r\n")
        return found
    finally:
        pop.quit()


async def inbox(dovecot: Dovecot, mailbox: Mailbox, count: int) -> list[bytes]:
    """``mailbox``'s messages (raw) once it holds ``count`` of them."""
    await until(lambda: asyncio.to_thread(mailbox.count), lambda n: n >= count, timeout=60)
    return await asyncio.to_thread(read_mail, dovecot, mailbox)


def parsed(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def names(message: EmailMessage, header: str) -> list[tuple[str, str]]:
    return [(a.display_name, a.addr_spec) for a in message[header].addresses]


def ids(value: object) -> list[str]:
    return str(value or "").split()


async def test_receive_reply_reply_all_and_forward_a_thread(
    client: AsyncTestClient[Any],
    dovecot: Dovecot,
    people: dict[str, Mailbox],
    postfix_routes: Postfix,
) -> None:
    created = await client.post(
        "/v1/accounts",
        json={
            "name": "Shop",
            "email": SHOP,
            "display_name": "Müller's Shop",
            "incoming": {
                "host": dovecot.host,
                "port": dovecot.pop3_port,
                "security": "none",
                "username": people["shop"].user,
                "password": people["shop"].password,
            },
            # Sending as a mail client does: the submission port, TLS, the shop's login.
            "outgoing": {
                "host": postfix_routes.host,
                "port": postfix_routes.submission_port,
                "security": "tls",
                "username": people["shop"].user,
                "password": people["shop"].password,
            },
        },
    )
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    base = f"/v1/accounts/{account_id}"

    async def send(body: dict[str, Any]) -> dict[str, Any]:
        accepted = await client.post(f"{base}/outbox", json=body)
        assert accepted.status_code == 202, accepted.text
        done = await wait_status(client, account_id, accepted.json()["id"])
        assert done["status"] == "sent", (done, postfix_routes.log()[-2000:])
        await asyncio.sleep(1.1)  # Date headers have whole seconds: keep them apart
        return done

    async def receive(count: int) -> list[dict[str, Any]]:
        await until(
            lambda: asyncio.to_thread(people["shop"].count), lambda n: n >= count, timeout=60
        )
        done = await retrieve(client, account_id)
        assert done["status"] == "succeeded", done
        listed = await client.get(f"{base}/messages", params={"limit": 100})
        assert listed.status_code == 200, listed.text
        return list(listed.json()["items"])

    # 1. Bob writes to the shop, Carol in copy, with an invoice attached.
    question = EmailMessage()
    question["From"] = f"Bob Müller <{BOB}>"
    question["To"] = f"Shop <{SHOP}>"
    question["Cc"] = f"Carol Ng <{CAROL}>"
    question["Subject"] = "Order 1042"
    question["Date"] = format_datetime(email.utils.localtime())
    question["Message-ID"] = first_id = make_msgid(domain=POSTFIX_DOMAIN)
    question.set_content("Where is my order?\n")
    question.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice.pdf")
    await asyncio.to_thread(submit, postfix_routes, question)
    [received] = await receive(1)
    assert received["message_id"] == first_id
    assert (received["in_reply_to"], received["references"]) == (None, [])
    thread_id = received["thread_id"]
    await asyncio.sleep(1.1)

    # 2. The shop replies: Bob's client sees a threaded answer from the shop's name.
    reply = await send({"reply_to_message": received["id"], "text": "Shipped tomorrow.\n"})
    assert reply["thread_id"] == thread_id
    [bobs_reply] = map(parsed, await inbox(dovecot, people["bob"], 1))
    assert bobs_reply["Subject"] == "Re: Order 1042"
    assert bobs_reply["In-Reply-To"] == first_id
    assert ids(bobs_reply["References"]) == [first_id]
    assert names(bobs_reply, "From") == [("Müller's Shop", SHOP)]
    assert names(bobs_reply, "To") == [("Bob Müller", BOB)]
    assert bobs_reply["Cc"] is None
    assert bobs_reply["Message-ID"] == reply["message_id"]

    # 3. Bob answers the reply, Carol in copy again; his client keeps the References chain.
    answer = EmailMessage()
    answer["From"] = f"Bob Müller <{BOB}>"
    answer["To"] = f"Shop <{SHOP}>"
    answer["Cc"] = f"Carol Ng <{CAROL}>"
    answer["Subject"] = "Re: Order 1042"
    answer["Date"] = format_datetime(email.utils.localtime())
    answer["Message-ID"] = answer_id = make_msgid(domain=POSTFIX_DOMAIN)
    answer["In-Reply-To"] = reply["message_id"]
    answer["References"] = f"{first_id} {reply['message_id']}"
    answer.set_content("Thanks! Can you send it to Carol's office?\n")
    await asyncio.to_thread(submit, postfix_routes, answer)
    stored = await receive(2)
    [second] = [m for m in stored if m["message_id"] == answer_id]
    assert second["in_reply_to"] == reply["message_id"]
    assert second["references"] == [first_id, reply["message_id"]]
    assert second["thread_id"] == thread_id
    await asyncio.sleep(1.1)

    # 4. Reply to all: Bob in To, Carol in Cc, the shop itself left out.
    reply_all = await send(
        {"reply_to_message": second["id"], "reply_all": True, "text": "Will do.\n"}
    )
    carols = [parsed(raw) for raw in await inbox(dovecot, people["carol"], 3)]
    got = carols[-1]
    assert got["Message-ID"] == reply_all["message_id"]
    assert names(got, "To") == [("Bob Müller", BOB)]
    assert names(got, "Cc") == [("Carol Ng", CAROL)]
    assert got["In-Reply-To"] == answer_id
    assert ids(got["References"]) == [first_id, reply["message_id"], answer_id]
    assert got["Subject"] == "Re: Order 1042"
    # Carol's client threads all three: each later one refers to the first.
    assert [m["Message-ID"] for m in carols] == [first_id, answer_id, reply_all["message_id"]]

    # 5. Forward the first message to Dave, as an attachment and inline.
    forward = await send(
        {"to": [f"Dave Roe <{DAVE}>"], "forward_message": received["id"], "text": "FYI\n"}
    )
    inline = await send({"to": [DAVE], "forward_message": received["id"], "forward_as": "inline"})
    daves = await inbox(dovecot, people["dave"], 2)
    as_attachment, as_inline = map(parsed, daves)
    original = (await client.get(f"{base}/messages/{received['id']}/raw")).content

    assert as_attachment["Subject"] == "Fwd: Order 1042"
    assert names(as_attachment, "To") == [("Dave Roe", DAVE)]
    assert ids(as_attachment["References"]) == [first_id]
    assert as_attachment["In-Reply-To"] is None
    body, attached = as_attachment.iter_parts()
    assert body.get_content().replace("\r\n", "\n") == "FYI\n"
    assert attached.get_content_type() == "message/rfc822"
    [inner] = attached.iter_parts()
    assert inner["Message-ID"] == first_id
    # The original travels byte for byte (as Postfix stored and Dovecot served it to us).
    assert original in daves[0]
    [invoice] = [p for p in inner.iter_attachments()]
    assert (invoice.get_filename(), invoice.get_content()) == ("invoice.pdf", PDF)

    assert as_inline["Subject"] == "Fwd: Order 1042"
    text = as_inline.get_body(("plain",))
    assert text is not None
    content = text.get_content()
    assert "Forwarded message" in content and "Where is my order?" in content
    assert "Order 1042" in content and BOB in content
    [invoice] = [p for p in as_inline.iter_attachments()]
    assert (invoice.get_filename(), invoice.get_content()) == ("invoice.pdf", PDF)

    # 6. The thread: received and sent, oldest first, also page by page.
    expected = [
        ("received", first_id),
        ("sent", reply["message_id"]),
        ("received", answer_id),
        ("sent", reply_all["message_id"]),
        ("sent", forward["message_id"]),
        ("sent", inline["message_id"]),
    ]
    listed = await client.get(f"{base}/messages", params={"thread_id": thread_id})
    assert listed.status_code == 200, listed.text
    items = listed.json()["items"]
    assert [(m["direction"], m["message_id"]) for m in items] == expected
    assert {m["thread_id"] for m in items} == {thread_id}
    paged: list[tuple[str, str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"thread_id": thread_id, "limit": 4}
        if cursor is not None:
            params["cursor"] = cursor
        page = (await client.get(f"{base}/messages", params=params)).json()
        paged += [(m["direction"], m["message_id"]) for m in page["items"]]
        cursor = page.get("next_cursor")
        if cursor is None:
            break
    assert paged == expected
