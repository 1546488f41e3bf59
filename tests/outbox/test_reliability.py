"""Delivery under hostile or misconfigured servers: deadlines, tenant fairness, stored
pauses that a PATCH ends at once, precise codes, one event line per outcome.

All against real servers on loopback: Postfix smtp-sink (delays, 5xx to EHLO and HELO)
and aiosmtpd (implicit TLS, a command held until the test lets it go).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.api.conftest import API_KEY, OTHER_TENANT_KEY
from tests.outbox.conftest import (
    ClientFactory,
    create_account,
    get_message,
    send,
    wait_status,
)
from tests.servers.smtp import SMTPD_USERS, SMTPDServer, SmtpSink

# Far longer than any wait below: a message that moves within a test's bound was moved by
# a notification, not by the dispatcher's periodic look at the outbox.
NO_POLL_S = 3600.0
PROMPT_S = 5.0  # bound for "at once" (well under NO_POLL_S and the retry delays here)
LONG_BACKOFF = (3600.0,)  # a retry that never comes within a test


def no_polling(client: AsyncTestClient[Any]) -> None:
    """Stop the dispatcher's periodic wake-up, so only notifications move mail."""
    delivery = client.app.state.delivery
    delivery._policy = dataclasses.replace(delivery._policy, idle_poll_s=NO_POLL_S)


async def wait_for(
    client: AsyncTestClient[Any], url: str, check: Callable[[Any], bool], bound: float
) -> Any:
    """Poll ``url`` until ``check(body)`` holds; fail after ``bound`` seconds."""
    body: Any = None
    try:
        async with asyncio.timeout(bound):
            while True:
                body = (await client.get(url)).json()
                if check(body):
                    return body
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{url} never got there within {bound} s: {body}") from None


@contextlib.contextmanager
def as_tenant(client: AsyncTestClient[Any], key: str) -> Iterator[None]:
    """Requests made inside go with another tenant's API key."""
    client.headers["Authorization"] = f"Bearer {key}"
    try:
        yield
    finally:
        client.headers["Authorization"] = f"Bearer {API_KEY}"


