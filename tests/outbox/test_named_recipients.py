"""Named recipients end to end: what a real Postfix delivers, and SMTPUTF8 refusals."""

from __future__ import annotations

import asyncio
import email
import email.policy
from typing import Any

from litestar.testing import AsyncTestClient

from tests.outbox.conftest import create_account, send, wait_status
from tests.servers.postfix import Postfix
from tests.servers.smtp import SMTPDServer
from tests.waiting import WAIT_S


async def postfix_account(client: AsyncTestClient[Any], postfix: Postfix) -> str:
    body = {
        "name": "Alice",
        "email": "alice@example.com",
        "display_name": "Alice Example",
        "incoming": {
            "host": "127.0.0.1",
            "port": 1110,
            "security": "none",
            "username": "alice",
            "password": "pop-secret",
        },
        "outgoing": {"host": postfix.host, "port": postfix.port, "security": "none"},
    }
    response = await client.post("/v1/accounts", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def delivered(postfix: Postfix, address: str) -> bytes:
    for _ in range(int(WAIT_S / 0.05)):
        if found := postfix.messages(address):
            return found[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing delivered to {address}:\n{postfix.log()[-2000:]}")


async def test_names_in_every_form_reach_the_recipient_encoded(
    client: AsyncTestClient[Any], postfix: Postfix
) -> None:
    account_id = await postfix_account(client, postfix)
    bob, carol, dave, zed = (postfix.add_mailbox() for _ in range(4))
    accepted = await send(
        client,
        account_id,
        to=[f"Bob Müller <{bob}>", {"address": carol, "name": "Carol, Jr."}],
        cc=[f'"Dave D." <{dave}>'],
        bcc=[{"address": zed, "name": "Hidden Zed"}],
        reply_to={"address": "help@example.com", "name": "Help Desk"},
    )
    assert [r["address"] for r in accepted["recipients"]] == [bob, carol, dave, zed]
    assert [r["kind"] for r in accepted["recipients"]] == ["to", "to", "cc", "bcc"]
    # The names as sent are shown with each recipient; a Bcc recipient's never was sent.
    names = ["Bob Müller", "Carol, Jr.", "Dave D.", None]
    assert [r["name"] for r in accepted["recipients"]] == names
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent", done
    assert [r["name"] for r in done["recipients"]] == names

    raw = await client.get(f"/v1/accounts/{account_id}/outbox/{accepted['id']}/raw")
    assert zed.encode() not in raw.content and b"Hidden Zed" not in raw.content
    for address in (bob, zed):
        data = await delivered(postfix, address)
        head = data.split(b"\n\n", 1)[0]
        assert head.isascii()
        assert b"=?utf-8?" in head  # Bob Müller as an RFC 2047 word
        assert b"Hidden Zed" not in data
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        assert [(a.display_name, a.addr_spec) for a in parsed["To"].addresses] == [
            ("Bob Müller", bob),
            ("Carol, Jr.", carol),
        ]
        assert [(a.display_name, a.addr_spec) for a in parsed["Cc"].addresses] == [
            ("Dave D.", dave)
        ]
        assert parsed["Reply-To"].addresses[0].display_name == "Help Desk"
        assert "Bcc" not in parsed


async def test_bad_named_entries_are_422_with_their_code(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    cases = [
        (["Bob <bob@example.org>, Eve <eve@example.org>"], "invalid_address", "to[0]"),
        (["Müller, Bob <bob@example.org>"], "invalid_address", "to[0]"),
        (
            [{"address": "bob@example.org", "name": "Bob\r\nBcc: eve@example.org"}],
            "header_injection",
            "to[0].name",
        ),
        ([{"address": "Bob <bob@example.org>", "name": "Bob"}], "invalid_address", "to[0].address"),
        (
            [{"address": "bob@example.org", "name": "\u202eBob"}],
            "invalid_display_name",
            "to[0].name",
        ),
    ]
    for to, code, field in cases:
        problem = await send(client, account_id, expect=422, to=to)
        assert problem["code"] == code, (to, problem)
        assert problem["errors"][0]["field"] == field, (to, problem)
    problem = await send(client, account_id, expect=422, to=[{"name": "Bob"}])
    assert problem["code"] == "validation_error"
    problem = await send(
        client, account_id, expect=422, to=[{"address": "bob@example.org", "nick": "B"}]
    )
    assert problem["code"] == "validation_error"
    assert smtpd.messages == []


async def test_non_ascii_local_part_uses_smtputf8_when_offered(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd)
    accepted = await send(client, account_id, to=["José <josé@example.org>"])
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent", done
    [received] = smtpd.messages
    assert "SMTPUTF8" in received.mail_options
    assert received.rcpt_tos == ("josé@example.org",)
    assert "To: José <josé@example.org>\r\n".encode() in received.data


async def test_non_ascii_local_part_fails_clearly_without_smtputf8(
    client: AsyncTestClient[Any], smtpd_factory: Any
) -> None:
    smtpd = await smtpd_factory(smtputf8=False)
    account_id = await create_account(client, smtpd)
    accepted = await send(client, account_id, to=[{"address": "josé@example.org", "name": "J"}])
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "smtputf8_not_supported"
    assert done["attempts"][-1]["error_code"] == "smtputf8_not_supported"
    assert smtpd.messages == []
