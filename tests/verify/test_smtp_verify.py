"""service.smtp.verify: the envelope step and the time limit, against real SMTP servers."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from service.domain.enums import Security
from service.smtp import SMTPServer, VerifyStepName, verify
from tests.servers.postfix import Postfix
from tests.servers.smtp import SMTPDServer, SmtpSink
from tests.smtp.support import TEST_TIMEOUTS, server_for, with_login

SmtpdFactory = Callable[..., Awaitable[SMTPDServer]]


def summary(steps: list) -> list[tuple[str, bool, str | None]]:  # type: ignore[type-arg]
    return [(step.step.value, step.ok, step.code) for step in steps]


async def test_envelope_is_tried_then_reset_without_data(smtpd_starttls: SMTPDServer) -> None:
    steps = await verify(with_login(smtpd_starttls), envelope=("me@example.com", "me@example.com"))
    assert summary(steps) == [
        ("connect", True, None),
        ("tls", True, None),
        ("auth", True, None),
        ("envelope", True, None),
    ]
    assert "MAIL FROM:<me@example.com>" in steps[-1].detail
    # The server saw the envelope and its reset; no message was ever started.
    assert smtpd_starttls.commands[-4:] == ["MAIL", "RCPT", "RSET", "QUIT"]
    assert "DATA" not in smtpd_starttls.commands
    assert smtpd_starttls.messages == []


async def test_a_refused_recipient_fails_the_envelope_step(smtpd_factory: SmtpdFactory) -> None:
    smtpd = await smtpd_factory(rcpt_replies={"me@example.com": "550 5.1.1 No such user"})
    steps = await verify(server_for(smtpd), envelope=("me@example.com", "me@example.com"))
    assert summary(steps) == [("connect", True, None), ("envelope", False, "rejected")]
    assert "550 5.1.1 No such user" in steps[-1].detail
    assert "DATA" not in smtpd.commands


async def test_a_refused_sender_fails_the_envelope_step(smtpd_factory: SmtpdFactory) -> None:
    smtpd = await smtpd_factory(mail_reply="451 4.3.0 Try later")
    steps = await verify(server_for(smtpd), envelope=("me@example.com", "me@example.com"))
    assert summary(steps) == [("connect", True, None), ("envelope", False, "deferred")]
    assert "the server refused the sender: 451 4.3.0 Try later" in steps[-1].detail
    assert "RCPT" not in smtpd.commands


def postfix_server(postfix: Postfix, ehlo: str) -> SMTPServer:
    return SMTPServer(
        host=postfix.host,
        port=postfix.port,
        security=Security.NONE,
        local_hostname=ehlo,
        timeouts=TEST_TIMEOUTS,
    )


async def test_postfix_refuses_an_unqualified_ehlo_name_at_the_envelope(postfix: Postfix) -> None:
    address = postfix.add_mailbox()
    steps = await verify(postfix_server(postfix, "mailhost"), envelope=(address, address))
    # EHLO itself is answered 250: only a transaction shows the refusal.
    assert summary(steps) == [("connect", True, None), ("envelope", False, "rejected")]
    assert "504 5.5.2 <mailhost>: Helo command rejected" in steps[-1].detail

    good = await verify(postfix_server(postfix, "client.example.org"), envelope=(address, address))
    assert summary(good) == [("connect", True, None), ("envelope", True, None)]
    assert postfix.messages(address) == []  # nothing was sent


async def test_the_time_limit_names_the_step_it_cut_short(
    smtp_sink_factory: Callable[..., SmtpSink],
) -> None:
    # smtp-sink answers MAIL only after a minute; the limit is a second.
    sink = smtp_sink_factory(delay={"MAIL": 60})
    server = dataclasses.replace(
        server_for(sink), timeouts=dataclasses.replace(TEST_TIMEOUTS, mail=60)
    )
    steps = await verify(server, envelope=("me@example.com", "you@example.com"), timeout_s=1)
    assert summary(steps) == [("connect", True, None), ("envelope", False, "timeout")]
    assert steps[-1].detail == (
        "the envelope step did not finish within the verify time limit of 1 s"
    )
    assert steps[-1].step is VerifyStepName.ENVELOPE