def events(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    """The fields of the business events logged as ``message``."""
    return [
        dict(getattr(record, "fields", {}))
        for record in caplog.records
        if record.name == "mailroom.delivery" or record.name == "mailroom.accounts"
        if record.getMessage() == message
    ]


# -- item 1: one attempt has an overall deadline ------------------------------------------


async def test_a_server_that_stalls_mid_transaction_is_abandoned_at_the_attempt_deadline(
    client_factory: ClientFactory, smtp_sink_factory: Any
) -> None:
    # smtp-sink waits 60 s before answering RCPT; each step's RFC timeout (5 min) would
    # keep the delivery slot that long. The attempt's deadline (1 s) ends it.
    client = await client_factory(smtp_attempt_timeout_s=1.0, retry_delays_s=LONG_BACKOFF)
    # Without PIPELINING (-p): smtp-sink answers pipelined commands out of order while it
    # delays one, so the stage the time ran out at would be the sink's artifact.
    sink: SmtpSink = smtp_sink_factory(delay={"RCPT": 60}, extra_args=["-p"])
    account_id = await create_account(client, sink)
    accepted = await send(client, account_id)
    held = await wait_status(client, account_id, accepted["id"], ["deferred"], attempts=1)
    [attempt] = held["attempts"]
    assert (attempt["outcome"], attempt["error_code"]) == ("deferred", "timeout")
    assert held["error"]["code"] == "timeout"
    assert "within 1 s (it was at RCPT TO)" in held["error"]["detail"]
    assert "timeout" not in held["error"]["detail"]  # the text does not repeat the code
    assert held["recipients"][0]["status"] == "deferred"
    assert held["next_attempt_at"] is not None  # transient: the schedule goes on


async def test_a_server_that_never_greets_is_abandoned_at_the_attempt_deadline(
    client_factory: ClientFactory, smtp_sink_factory: Any
) -> None:
    client = await client_factory(smtp_attempt_timeout_s=1.0, retry_delays_s=LONG_BACKOFF)
    sink: SmtpSink = smtp_sink_factory(delay={"CONNECT": 60})
    account_id = await create_account(client, sink)
    accepted = await send(client, account_id)
    held = await wait_status(client, account_id, accepted["id"], ["deferred"], attempts=1)
    [attempt] = held["attempts"]
    assert (attempt["outcome"], attempt["error_code"]) == ("deferred", "timeout")
    account = (await client.get(f"/v1/accounts/{account_id}")).json()
    assert account["smtp_status"] == "ok"  # transient: no pause


# -- item 4: one tenant cannot take every delivery session --------------------------------


async def test_a_tenants_slow_servers_do_not_hold_up_another_tenants_mail(
    client_factory: ClientFactory, smtpd_factory: Any
) -> None:
    # Two sessions in all, so each tenant may hold one. The default tenant's server
    # holds every DATA until the test lets it go: a stuck server, as long as it takes.
    client = await client_factory(smtp_concurrency=2)
    stuck: SMTPDServer = await smtpd_factory(pause_before="DATA")
    healthy: SMTPDServer = await smtpd_factory()
    slow_accounts = [
        await create_account(client, stuck, email=f"user{i}@slow.example") for i in range(3)
    ]
    slow_messages = [(a, (await send(client, a))["id"]) for a in slow_accounts]
    try:
        async with asyncio.timeout(30):
            await stuck.recorder.paused.wait()
        with as_tenant(client, OTHER_TENANT_KEY):
            other_account = await create_account(client, healthy, email="bob@fast.example")
            other_message = await send(client, other_account)
            done = await wait_status(client, other_account, other_message["id"])
        assert done["status"] == "sent", done
        # The stuck tenant held one session only, and its other mail waited its turn.
        assert len(stuck.recorder.sessions) == 1
        statuses = [(await get_message(client, a, m))["status"] for a, m in slow_messages]
        assert statuses.count("sending") == 1 and statuses.count("queued") == 2, statuses
    finally:
        stuck.recorder.resume.set()
    for account_id, outgoing_id in slow_messages:
        assert (await wait_status(client, account_id, outgoing_id))["status"] == "sent"
    assert len(healthy.messages) == 1 and len(stuck.messages) == 3


# -- item 14: configuration errors pause the account, stored; a PATCH resumes at once -----


async def test_ehlo_refused_pauses_the_account_and_a_patch_resumes_it_at_once(
    client: AsyncTestClient[Any], smtp_sink_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    no_polling(client)
    refusing: SmtpSink = smtp_sink_factory(hard_reject=["EHLO", "HELO"])
    account_id = await create_account(client, refusing)
    accepted = await send(client, account_id)
    held = await wait_status(client, account_id, accepted["id"], ["deferred"], attempts=1)
    [attempt] = held["attempts"]
    assert attempt["error_code"] == "rejected" and attempt["smtp_code"] // 100 == 5
    assert held["next_attempt_at"] is None  # paused: nothing is scheduled
    assert held["error"]["detail"].startswith("the SMTP server answered 5")
    assert held["error"]["detail"].endswith(" to EHLO")
    account_url = f"/v1/accounts/{account_id}"
    account = await wait_for(client, account_url, lambda a: a["smtp_status"] != "ok", PROMPT_S)
    status = account["smtp_pause"]
    assert status["code"] == "rejected" and status["detail"] == held["error"]["detail"]
    assert status["since"] is not None and account["smtp_auth_failed_at"] is None

    # Mail sent while paused waits, unscheduled, and nothing is tried.
    later = await send(client, account_id)
    await asyncio.sleep(0.5)
    waiting = await get_message(client, account_id, later["id"])
    assert (waiting["status"], waiting["attempts"], waiting["next_attempt_at"]) == (
        "queued",
        [],
        None,
    )
    assert len((await get_message(client, account_id, accepted["id"]))["attempts"]) == 1

    healthy: SmtpSink = smtp_sink_factory(dump=True)
    response = await client.patch(account_url, json={"outgoing": {"port": healthy.port}})
    assert response.status_code == 200
    assert response.json()["smtp_status"] == "ok"
    for message in (accepted, later):
        await wait_for(
            client,
            f"{account_url}/outbox/{message['id']}",
            lambda m: m["status"] == "sent",
            PROMPT_S,
        )
    assert len(healthy.messages()) == 2

    [paused] = events(caplog, "account paused")
    assert (paused["account_id"], paused["code"], paused["tenant"]) == (
        account_id,
        "rejected",
        "default",
    )
    [resumed] = events(caplog, "account resumed")
    assert (resumed["account_id"], resumed["code"]) == (account_id, "rejected")
    sent = {e["outgoing_id"]: e for e in events(caplog, "message sent")}
    assert sent[accepted["id"]]["message_id"] == accepted["message_id"]
    assert sent[accepted["id"]]["smtp_code"] == 250 and sent[accepted["id"]]["attempt"] == 2
    assert sent[later["id"]]["attempt"] == 1 and sent[later["id"]]["tenant"] == "default"
    [deferred] = events(caplog, "message deferred")
    assert (deferred["outgoing_id"], deferred["code"], deferred["next_attempt_at"]) == (
        accepted["id"],
        "rejected",
        None,
    )


async def test_an_untrusted_certificate_pauses_and_the_pause_shows_on_the_account(
    client_factory: ClientFactory, smtpd_tls: SMTPDServer, smtp_tls_files: Any
) -> None:
    # The service trusts another CA than the one that signed the server's certificate.
    client = await client_factory(ca_file=smtp_tls_files.wrong_ca_file)
    account_id = await create_account(client, smtpd_tls, login=True)
    accepted = await send(client, account_id)
    held = await wait_status(client, account_id, accepted["id"], ["deferred"], attempts=1)
    assert held["error"]["code"] == "tls_certificate_invalid"
    assert held["next_attempt_at"] is None
    account = await wait_for(
        client,
        f"/v1/accounts/{account_id}",
        lambda a: a["smtp_status"] != "ok",
        PROMPT_S,
    )
    assert account["smtp_status"] == "tls_certificate_invalid"
    assert "is not trusted" in account["smtp_pause"]["detail"]
    assert smtpd_tls.commands == []  # not even EHLO went over the untrusted connection
    await asyncio.sleep(0.5)
    assert len((await get_message(client, account_id, accepted["id"]))["attempts"]) == 1


async def test_a_patch_ends_a_backoff_at_once(
    client_factory: ClientFactory, smtpd_tls: SMTPDServer
) -> None:
    # STARTTLS configured against an implicit-TLS port: the server waits for a TLS hello
    # and never greets. The attempt deadline ends it (transient: a backoff of an hour);
    # fixing the security mode must deliver at once, not after the backoff or a poll.
    client = await client_factory(smtp_attempt_timeout_s=1.0, retry_delays_s=LONG_BACKOFF)
    no_polling(client)
    account_id = await create_account(client, smtpd_tls, security="starttls", login=True)
    accepted = await send(client, account_id)
    held = await wait_status(client, account_id, accepted["id"], ["deferred"], attempts=1)
    assert held["attempts"][0]["error_code"] == "timeout"
    assert held["next_attempt_at"] is not None

    response = await client.patch(
        f"/v1/accounts/{account_id}", json={"outgoing": {"security": "tls"}}
    )
    assert response.status_code == 200
    done = await wait_for(
        client,
        f"/v1/accounts/{account_id}/outbox/{accepted['id']}",
        lambda m: m["status"] == "sent",
        PROMPT_S,
    )
    assert [a["error_code"] for a in done["attempts"]] == ["timeout", None]
    [received] = smtpd_tls.messages
    assert received.tls and received.login == "alice"
    assert SMTPD_USERS["alice"].encode() not in smtpd_tls.recorder.raw


# -- items 12/13: a 450 per recipient is recipients_deferred -------------------------------


async def test_a_recipient_deferred_with_450_names_the_attempt_recipients_deferred(
    client_factory: ClientFactory, smtpd_factory: Any
) -> None:
    client = await client_factory(retry_delays_s=LONG_BACKOFF)
    server: SMTPDServer = await smtpd_factory(
        rcpt_replies={
            "later@example.org": "450 4.2.0 Greylisted, come back later",
            "nobody@example.org": "550 5.1.1 No such user",
        }
    )
    account_id = await create_account(client, server)
    accepted = await send(
        client, account_id, to=["bob@example.org", "later@example.org", "nobody@example.org"]
    )
    held = await wait_status(client, account_id, accepted["id"], ["deferred"], attempts=1)
    [attempt] = held["attempts"]
    assert (attempt["outcome"], attempt["error_code"]) == ("partial", "recipients_deferred")
    assert held["error"]["code"] == "recipients_deferred"
    assert [(r["status"], r["smtp_code"]) for r in held["recipients"]] == [
        ("sent", 250),
        ("deferred", 450),
        ("failed", 550),
    ]
