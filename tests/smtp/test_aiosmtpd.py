"""The SMTP sender against a real aiosmtpd that records what it received."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from service.domain.enums import Security
from service.smtp import (
    RcptStatus,
    SMTPAllRecipientsRefused,
    SMTPAuthError,
    SMTPConnectionFailed,
    SMTPErrorCode,
    SMTPExtensionMissing,
    SMTPReplyError,
    SMTPSecurityError,
    SMTPSession,
    SMTPStage,
    VerifyStepName,
    verify,
)
from tests.servers.smtp import SMTPDServer, SMTPTLSFiles
from tests.smtp.support import PASSWORD, message, server_for, with_login

Factory = Callable[..., Awaitable[SMTPDServer]]
BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def password_leaked(server: SMTPDServer) -> bool:
    """Whether the password reached the server in any form AUTH would use."""
    raw = server.recorder.raw
    secret = PASSWORD.encode()
    plain = base64.b64encode(b"\0alice\0" + secret)
    return secret in raw or plain in raw or base64.b64encode(secret) in raw


# -- delivery ----------------------------------------------------------------------------


async def test_one_session_sends_several_messages(smtpd: SMTPDServer) -> None:
    messages = [message(subject=f"n{i}", message_id=f"<m{i}@example.com>") for i in range(3)]
    async with SMTPSession(server_for(smtpd)) as session:
        for composed in messages:
            result = await session.send(composed.mail_from, composed.recipients, composed.data)
            assert result.accepted == ("rcpt@example.org",)
            assert (result.smtp_code, result.smtp_message) == (250, "2.0.0 OK queued as test")
        assert session.messages_sent == 3
        assert session.usable
    assert len(smtpd.recorder.sessions) == 1
    assert smtpd.commands == ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 3 + ["QUIT"]
    assert [m.data for m in smtpd.messages] == [c.data for c in messages]
    assert all(m.mail_from == "sender@example.com" for m in smtpd.messages)
    assert smtpd.messages[0].mail_options == (f"SIZE={len(messages[0].data)}",)


async def test_smuggling_attempts_in_a_body_arrive_as_one_message(smtpd: SMTPDServer) -> None:
    text = (
        "intro\n.\nbare LF dot\r\n.\r\nMAIL FROM:<evil@attacker.example>\r\n"
        "RCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled body\r\n.\r\n"
        "bare CR\r.\rLF-dot-CRLF\n.\r\nCRLF-dot-LF\r\n.\nQUIT\r\n"
    )
    composed = message(text=text)
    async with SMTPSession(server_for(smtpd)) as session:
        await session.send(composed.mail_from, composed.recipients, composed.data)
    assert smtpd.commands == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    (received,) = smtpd.messages
    assert received.rcpt_tos == ("rcpt@example.org",)
    assert received.data == composed.data  # byte for byte, dot-stuffing undone
    assert BARE_CR_OR_LF.search(received.data) is None
    raw = smtpd.recorder.raw
    assert raw.count(b"\r\n.\r\n") == 1  # the one real end of data
    assert b"\r\n..\r\nMAIL FROM:<evil@attacker.example>\r\n" in raw


async def test_raw_bytes_with_bare_line_ends_are_normalized_and_stuffed(smtpd: SMTPDServer) -> None:
    raw_message = b".leading dot\n.\nmiddle\r.\rend\r\n.\nMAIL FROM:<x@y.z>\n"
    async with SMTPSession(server_for(smtpd)) as session:
        await session.send("sender@example.com", ["rcpt@example.org"], raw_message)
    (received,) = smtpd.messages
    assert received.data == b".leading dot\r\n.\r\nmiddle\r\n.\r\nend\r\n.\r\nMAIL FROM:<x@y.z>\r\n"
    assert smtpd.commands == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert smtpd.recorder.raw.count(b"\r\n.\r\n") == 1


async def test_partial_recipient_failure(smtpd_factory: Factory) -> None:
    smtpd = await smtpd_factory(
        rcpt_replies={
            "gone@example.org": "550 5.1.1 No such user",
            "busy@example.org": "450 4.2.1 Mailbox busy",
        }
    )
    recipients = ["ok1@example.org", "gone@example.org", "busy@example.org", "ok2@example.org"]
    async with SMTPSession(server_for(smtpd)) as session:
        result = await session.send("sender@example.com", recipients, message().data)
    assert result.accepted == ("ok1@example.org", "ok2@example.org")
    assert result.rejected == ("gone@example.org",)
    assert result.deferred == ("busy@example.org",)
    outcomes = {r.address: (r.status, r.smtp_code, r.smtp_message) for r in result.recipients}
    assert outcomes["gone@example.org"] == (RcptStatus.REJECTED, 550, "5.1.1 No such user")
    assert outcomes["busy@example.org"] == (RcptStatus.DEFERRED, 450, "4.2.1 Mailbox busy")
    assert [r.address for r in result.recipients] == recipients
    (received,) = smtpd.messages
    assert received.rcpt_tos == ("ok1@example.org", "ok2@example.org")


@pytest.mark.parametrize(
    ("replies", "code", "transient"),
    [
        (
            {"a@example.org": "550 5.1.1 No", "b@example.org": "553 5.1.3 Bad"},
            SMTPErrorCode.REJECTED,
            False,
        ),
        (
            {"a@example.org": "550 5.1.1 No", "b@example.org": "452 4.2.2 Full"},
            SMTPErrorCode.DEFERRED,
            True,
        ),
    ],
)
async def test_all_recipients_refused_sends_nothing_and_keeps_the_session(
    smtpd_factory: Factory, replies: dict[str, str], code: SMTPErrorCode, transient: bool
) -> None:
    smtpd = await smtpd_factory(rcpt_replies=replies)
    async with SMTPSession(server_for(smtpd)) as session:
        with pytest.raises(SMTPAllRecipientsRefused) as caught:
            await session.send("sender@example.com", ["a@example.org", "b@example.org"], b"x")
        assert caught.value.code is code
        assert caught.value.transient is transient
        assert caught.value.stage is SMTPStage.RCPT
        assert [r.smtp_code for r in caught.value.recipients] == [
            int(replies[a][:3]) for a in ("a@example.org", "b@example.org")
        ]
        # The envelope was reset, and the next message goes through the same connection.
        assert session.usable
        await session.send("sender@example.com", ["ok@example.org"], b"y")
    assert smtpd.commands == [
        "EHLO",
        "MAIL",
        "RCPT",
        "RCPT",
        "RSET",
        "MAIL",
        "RCPT",
        "DATA",
        "QUIT",
    ]
    assert [m.rcpt_tos for m in smtpd.messages] == [("ok@example.org",)]


@pytest.mark.parametrize(
    ("reply", "code", "transient"),
    [
        ("550 5.7.1 Sender blocked", SMTPErrorCode.REJECTED, False),
        ("451 4.3.0 Try later", SMTPErrorCode.DEFERRED, True),
    ],
)
async def test_refused_sender(
    smtpd_factory: Factory, reply: str, code: SMTPErrorCode, transient: bool
) -> None:
    smtpd = await smtpd_factory(mail_reply=reply)
    async with SMTPSession(server_for(smtpd)) as session:
        with pytest.raises(SMTPReplyError) as caught:
            await session.send("sender@example.com", ["rcpt@example.org"], b"x")
        assert session.usable
    error = caught.value
    assert (error.code, error.transient, error.stage) == (code, transient, SMTPStage.MAIL)
    assert (error.smtp_code, error.smtp_message) == (int(reply[:3]), reply[4:])
    assert "RCPT" not in smtpd.commands


@pytest.mark.parametrize(
    ("reply", "code", "transient"),
    [
        ("554 5.6.0 Content rejected", SMTPErrorCode.REJECTED, False),
        ("452 4.3.1 Queue full", SMTPErrorCode.DEFERRED, True),
    ],
)
async def test_refused_message_after_the_final_dot(
    smtpd_factory: Factory, reply: str, code: SMTPErrorCode, transient: bool
) -> None:
    smtpd = await smtpd_factory(
        data_reply=reply, rcpt_replies={"gone@example.org": "550 5.1.1 No such user"}
    )
    async with SMTPSession(server_for(smtpd)) as session:
        with pytest.raises(SMTPReplyError) as caught:
            await session.send("sender@example.com", ["rcpt@example.org", "gone@example.org"], b"x")
        assert session.usable
        assert await session.check()
    error = caught.value
    assert (error.code, error.transient, error.stage) == (code, transient, SMTPStage.MESSAGE)
    # The RCPT verdicts travel with the error: the refused recipient stays refused.
    assert [(r.address, r.status) for r in error.recipients] == [
        ("rcpt@example.org", RcptStatus.ACCEPTED),
        ("gone@example.org", RcptStatus.REJECTED),
    ]


async def test_smtputf8_is_requested_when_an_address_needs_it(smtpd: SMTPDServer) -> None:
    composed = message(to=["josé@example.org"], subject="Olá")
    assert composed.smtputf8
    async with SMTPSession(server_for(smtpd)) as session:
        await session.send(composed.mail_from, composed.recipients, composed.data, smtputf8=True)
    (received,) = smtpd.messages
    assert received.rcpt_tos == ("josé@example.org",)
    assert "SMTPUTF8" in received.mail_options
    assert "BODY=8BITMIME" in received.mail_options
    assert received.data == composed.data


async def test_smtputf8_missing_on_the_server_is_a_permanent_error(smtpd_factory: Factory) -> None:
    smtpd = await smtpd_factory(smtputf8=False)
    async with SMTPSession(server_for(smtpd)) as session:
        with pytest.raises(SMTPExtensionMissing) as caught:
            await session.send("sender@example.com", ["josé@example.org"], b"x", smtputf8=True)
        assert session.usable
    assert caught.value.code is SMTPErrorCode.SMTPUTF8_NOT_SUPPORTED
    assert not caught.value.transient
    assert "MAIL" not in smtpd.commands


async def test_eight_bit_data_is_announced(smtpd: SMTPDServer) -> None:
    async with SMTPSession(server_for(smtpd)) as session:
        await session.send(
            "sender@example.com", ["rcpt@example.org"], "Subject: é\r\n\r\né".encode()
        )
    (received,) = smtpd.messages
    assert "BODY=8BITMIME" in received.mail_options


async def test_unsafe_envelope_input_is_a_programming_error(smtpd: SMTPDServer) -> None:
    async with SMTPSession(server_for(smtpd)) as session:
        for sender, recipients in [
            ("sender@example.com", []),
            ("sender@example.com", ["a@example.org>\r\nRCPT TO:<b@example.org"]),
            ("s@example.com> SIZE=1", ["a@example.org"]),
            ("", ["a@example.org"]),
        ]:
            with pytest.raises(ValueError):
                await session.send(sender, recipients, b"x")
    assert smtpd.commands == ["EHLO", "QUIT"]


# -- session health ------------------------------------------------------------------------


async def test_reset_and_check(smtpd: SMTPDServer) -> None:
    async with SMTPSession(server_for(smtpd)) as session:
        await session.reset()
        assert await session.check()
    assert smtpd.commands == ["EHLO", "RSET", "NOOP", "QUIT"]


async def test_a_dropped_connection_is_noticed_and_transient(smtpd_factory: Factory) -> None:
    smtpd = await smtpd_factory()
    session = SMTPSession(server_for(smtpd))
    await session.open()
    await smtpd.stop()  # drops the open connection
    with pytest.raises(SMTPConnectionFailed) as caught:
        await session.send("sender@example.com", ["rcpt@example.org"], b"x")
    assert caught.value.code is SMTPErrorCode.CONNECTION_LOST
    assert caught.value.transient
    assert caught.value.stage is SMTPStage.MAIL  # nothing of the message was sent
    assert not session.usable
    assert not await session.check()
    await session.close()


async def test_check_notices_a_dead_connection(smtpd_factory: Factory) -> None:
    smtpd = await smtpd_factory()
    async with SMTPSession(server_for(smtpd)) as session:
        assert await session.check()
        await smtpd.stop()
        assert not await session.check()
        assert not session.usable


# -- TLS policy ------------------------------------------------------------------------------


async def test_starttls_then_auth_then_send(smtpd_starttls: SMTPDServer) -> None:
    async with SMTPSession(with_login(smtpd_starttls)) as session:
        assert session.encrypted
        await session.send("sender@example.com", ["rcpt@example.org"], message().data)
    assert smtpd_starttls.commands == [
        "EHLO",
        "STARTTLS",
        "EHLO",
        "AUTH PLAIN",
        "MAIL",
        "RCPT",
        "DATA",
        "QUIT",
    ]
    (received,) = smtpd_starttls.messages
    assert received.tls
    assert received.login == "alice"


async def test_stripped_starttls_fails_before_any_auth(smtpd_no_starttls: SMTPDServer) -> None:
    with pytest.raises(SMTPSecurityError) as caught:
        async with SMTPSession(with_login(smtpd_no_starttls, security=Security.STARTTLS)):
            pass
    error = caught.value
    assert error.code is SMTPErrorCode.TLS_REQUIRED
    assert error.account_level and not error.transient
    assert smtpd_no_starttls.commands == ["EHLO"]  # the server offered AUTH; none was sent
    assert not password_leaked(smtpd_no_starttls)


async def test_no_password_in_clear_unless_allowed(smtpd_no_starttls: SMTPDServer) -> None:
    with pytest.raises(SMTPSecurityError) as caught:
        async with SMTPSession(with_login(smtpd_no_starttls, security=Security.NONE)):
            pass
    assert caught.value.code is SMTPErrorCode.INSECURE_AUTH_REFUSED
    assert smtpd_no_starttls.commands == ["EHLO"]
    assert not password_leaked(smtpd_no_starttls)

    allowed = with_login(smtpd_no_starttls, security=Security.NONE, allow_insecure_auth=True)
    async with SMTPSession(allowed) as session:
        assert not session.encrypted
        await session.send("sender@example.com", ["rcpt@example.org"], b"x")
    assert smtpd_no_starttls.messages[0].login == "alice"


async def test_security_none_without_credentials_never_upgrades(
    smtpd_starttls: SMTPDServer,
) -> None:
    async with SMTPSession(server_for(smtpd_starttls, security=Security.NONE)) as session:
        assert not session.encrypted
    assert smtpd_starttls.commands == ["EHLO", "QUIT"]


async def test_implicit_tls(smtpd_tls: SMTPDServer) -> None:
    async with SMTPSession(with_login(smtpd_tls)) as session:
        assert session.encrypted
        await session.send("sender@example.com", ["rcpt@example.org"], b"x")
    assert smtpd_tls.commands == ["EHLO", "AUTH PLAIN", "MAIL", "RCPT", "DATA", "QUIT"]
    assert smtpd_tls.messages[0].tls


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_a_certificate_from_another_ca_is_refused(
    smtpd_factory: Factory, mode: str, smtp_tls_files: SMTPTLSFiles
) -> None:
    smtpd = await smtpd_factory(tls=mode, users={"alice": PASSWORD})
    wrong = with_login(smtpd, ca_file=smtp_tls_files.wrong_ca_file)
    with pytest.raises(SMTPSecurityError) as caught:
        async with SMTPSession(wrong):
            pass
    assert caught.value.code is SMTPErrorCode.TLS_CERTIFICATE_INVALID
    assert caught.value.account_level and not caught.value.transient
    assert smtpd.commands == (["EHLO", "STARTTLS"] if mode == "starttls" else [])
    assert not smtpd.messages


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_a_certificate_for_another_name_is_refused(smtpd_factory: Factory, mode: str) -> None:
    smtpd = await smtpd_factory(tls=mode)
    with pytest.raises(SMTPSecurityError) as caught:
        async with SMTPSession(server_for(smtpd, host="wrong-name.mailroom.test")):
            pass
    assert caught.value.code is SMTPErrorCode.TLS_CERTIFICATE_INVALID
    assert "wrong-name.mailroom.test" in caught.value.detail


async def test_connect_address_is_dialled_and_host_is_verified(smtpd_factory: Factory) -> None:
    # smtp.mailroom.test resolves nowhere: only connect_address can reach the server,
    # and the certificate is checked against the host name, which it carries.
    smtpd = await smtpd_factory(tls="implicit")
    server = server_for(smtpd, host="smtp.mailroom.test", connect_address="127.0.0.1")
    async with SMTPSession(server) as session:
        assert session.encrypted
        await session.send("sender@example.com", ["rcpt@example.org"], b"x")
    assert len(smtpd.messages) == 1


# -- authentication -----------------------------------------------------------------------------


async def test_wrong_password_is_auth_failed_and_not_retried(smtpd_starttls: SMTPDServer) -> None:
    with pytest.raises(SMTPAuthError) as caught:
        async with SMTPSession(with_login(smtpd_starttls, password="wrong")):
            pass
    error = caught.value
    assert (error.code, error.smtp_code, error.stage) == (
        SMTPErrorCode.AUTH_FAILED,
        535,
        SMTPStage.AUTH,
    )
    assert error.account_level and not error.transient
    assert (
        smtpd_starttls.commands.count("AUTH PLAIN") + smtpd_starttls.commands.count("AUTH LOGIN")
        == 1
    )
    assert "MAIL" not in smtpd_starttls.commands


# -- verify ------------------------------------------------------------------------------------


async def test_verify_reports_each_step(smtpd_starttls: SMTPDServer) -> None:
    steps = await verify(with_login(smtpd_starttls))
    assert [(s.step, s.ok, s.code) for s in steps] == [
        (VerifyStepName.CONNECT, True, None),
        (VerifyStepName.TLS, True, None),
        (VerifyStepName.AUTH, True, None),
    ]
    assert "220 smtpd.mailroom.test" in steps[0].detail
    assert "certificate verified for localhost" in steps[1].detail
    assert steps[2].detail == "PLAIN accepted"
    assert smtpd_starttls.commands[-1] == "QUIT"


async def test_verify_stops_at_the_failing_step(
    smtpd_starttls: SMTPDServer, smtpd_no_starttls: SMTPDServer, smtpd_factory: Factory
) -> None:
    wrong_password = await verify(with_login(smtpd_starttls, password="hunter2"))
    assert [(s.step, s.ok, s.code) for s in wrong_password] == [
        (VerifyStepName.CONNECT, True, None),
        (VerifyStepName.TLS, True, None),
        (VerifyStepName.AUTH, False, "auth_failed"),
    ]
    stripped = await verify(with_login(smtpd_no_starttls, security=Security.STARTTLS))
    assert [(s.step, s.ok, s.code) for s in stripped] == [
        (VerifyStepName.CONNECT, True, None),
        (VerifyStepName.TLS, False, "tls_required"),
    ]
    implicit = await smtpd_factory(tls="implicit")
    bad_name = await verify(server_for(implicit, host="wrong-name.mailroom.test"))
    assert [(s.step, s.ok, s.code) for s in bad_name] == [
        (VerifyStepName.CONNECT, True, None),
        (VerifyStepName.TLS, False, "tls_certificate_invalid"),
    ]
    for steps in (wrong_password, stripped, bad_name):
        assert all(PASSWORD not in s.detail and "hunter2" not in s.detail for s in steps)


async def test_verify_connection_refused(smtpd_factory: Factory) -> None:
    smtpd = await smtpd_factory()
    await smtpd.stop()  # nothing listens on that port any more
    (step,) = await verify(server_for(smtpd))
    assert (step.step, step.ok, step.code) == (VerifyStepName.CONNECT, False, "connect_failed")


async def test_cancelling_a_send_mid_dialogue_retires_the_connection(
    smtpd_factory: Factory,
) -> None:
    smtpd = await smtpd_factory(pause_before="DATA")
    async with SMTPSession(server_for(smtpd)) as session:
        sending = asyncio.create_task(
            session.send("sender@example.com", ["rcpt@example.org"], b"x")
        )
        await smtpd.recorder.paused.wait()  # the client now waits for the 354
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert not session.usable
        smtpd.recorder.resume.set()
    assert not smtpd.messages


async def test_a_replaced_ca_file_is_used_by_the_next_session(
    smtpd_factory: Factory, smtp_tls_files: SMTPTLSFiles, tmp_path: Path
) -> None:
    smtpd = await smtpd_factory(tls="implicit")
    ca_file = tmp_path / "ca.pem"
    shutil.copy(smtp_tls_files.wrong_ca_file, ca_file)
    with pytest.raises(SMTPSecurityError):
        async with SMTPSession(server_for(smtpd, ca_file=str(ca_file))):
            pass
    replacement = tmp_path / "ca.pem.new"
    shutil.copy(smtp_tls_files.ca_file, replacement)
    os.replace(replacement, ca_file)  # how CA bundles are rotated: atomic rename
    async with SMTPSession(server_for(smtpd, ca_file=str(ca_file))) as session:
        assert session.encrypted


async def test_a_missing_ca_file_is_a_tls_error(smtpd_factory: Factory, tmp_path: Path) -> None:
    smtpd = await smtpd_factory(tls="starttls")
    with pytest.raises(SMTPSecurityError) as caught:
        async with SMTPSession(server_for(smtpd, ca_file=str(tmp_path / "missing.pem"))):
            pass
    assert caught.value.code is SMTPErrorCode.TLS_FAILED
    assert smtpd.recorder.sessions == []  # refused before connecting
