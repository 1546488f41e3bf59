"""Delivery against real SMTP servers: exact bytes, TLS policy, retries, outcomes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.outbox.conftest import (
    ClientFactory,
    create_account,
    get_message,
    in_app,
    send,
    wait_status,
)
from tests.servers.smtp import SMTPDServer, SmtpSink

SMUGGLING_BODIES = {
    "lf_dot_lf": "before\n.\nafter\n",
    "crlf_dot_crlf_then_commands": (
        "before\r\n.\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n"
        "DATA\r\nSubject: smuggled\r\n\r\nowned\r\n.\r\nafter"
    ),
    "bare_cr": "one\rtwo\r.\rthree",
    "bare_lf_dot_crlf": "a\n.\r\nMAIL FROM:<evil@example.com>\r\n",
    "cr_dot_cr": "x\r.\rQUIT\r",
    "leading_dots": ".starts with a dot\n..two dots\n.\n",
}


@pytest.mark.parametrize("body", list(SMUGGLING_BODIES.values()), ids=list(SMUGGLING_BODIES))
async def test_bodies_arrive_as_one_message_crlf_only_dot_stuffed_right(
    client: AsyncTestClient[Any], smtpd: SMTPDServer, body: str
) -> None:
    account_id = await create_account(client, smtpd)
    accepted = await send(client, account_id, text=body, subject="smuggling")
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent"
    await in_app(client, client.app.state.delivery.wait_idle)

    [received] = smtpd.messages  # exactly one message, whatever the body held
    assert received.rcpt_tos == ("bob@example.org",)
    data = received.data
    # CRLF only: every CR is followed by LF and every LF preceded by CR.
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
    # The server removed the stuffing: it holds exactly the bytes that were accepted.
    raw = (await client.get(f"/v1/accounts/{account_id}/outbox/{accepted['id']}/raw")).content
    assert data == raw
    # On the wire: after the DATA command, the first lone "." line is the end of the
    # data, and it comes after the whole (stuffed) message; then only QUIT.
    wire = smtpd.recorder.raw
    before, after_data = wire.split(b"\r\nDATA\r\n", 1)
    end = after_data.index(b"\r\n.\r\n")
    assert after_data[end + 5 :] in (b"QUIT\r\n", b"")
    assert after_data[: end + 2].replace(b"\r\n..", b"\r\n.") == data
    assert b"evil" not in before
    # The server saw one transaction: the smuggled commands stayed message text.
    assert smtpd.commands == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


async def test_a_server_that_drops_starttls_gets_no_credentials(
    client: AsyncTestClient[Any], smtpd_no_starttls: SMTPDServer
) -> None:
    # The account asks for STARTTLS; the server (as behind an attacker) does not offer it
    # but offers AUTH in clear.
    account_id = await create_account(client, smtpd_no_starttls, security="starttls", login=True)
    accepted = await send(client, account_id)
    held = await wait_status(client, account_id, accepted["id"], ["deferred"], attempts=1)
    assert held["error"]["code"] == "tls_required"
    [attempt] = held["attempts"]
    assert attempt["outcome"] == "deferred" and attempt["error_code"] == "tls_required"
    commands = smtpd_no_starttls.commands
    assert not any(c.startswith("AUTH") for c in commands), commands
    assert "MAIL" not in commands
    assert b"AUTH" not in smtpd_no_starttls.recorder.raw
    assert smtpd_no_starttls.messages == []
    # Paused: retrying would only re-learn the same; nothing more is tried.
    await asyncio.sleep(1.0)
    again = await get_message(client, account_id, accepted["id"])
    assert len(again["attempts"]) == 1 and again["status"] == "deferred"


async def test_a_tls_pause_ends_when_the_account_is_updated(
    client: AsyncTestClient[Any], smtpd_no_starttls: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd_no_starttls, security="starttls")
    accepted = await send(client, account_id)
    held = await wait_status(client, account_id, accepted["id"], ["deferred"], attempts=1)
    assert held["error"]["code"] == "tls_required"
    # The owner decides this server is fine without TLS (and without AUTH).
    response = await client.patch(
        f"/v1/accounts/{account_id}", json={"outgoing": {"security": "none"}}
    )
    assert response.status_code == 200, response.text
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent", done
    assert [a["error_code"] for a in done["attempts"]] == ["tls_required", None]
    assert len(smtpd_no_starttls.messages) == 1


async def test_starttls_with_auth_delivers_encrypted_and_authenticated(
    client: AsyncTestClient[Any], smtpd_starttls: SMTPDServer
) -> None:
    account_id = await create_account(client, smtpd_starttls, login=True)
    accepted = await send(client, account_id)
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent", done
    [received] = smtpd_starttls.messages
    assert received.tls and received.login == "alice"
    commands = smtpd_starttls.commands
    assert commands.index("STARTTLS") < commands.index("AUTH PLAIN") < commands.index("MAIL")


async def test_implicit_tls_delivers(client: AsyncTestClient[Any], smtpd_tls: SMTPDServer) -> None:
    account_id = await create_account(client, smtpd_tls, login=True)
    accepted = await send(client, account_id)
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent", done
    assert smtpd_tls.messages[0].tls


async def test_untrusted_certificate_is_tls_certificate_invalid(
    client_factory: ClientFactory, smtpd_tls: SMTPDServer, smtp_tls_files: Any
) -> None:
    client = await client_factory(ca_file=smtp_tls_files.wrong_ca_file)
    account_id = await create_account(client, smtpd_tls, login=True)
    accepted = await send(client, account_id)
    held = await wait_status(client, account_id, accepted["id"], ["deferred"], attempts=1)
    assert held["error"]["code"] == "tls_certificate_invalid"
    assert smtpd_tls.messages == []


async def test_a_deferral_is_retried_and_then_succeeds(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    recorder = smtpd.recorder
    accept = recorder.handle_DATA
    calls = 0

    async def refuse_once(server: Any, session: Any, envelope: Any) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            return "451 4.3.0 Try again later"
        return str(await accept(server, session, envelope))

    recorder.handle_DATA = refuse_once  # type: ignore[method-assign]
    account_id = await create_account(client, smtpd)
    accepted = await send(client, account_id)
    done = await wait_status(client, account_id, accepted["id"], ["sent", "failed"])
    assert done["status"] == "sent", done
    first, second = done["attempts"]
    assert (first["outcome"], first["smtp_code"], first["error_code"]) == (
        "deferred",
        451,
        "deferred",
    )
    assert first["smtp_message"] == "4.3.0 Try again later"
    assert (second["outcome"], second["smtp_code"]) == ("sent", 250)
    assert done["error"] is None
    [received] = smtpd.messages
    assert accepted["message_id"].encode() in received.data


async def test_smtp_sink_soft_reject_defers_then_a_healthy_server_gets_it(
    client: AsyncTestClient[Any], smtp_sink_factory: Any
) -> None:
    refusing: SmtpSink = smtp_sink_factory(soft_reject=["MAIL"])
    account_id = await create_account(client, refusing)
    accepted = await send(client, account_id)
    deferred = await wait_status(client, account_id, accepted["id"], ["deferred"], attempts=1)
    assert deferred["attempts"][0]["smtp_code"] // 100 == 4
    assert deferred["next_attempt_at"] is not None

    healthy: SmtpSink = smtp_sink_factory(dump=True)
    response = await client.patch(
        f"/v1/accounts/{account_id}", json={"outgoing": {"port": healthy.port}}
    )
    assert response.status_code == 200
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent"
    assert [a["outcome"] for a in done["attempts"]][-1] == "sent"
    [message] = healthy.messages()
    assert accepted["message_id"].encode() in message.content


async def test_a_permanent_refusal_fails_at_once_without_retry(
    client: AsyncTestClient[Any], smtpd_factory: Any
) -> None:
    server: SMTPDServer = await smtpd_factory(data_reply="554 5.7.1 Message refused")
    account_id = await create_account(client, server)
    accepted = await send(client, account_id, cc=["carol@example.org"])
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "rejected"
    [attempt] = done["attempts"]
    assert (attempt["outcome"], attempt["smtp_code"]) == ("failed", 554)
    assert [r["status"] for r in done["recipients"]] == ["failed", "failed"]
    assert {r["smtp_code"] for r in done["recipients"]} == {554}
    await asyncio.sleep(1.0)  # longer than the whole retry schedule
    assert len((await get_message(client, account_id, accepted["id"]))["attempts"]) == 1
    assert server.commands.count("DATA") == 1


async def test_smtp_sink_hard_reject_fails(
    client: AsyncTestClient[Any], smtp_sink_factory: Any
) -> None:
    sink: SmtpSink = smtp_sink_factory(hard_reject=["RCPT"])
    account_id = await create_account(client, sink)
    accepted = await send(client, account_id)
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "failed"
    assert done["recipients"][0]["status"] == "failed"
    assert done["recipients"][0]["smtp_code"] // 100 == 5
    assert len(done["attempts"]) == 1


async def test_one_recipient_refused_the_others_delivered(
    client: AsyncTestClient[Any], smtpd_factory: Any
) -> None:
    server: SMTPDServer = await smtpd_factory(
        rcpt_replies={"nobody@example.org": "550 5.1.1 No such user"}
    )
    account_id = await create_account(client, server)
    accepted = await send(
        client, account_id, to=["bob@example.org", "nobody@example.org"], cc=["carol@example.org"]
    )
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent"
    assert {r["address"]: (r["status"], r["smtp_code"]) for r in done["recipients"]} == {
        "bob@example.org": ("sent", 250),
        "nobody@example.org": ("failed", 550),
        "carol@example.org": ("sent", 250),
    }
    assert done["error"]["code"] == "recipients_refused"
    [attempt] = done["attempts"]
    assert attempt["outcome"] == "partial"
    [received] = server.messages
    assert received.rcpt_tos == ("bob@example.org", "carol@example.org")


async def test_only_deferred_recipients_are_tried_again(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    recorder = smtpd.recorder
    accept = recorder.handle_RCPT
    seen: list[str] = []

    async def greylist_once(
        server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        seen.append(address)
        if address == "later@example.org" and seen.count(address) == 1:
            return "450 4.2.0 Greylisted, come back later"
        return str(await accept(server, session, envelope, address, options))

    recorder.handle_RCPT = greylist_once  # type: ignore[method-assign]
    account_id = await create_account(client, smtpd)
    accepted = await send(client, account_id, to=["bob@example.org", "later@example.org"])
    done = await wait_status(client, account_id, accepted["id"], ["sent", "failed"], attempts=2)
    assert done["status"] == "sent"
    assert [a["outcome"] for a in done["attempts"]] == ["partial", "sent"]
    assert [(r["address"], r["status"]) for r in done["recipients"]] == [
        ("bob@example.org", "sent"),
        ("later@example.org", "sent"),
    ]
    first, second = smtpd.messages
    assert first.rcpt_tos == ("bob@example.org",)
    assert second.rcpt_tos == ("later@example.org",)
    assert first.data == second.data  # the same message, the same Message-ID
    assert seen == ["bob@example.org", "later@example.org", "later@example.org"]


async def test_retries_run_out_as_expired(
    client: AsyncTestClient[Any], smtp_sink_factory: Any
) -> None:
    sink: SmtpSink = smtp_sink_factory(soft_reject=["RCPT"])
    account_id = await create_account(client, sink)
    accepted = await send(client, account_id)
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "expired"
    # Two delays in the schedule: three attempts, then no more.
    assert [a["outcome"] for a in done["attempts"]] == ["deferred"] * 3
    assert done["recipients"][0]["status"] == "failed"


async def test_max_message_age_expires_a_message(
    client_factory: ClientFactory, smtp_sink_factory: Any
) -> None:
    client = await client_factory(max_message_age_s=1.0, retry_delays_s=(0.2,) * 100)
    sink: SmtpSink = smtp_sink_factory(soft_reject=["MAIL"])
    account_id = await create_account(client, sink)
    accepted = await send(client, account_id)
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "expired"
    assert 1 <= len(done["attempts"]) < 100


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ({"disconnect": ["DATA"]}, "connection_lost"),
        ({"reply_421": ["MAIL"]}, "deferred"),
        ({"disconnect": ["CONNECT"]}, None),
    ],
)
async def test_drops_and_421_are_deferred_and_retried(
    client: AsyncTestClient[Any],
    smtp_sink_factory: Any,
    fault: dict[str, list[str]],
    code: str | None,
) -> None:
    sink: SmtpSink = smtp_sink_factory(**fault)
    account_id = await create_account(client, sink)
    accepted = await send(client, account_id)
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "expired"
    assert [a["outcome"] for a in done["attempts"]] == ["deferred"] * 3
    if code is not None:
        assert {a["error_code"] for a in done["attempts"]} == {code}


async def test_wrong_password_pauses_the_account_until_it_is_updated(
    client: AsyncTestClient[Any], smtpd_starttls: SMTPDServer
) -> None:
    account_id = await create_account(
        client, smtpd_starttls, login=True, password="not the password"
    )
    first = await send(client, account_id)
    held = await wait_status(client, account_id, first["id"], ["deferred"], attempts=1)
    [attempt] = held["attempts"]
    assert (attempt["smtp_code"], attempt["error_code"]) == (535, "auth_failed")
    account = (await client.get(f"/v1/accounts/{account_id}")).json()
    assert account["smtp_status"] == "auth_failed"
    status = account["smtp_pause"]
    assert status["code"] == "auth_failed"
    assert status["detail"] == (
        "the SMTP server answered 535 5.7.8 Authentication credentials invalid to AUTH"
    )
    assert status["since"] == account["smtp_auth_failed_at"] is not None

    # While paused, new mail waits and nothing is tried.
    second = await send(client, account_id)
    await asyncio.sleep(1.0)
    assert (await get_message(client, account_id, first["id"]))["attempts"] == held["attempts"]
    waiting = await get_message(client, account_id, second["id"])
    assert waiting["status"] == "queued" and waiting["attempts"] == []
    assert smtpd_starttls.commands.count("AUTH PLAIN") == 1

    response = await client.patch(
        f"/v1/accounts/{account_id}",
        json={"outgoing": {"username": "alice", "password": "correct horse battery staple"}},
    )
    assert response.status_code == 200
    assert response.json()["smtp_status"] == "ok"
    assert response.json()["smtp_pause"] is None
    for message in (first, second):
        done = await wait_status(client, account_id, message["id"])
        assert done["status"] == "sent", done
    assert len(smtpd_starttls.messages) == 2


async def test_one_session_carries_many_messages(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    delivery = client.app.state.delivery
    account_id = await create_account(client, smtpd)
    await in_app(client, delivery.stop)  # let the messages pile up
    ids = [(await send(client, account_id, subject=f"m{i}"))["id"] for i in range(6)]
    await in_app(client, delivery.start)
    for outgoing_id in ids:
        assert (await wait_status(client, account_id, outgoing_id))["status"] == "sent"
    await in_app(client, delivery.wait_idle)
    assert len(smtpd.messages) == 6
    assert len(smtpd.recorder.sessions) == 1
    assert smtpd.commands.count("EHLO") == 1
    assert smtpd.commands.count("MAIL") == 6


async def test_accounts_are_delivered_concurrently(
    client_factory: ClientFactory, smtp_sink_factory: Any, smtpd: SMTPDServer
) -> None:
    # One tenant's accounts: its share of the sessions must let both run at once (two
    # tenants are configured here, so the default share would be one session).
    client = await client_factory(smtp_concurrency=2, smtp_sessions_per_tenant=2)
    # A server that takes 2 s to answer each final dot must not hold up another account.
    slow: SmtpSink = smtp_sink_factory(delay={".": 2})
    slow_account = await create_account(client, slow)
    fast_account = await create_account(client, smtpd)
    slow_message = await send(client, slow_account)
    fast_message = await send(client, fast_account)
    done = await wait_status(client, fast_account, fast_message["id"])
    assert done["status"] == "sent"
    slow_now = await get_message(client, slow_account, slow_message["id"])
    assert slow_now["status"] in ("queued", "sending")
    assert (await wait_status(client, slow_account, slow_message["id"]))["status"] == "sent"


async def test_the_account_deleted_while_queued_takes_its_mail_along(
    client: AsyncTestClient[Any], smtpd: SMTPDServer
) -> None:
    delivery = client.app.state.delivery
    account_id = await create_account(client, smtpd)
    await in_app(client, delivery.stop)
    await send(client, account_id)
    assert (await client.delete(f"/v1/accounts/{account_id}")).status_code == 204
    await in_app(client, delivery.start)
    other = await create_account(client, smtpd)
    kept = await send(client, other)
    assert (await wait_status(client, other, kept["id"]))["status"] == "sent"
    assert len(smtpd.messages) == 1
