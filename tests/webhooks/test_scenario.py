"""The whole story through the app, on real servers: mail sent (aiosmtpd), deferred then
sent and failed (Postfix smtp-sink), an account paused for a wrong password and resumed by
new settings, mail retrieved from Dovecot. Every event arrives at a webhook receiver that
verifies each request with ``standardwebhooks`` (after answering 500 twice, retried with
the same ``webhook-id``), exactly as ``/v1/events`` shows it, each event once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from tests.outbox.conftest import create_account as create_sending_account
from tests.outbox.conftest import send, wait_status
from tests.retrieval.conftest import account_json, retrieve
from tests.servers.smtp import SMTPDServer, SmtpSink, SMTPTLSFiles
from tests.waiting import until
from tests.webhooks.conftest import ClientFactory, register, until_received
from tests.webhooks.receiver import Receiver

MESSAGE = (
    b"From: Bob <bob@example.org>\r\nTo: dave@example.com\r\nSubject: Report {n}\r\n"
    b"Message-ID: <report-{n}@example.org>\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
    b"\r\nnumbers {n}\r\n"
)


async def feed(client: AsyncTestClient[Any], **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = None
    while True:
        query = {"limit": 3, **params, **({"after": after} if after else {})}
        page = (await client.get("/v1/events", params=query)).json()
        items += page["items"]
        if not page["items"]:
            return items
        after = page["next_cursor"]


async def test_every_change_reaches_the_webhook_and_the_feed_once(
    client_factory: ClientFactory,
    receiver: Receiver,
    smtpd: SMTPDServer,
    smtpd_starttls: SMTPDServer,
    smtp_sink_factory: Any,
    smtp_tls_files: SMTPTLSFiles,
    dovecot: Any,
    tmp_path: Path,
) -> None:
    client = await client_factory(ca_file=smtp_tls_files.ca_file)
    receiver.fail_first_event = 2
    await register(client, receiver)

    # Sent at once.
    sender = await create_sending_account(client, smtpd)
    sent = await send(client, sender, cc=["carol@example.org"])
    await wait_status(client, sender, sent["id"])

    # Deferred (4xx), then sent once the account points at a healthy server.
    refusing: SmtpSink = smtp_sink_factory(soft_reject=["MAIL"])
    deferring = await create_sending_account(client, refusing)
    later = await send(client, deferring)
    await wait_status(client, deferring, later["id"], ["deferred"], attempts=1)
    healthy: SmtpSink = smtp_sink_factory()
    await client.patch(f"/v1/accounts/{deferring}", json={"outgoing": {"port": healthy.port}})
    await wait_status(client, deferring, later["id"])

    # Failed (5xx at RCPT).
    rejecting: SmtpSink = smtp_sink_factory(hard_reject=["RCPT"])
    failing = await create_sending_account(client, rejecting)
    failed = await send(client, failing)
    assert (await wait_status(client, failing, failed["id"]))["status"] == "failed"

    # Paused by a wrong password, resumed by new outgoing settings.
    locked = await create_sending_account(client, smtpd_starttls, login=True, password="nope")
    held = await send(client, locked)
    await wait_status(client, locked, held["id"], ["deferred"], attempts=1)
    await client.patch(
        f"/v1/accounts/{locked}",
        json={
            "outgoing": {
                "host": "127.0.0.1",
                "port": smtpd.port,
                "security": "none",
                "username": None,
                "password": None,
            }
        },
    )
    await wait_status(client, locked, held["id"])

    # Retrieved from Dovecot.
    mailbox = dovecot.add_user()
    mailbox.deliver(MESSAGE.replace(b"{n}", b"1"))
    mailbox.deliver(MESSAGE.replace(b"{n}", b"2"))
    response = await client.post(
        "/v1/accounts", json=account_json(dovecot, mailbox, security="none")
    )
    reader = response.json()["id"]
    assert (await retrieve(client, reader))["status"] == "succeeded"

    expected_pairs = [
        (sender, "outgoing.sent"),
        (deferring, "outgoing.deferred"),
        (deferring, "outgoing.sent"),
        (failing, "outgoing.failed"),
        (locked, "outgoing.deferred"),
        (locked, "account.paused"),
        (locked, "account.resumed"),
        (locked, "outgoing.sent"),
        (reader, "message.received"),
        (reader, "message.received"),
        (reader, "retrieval.succeeded"),
    ]
    # (Bounded wait: on PostgreSQL an event is served once older transactions have ended.)
    events = await until(
        lambda: feed(client),
        lambda found: all(
            p in [(e["account_id"], e["type"]) for e in found] for p in expected_pairs
        ),
    )
    types = [(e["account_id"], e["type"]) for e in events]
    # Commit order: per account, in the order the changes happened.
    of_deferring = [t for a, t in types if a == deferring]
    assert of_deferring[-1] == "outgoing.sent"  # after one deferral or more (retries)
    assert set(of_deferring[:-1]) == {"outgoing.deferred"}
    assert [t for a, t in types if a == reader] == [
        "message.received",
        "message.received",
        "retrieval.succeeded",
    ]
    assert len({e["id"] for e in events}) == len(events)

    by_type = {(e["account_id"], e["type"]): e for e in events}
    ok = by_type[(sender, "outgoing.sent")]["data"]
    assert ok["outgoing_id"] == sent["id"] and ok["status"] == "sent"
    assert [(r["address"], r["status"], r["smtp_code"]) for r in ok["recipients"]] == [
        ("bob@example.org", "sent", 250),
        ("carol@example.org", "sent", 250),
    ]
    wait = by_type[(deferring, "outgoing.deferred")]["data"]
    assert wait["next_attempt_at"] is not None and wait["error_code"] is not None
    bad = by_type[(failing, "outgoing.failed")]["data"]
    assert bad["error_code"] == "rejected" and bad["recipients"][0]["status"] == "failed"
    paused = by_type[(locked, "account.paused")]["data"]
    assert (paused["direction"], paused["code"]) == ("outgoing", "auth_failed")
    assert by_type[(locked, "account.resumed")]["data"]["code"] == "auth_failed"
    received = [e["data"] for e in events if e["type"] == "message.received"]
    assert [m["subject"] for m in received] == ["Report 1", "Report 2"]
    assert received[0]["from"] == "Bob <bob@example.org>"
    assert received[0]["internet_message_id"] == "<report-1@example.org>"
    assert received[0]["has_attachments"] is False and received[0]["size"] > 0
    stored = (await client.get(f"/v1/accounts/{reader}/messages")).json()["items"]
    threads = {m["message_id"]: m["thread_id"] for m in stored}
    assert received[0]["thread_id"] == threads["<report-1@example.org>"]
    done = by_type[(reader, "retrieval.succeeded")]["data"]
    assert done["messages_downloaded"] == 2 and done["error_code"] is None

    # Every event reached the webhook, verified, each id once among the delivered ones,
    # with the same content as the feed; the first two answers (500) were retried.
    await until_received(
        receiver, lambda r: len({x.webhook_id for x in r if x.status == 200}) >= len(events)
    )
    requests = receiver.requests
    assert all(r.verified_with == [0] for r in requests)
    delivered = [r for r in requests if r.status == 200]
    assert sorted(r.webhook_id for r in delivered) == sorted(e["id"] for e in events)
    first = requests[0].webhook_id
    assert [r.status for r in requests if r.webhook_id == first] == [500, 500, 200]
    for request in delivered:
        body = request.payload
        match = next(e for e in events if e["id"] == body["id"])
        assert body == {k: v for k, v in match.items() if k != "cursor"}
    await asyncio.sleep(0)
