"""A real bounce, end to end: Mailroom sends through a real Postfix that accepts the message
and bounces it from its queue; Postfix delivers its DSN into a Maildir that the suite's
Dovecot serves; Mailroom retrieves it over POP3 and ties it to the message it sent.

Runs on the store ``MAILROOM_TEST_STORE`` names (SQLite by default, PostgreSQL on that pass).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from tests.api.conftest import API_KEY, make_settings
from tests.retrieval.conftest import retrieve
from tests.servers.dovecot import Dovecot, Mailbox
from tests.servers.postfix import (
    BOUNCE_DOMAIN,
    POSTFIX_DOMAIN,
    Postfix,
    bouncing_postfix_for_test,
)
from tests.waiting import until

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.fixture
def maildir(dovecot: Dovecot) -> Mailbox:
    """The POP3 user whose Maildir receives everything Postfix delivers."""
    return dovecot.add_user()


@pytest.fixture
def bouncing_postfix(dovecot: Dovecot, maildir: Mailbox) -> Iterator[Postfix]:
    with bouncing_postfix_for_test(dovecot.directory / "mail", maildir.user) as server:
        yield server


@pytest.fixture
async def client(tmp_path: Path, dovecot: Dovecot) -> AsyncIterator[AsyncTestClient[Any]]:
    settings = make_settings(tmp_path, allowed_networks=LOOPBACK, ca_file=dovecot.ca_file)
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield test_client


def dsn_files(maildir: Mailbox) -> list[Path]:
    return [
        p
        for sub in ("new", "cur")
        for p in (maildir.path / sub).iterdir()
        if b"multipart/report" in p.read_bytes()
    ]


async def test_a_message_bounced_by_postfix_is_tied_to_its_dsn(
    client: AsyncTestClient[Any],
    dovecot: Dovecot,
    maildir: Mailbox,
    bouncing_postfix: Postfix,
) -> None:
    sender = f"shop@{POSTFIX_DOMAIN}"
    created = await client.post(
        "/v1/accounts",
        json={
            "name": "Shop",
            "email": sender,
            "incoming": {
                "host": dovecot.host,
                "port": dovecot.pop3_port,
                "security": "none",
                "username": maildir.user,
                "password": maildir.password,
            },
            "outgoing": {
                "host": bouncing_postfix.host,
                "port": bouncing_postfix.port,
                "security": "none",
            },
        },
    )
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    base = f"/v1/accounts/{account_id}"
    ghost = f"ghost@{BOUNCE_DOMAIN}"
    friend = f"friend@{POSTFIX_DOMAIN}"
    accepted = await client.post(
        f"{base}/outbox",
        json={"to": [ghost, friend], "subject": "Your order", "text": "Thanks!\n"},
    )
    assert accepted.status_code == 202, accepted.text
    outgoing_id = accepted.json()["id"]

    # Postfix takes both recipients at RCPT (so Mailroom records both sent) ...
    sent = await until(
        lambda: client.get(f"{base}/outbox/{outgoing_id}"),
        lambda r: r.json()["status"] in ("sent", "failed"),
    )
    body = sent.json()
    assert body["status"] == "sent", (body, bouncing_postfix.log())
    assert [r["status"] for r in body["recipients"]] == ["sent", "sent"]
    assert body["bounces"] == []
    # ... then bounces the first from its queue: the DSN lands in the Maildir, beside the
    # copy delivered to the friend.
    await until(
        lambda: asyncio.to_thread(lambda: (len(dsn_files(maildir)), maildir.count())),
        lambda found: found == (1, 2),
        timeout=60,
    )

    done = await retrieve(client, account_id)
    assert done["status"] == "succeeded", done
    # The DSN and the copy delivered to the friend (the same Maildir).
    assert done["messages_downloaded"] == 2

    after = (await client.get(f"{base}/outbox/{outgoing_id}")).json()
    assert after["status"] == "sent"
    bounced, delivered = after["recipients"]
    assert (bounced["address"], bounced["status"]) == (ghost, "bounced")
    assert bounced["smtp_code"] == 250  # Postfix's answer at RCPT stays
    bounce = bounced["bounce"]
    assert bounce["status"] == "5.1.1"
    assert bounce["diagnostic_code"].startswith("x-unix; 550 5.1.1 <" + ghost + ">")
    assert (delivered["address"], delivered["status"], delivered["bounce"]) == (
        friend,
        "sent",
        None,
    )
    [dsn_id] = after["bounces"]
    assert bounce["message_id"] == dsn_id

    # Both directions: the stored DSN names the outgoing message, alone among the messages.
    messages = (await client.get(f"{base}/messages")).json()["items"]
    assert sorted((m["id"], m["bounce_of"]) for m in messages) == sorted(
        [(dsn_id, outgoing_id), next((m["id"], None) for m in messages if m["id"] != dsn_id)]
    )
    dsn = (await client.get(f"{base}/messages/{dsn_id}")).json()
    assert dsn["bounce_of"] == outgoing_id
    assert dsn["subject"] == "Undelivered Mail Returned to Sender"

    # One outgoing.bounced event, in the feed (on PostgreSQL the feed serves it once no
    # older transaction runs on the server: waited for, bounded).
    events = await until(
        lambda: client.get("/v1/events", params={"types": "outgoing.bounced"}),
        lambda r: r.json()["items"],
    )
    [event] = events.json()["items"]
    assert event["account_id"] == account_id
    assert event["data"] == {
        "outgoing_id": outgoing_id,
        "internet_message_id": accepted.json()["message_id"],
        "bounce_message_id": dsn_id,
        "recipients": [
            {
                "address": ghost,
                "status": "bounced",
                # Postfix's pipe transport reports an x-unix diagnostic: no SMTP reply.
                "smtp_code": None,
                "dsn_status": "5.1.1",
                "diagnostic": bounce["diagnostic_code"],
                "remote_mta": None,
            }
        ],
    }

    # Retrieving again changes nothing: the DSN is linked once.
    again = await retrieve(client, account_id)
    assert again["messages_downloaded"] == 0
    events = (await client.get("/v1/events", params={"types": "outgoing.bounced"})).json()
    assert len(events["items"]) == 1
