"""Outcome classification against Postfix smtp-sink's injected faults."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest

from service.smtp import (
    SMTPAllRecipientsRefused,
    SMTPAuthError,
    SMTPConnectionFailed,
    SMTPDeliveryError,
    SMTPErrorCode,
    SMTPProtocolError,
    SMTPReplyError,
    SMTPSession,
    SMTPStage,
    SMTPTimedOut,
    verify,
)
from tests.servers import smtp as smtp_servers
from tests.servers.smtp import SmtpSink
from tests.smtp.support import TEST_TIMEOUTS, message, server_for

SinkFactory = Callable[..., SmtpSink]
SOFT = 450  # smtp-sink's soft bounce: "450 4.3.0 Error: command failed"
HARD = 500  # smtp-sink's hard bounce: "500 5.3.0 Error: command failed"
CLOSING = 421
E = SMTPErrorCode
S = SMTPStage

# faults, error class, code, stage, reply code, transient, session still usable
TRANSACTION_FAULTS = [
    ({"soft_reject": ["MAIL"]}, SMTPReplyError, E.DEFERRED, S.MAIL, SOFT, True, True),
    ({"hard_reject": ["MAIL"]}, SMTPReplyError, E.REJECTED, S.MAIL, HARD, False, True),
    ({"soft_reject": ["RCPT"]}, SMTPAllRecipientsRefused, E.DEFERRED, S.RCPT, SOFT, True, True),
    ({"hard_reject": ["RCPT"]}, SMTPAllRecipientsRefused, E.REJECTED, S.RCPT, HARD, False, True),
    ({"soft_reject": ["DATA"]}, SMTPReplyError, E.DEFERRED, S.DATA, SOFT, True, True),
    ({"hard_reject": ["DATA"]}, SMTPReplyError, E.REJECTED, S.DATA, HARD, False, True),
    ({"soft_reject": ["."]}, SMTPReplyError, E.DEFERRED, S.MESSAGE, SOFT, True, True),
    ({"hard_reject": ["."]}, SMTPReplyError, E.REJECTED, S.MESSAGE, HARD, False, True),
    ({"reply_421": ["MAIL"]}, SMTPReplyError, E.DEFERRED, S.MAIL, CLOSING, True, False),
    ({"reply_421": ["RCPT"]}, SMTPReplyError, E.DEFERRED, S.RCPT, CLOSING, True, False),
    ({"reply_421": ["DATA"]}, SMTPReplyError, E.DEFERRED, S.DATA, CLOSING, True, False),
    ({"reply_421": ["."]}, SMTPReplyError, E.DEFERRED, S.MESSAGE, CLOSING, True, False),
    ({"disconnect": ["MAIL"]}, SMTPConnectionFailed, E.CONNECTION_LOST, S.MAIL, None, True, False),
    ({"disconnect": ["RCPT"]}, SMTPConnectionFailed, E.CONNECTION_LOST, S.RCPT, None, True, False),
    ({"disconnect": ["DATA"]}, SMTPConnectionFailed, E.CONNECTION_LOST, S.DATA, None, True, False),
    ({"disconnect": ["."]}, SMTPConnectionFailed, E.CONNECTION_LOST, S.MESSAGE, None, True, False),
]


@pytest.mark.parametrize(
    ("faults", "kind", "code", "stage", "smtp_code", "transient", "usable"),
    TRANSACTION_FAULTS,
    ids=[f"{next(iter(f[0]))}-{next(iter(f[0].values()))[0]}" for f in TRANSACTION_FAULTS],
)
async def test_transaction_faults_are_classified(
    smtp_sink_factory: SinkFactory,
    faults: dict[str, Any],
    kind: type[SMTPDeliveryError],
    code: SMTPErrorCode,
    stage: SMTPStage,
    smtp_code: int | None,
    transient: bool,
    usable: bool,
) -> None:
    sink = smtp_sink_factory(**faults)
    composed = message()
    async with SMTPSession(server_for(sink)) as session:
        with pytest.raises(kind) as caught:
            await session.send(composed.mail_from, composed.recipients, composed.data)
        assert session.usable is usable
    error = caught.value
    assert type(error) is kind
    assert (error.code, error.stage, error.smtp_code, error.transient) == (
        code,
        stage,
        smtp_code,
        transient,
    )
    assert not error.account_level


@pytest.mark.parametrize(
    ("faults", "kind", "code", "stage", "transient"),
    [
        ({"soft_reject": ["CONNECT"]}, SMTPReplyError, E.DEFERRED, S.GREETING, True),
        ({"hard_reject": ["CONNECT"]}, SMTPReplyError, E.REJECTED, S.GREETING, False),
        ({"reply_421": ["CONNECT"]}, SMTPReplyError, E.DEFERRED, S.GREETING, True),
        ({"disconnect": ["CONNECT"]}, SMTPConnectionFailed, E.CONNECT_FAILED, S.GREETING, True),
        ({"soft_reject": ["EHLO"]}, SMTPReplyError, E.DEFERRED, S.EHLO, True),
        ({"reply_421": ["EHLO"]}, SMTPReplyError, E.DEFERRED, S.EHLO, True),
        ({"disconnect": ["EHLO"]}, SMTPConnectionFailed, E.CONNECTION_LOST, S.EHLO, True),
    ],
)
async def test_opening_faults_are_classified(
    smtp_sink_factory: SinkFactory,
    faults: dict[str, Any],
    kind: type[SMTPDeliveryError],
    code: SMTPErrorCode,
    stage: SMTPStage,
    transient: bool,
) -> None:
    sink = smtp_sink_factory(**faults)
    session = SMTPSession(server_for(sink))
    with pytest.raises(kind) as caught:
        await session.open()
    assert (caught.value.code, caught.value.stage, caught.value.transient) == (
        code,
        stage,
        transient,
    )
    assert not session.usable
    assert session.steps[-1].ok is False
    assert session.steps[-1].code == str(code)


async def test_a_server_without_ehlo_is_spoken_to_with_helo(smtp_sink_factory: SinkFactory) -> None:
    sink = smtp_sink_factory(hard_reject=["EHLO"], dump=True)
    async with SMTPSession(server_for(sink)) as session:
        assert session.extensions == {}
        await session.send("sender@example.com", ["rcpt@example.org"], b"x")
    (dumped,) = sink.messages()
    assert dumped.mail_args == "<sender@example.com>"  # no SIZE: the server is not ESMTP


@pytest.mark.parametrize(
    ("delay", "timeouts", "stage"),
    [
        ({"CONNECT": 5}, {"greeting": 0.3}, S.GREETING),
        ({"MAIL": 5}, {"mail": 0.3}, S.MAIL),
        ({"RCPT": 5}, {"rcpt": 0.3}, S.RCPT),
        ({"DATA": 5}, {"data_initiation": 0.3}, S.DATA),
        ({".": 5}, {"data_block": 0.15, "data_termination": 0.15}, S.MESSAGE),
    ],
)
async def test_a_silent_server_times_out_transiently(
    smtp_sink_factory: SinkFactory,
    delay: dict[str, int],
    timeouts: dict[str, float],
    stage: SMTPStage,
) -> None:
    # smtp-sink answers pipelined commands out of order while it delays one (a 503 to RCPT
    # before the delayed 250 to MAIL): a silent MAIL or RCPT is shown with PIPELINING off.
    sink = smtp_sink_factory(delay=delay, extra_args=["-p"] if stage in (S.MAIL, S.RCPT) else [])
    server = server_for(sink, timeouts=dataclasses.replace(TEST_TIMEOUTS, **timeouts))
    session = SMTPSession(server)
    with pytest.raises(SMTPTimedOut) as caught:
        await session.open()
        await session.send("sender@example.com", ["rcpt@example.org"], b"x")
    assert isinstance(caught.value, TimeoutError)
    assert (caught.value.code, caught.value.stage, caught.value.transient) == (
        E.TIMEOUT,
        stage,
        True,
    )
    assert not session.usable
    await session.close()


async def test_many_messages_over_one_session_arrive_intact(smtp_sink_factory: SinkFactory) -> None:
    sink = smtp_sink_factory(dump=True)
    sent = [
        message(
            to=[f"rcpt{i}@example.org"],
            cc=["copy@example.org"],
            message_id=f"<sink-{i}@example.com>",
            text=f".line starting with a dot\n.\nmessage {i}\r\n..two dots\r",
        )
        for i in range(5)
    ]
    async with SMTPSession(server_for(sink)) as session:
        for composed in sent:
            await session.send(composed.mail_from, composed.recipients, composed.data)
        assert session.messages_sent == 5
    dumped = sink.messages()
    assert len(dumped) == 5
    by_id = {m.content.split(b"Message-ID: ")[1].split(b"\n")[0]: m for m in dumped}
    for composed in sent:
        got = by_id[composed.message_id.encode()]
        assert got.content == composed.data.replace(b"\r\n", b"\n")  # smtp-sink stores LF
        assert got.mail_args == "<sender@example.com>"
        assert got.rcpt_args == tuple(f"<{r}>" for r in composed.recipients)


async def test_auth_faults(smtp_sink_factory: SinkFactory) -> None:
    login = {"username": "u", "password": "p", "allow_insecure_auth": True}
    hard = smtp_sink_factory(hard_reject=["AUTH"])
    with pytest.raises(SMTPAuthError) as caught:
        async with SMTPSession(server_for(hard, **login)):
            pass
    assert (caught.value.code, caught.value.smtp_code, caught.value.transient) == (
        E.AUTH_FAILED,
        HARD,
        False,
    )

    soft = smtp_sink_factory(soft_reject=["AUTH"])
    with pytest.raises(SMTPAuthError) as caught:
        async with SMTPSession(server_for(soft, **login)):
            pass
    assert (caught.value.code, caught.value.smtp_code, caught.value.transient) == (
        E.AUTH_FAILED,
        SOFT,
        True,
    )
    assert caught.value.account_level

    no_auth = smtp_sink_factory(extra_args=["-a"])  # smtp-sink: do not announce AUTH
    with pytest.raises(SMTPAuthError) as caught:
        async with SMTPSession(server_for(no_auth, **login)):
            pass
    assert caught.value.code is E.AUTH_NOT_SUPPORTED

    # smtp-sink answers AUTH with "250 Ok" instead of 235: not something to trust.
    plain = smtp_sink_factory()
    with pytest.raises(SMTPProtocolError) as caught_protocol:
        async with SMTPSession(server_for(plain, **login)):
            pass
    assert (caught_protocol.value.code, caught_protocol.value.smtp_code) == (E.PROTOCOL_ERROR, 250)


async def test_verify_against_a_sink(smtp_sink_factory: SinkFactory) -> None:
    sink = smtp_sink_factory()
    (step,) = await verify(server_for(sink))
    assert step.ok and "220 smtp-sink.mailroom.test" in step.detail


def test_smtp_sink_is_stopped_by_pid(smtp_sink_factory: SinkFactory) -> None:
    sink = smtp_sink_factory()
    sink.stop()
    assert sink.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(sink.pid, 0)


def test_a_missing_smtp_sink_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smtp_servers, "SMTP_SINK", "/nonexistent/smtp-sink")
    with pytest.raises(RuntimeError, match="install the Debian package postfix"):
        smtp_servers.start_smtp_sink()
