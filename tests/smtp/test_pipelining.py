"""RCPT pipelining (RFC 2920) against a real aiosmtpd that offers PIPELINING and Postfix's
smtp-sink: the replies are matched to the right recipients, and the commands really travel
together (all RCPTs reach the server before it has answered MAIL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import Envelope, Session

from service.smtp import RcptStatus, SMTPAllRecipientsRefused, SMTPReplyError, SMTPSession
from tests.servers.smtp import LOOPBACK, SMTPD_HOSTNAME, RecordingSMTP, SMTPDRecorder, SMTPDServer
from tests.smtp.support import server_for

SENDER = "sender@example.com"
WAIT_S = 30.0  # bound only


class PipeliningRecorder(SMTPDRecorder):
    """The recording handler, also announcing PIPELINING after EHLO."""

    async def handle_EHLO(
        self,
        server: AiosmtpdSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [responses[0], "250-PIPELINING", *responses[1:]]


@pytest.fixture
async def pipelining_smtpd(request: pytest.FixtureRequest) -> AsyncIterator[SMTPDServer]:
    options: dict[str, Any] = getattr(request, "param", {})
    recorder = PipeliningRecorder(**options)
    loop = asyncio.get_running_loop()
    protocols: list[RecordingSMTP] = []

    def factory() -> RecordingSMTP:
        protocol = RecordingSMTP(recorder, hostname=SMTPD_HOSTNAME, loop=loop)
        protocols.append(protocol)
        return protocol

    listener = await loop.create_server(factory, host=LOOPBACK, port=0)
    server = SMTPDServer(
        host=LOOPBACK,
        port=listener.sockets[0].getsockname()[1],
        tls="none",
        recorder=recorder,
        ca_file=None,
        users={},
        _server=listener,
        _protocols=protocols,
    )
    try:
        yield server
    finally:
        await server.stop()


MIXED = {
    "refused@example.org": "550 5.1.1 no such user",
    "later@example.org": "450 4.2.0 try again later",
}


@pytest.mark.parametrize("pipelining_smtpd", [{"rcpt_replies": MIXED}], indirect=True)
async def test_each_recipient_gets_its_own_reply(pipelining_smtpd: SMTPDServer) -> None:
    recipients = ["a@example.org", "refused@example.org", "b@example.org", "later@example.org"]
    async with SMTPSession(server_for(pipelining_smtpd)) as session:
        assert "pipelining" in session.extensions
        result = await session.send(SENDER, recipients, b"Subject: x\r\n\r\nbody\r\n")
        # The session goes on in step: a second message on the same connection.
        again = await session.send(SENDER, ["c@example.org"], b"Subject: y\r\n\r\nbody\r\n")
    assert [(o.address, o.status, o.smtp_code) for o in result.recipients] == [
        ("a@example.org", RcptStatus.ACCEPTED, 250),
        ("refused@example.org", RcptStatus.REJECTED, 550),
        ("b@example.org", RcptStatus.ACCEPTED, 250),
        ("later@example.org", RcptStatus.DEFERRED, 450),
    ]
    assert result.recipients[1].smtp_message == "5.1.1 no such user"
    assert [o.status for o in again.recipients] == [RcptStatus.ACCEPTED]
    first, second = pipelining_smtpd.messages
    assert first.rcpt_tos == ("a@example.org", "b@example.org")
    assert second.rcpt_tos == ("c@example.org",)


@pytest.mark.parametrize("pipelining_smtpd", [{"pause_before": "MAIL"}], indirect=True)
async def test_recipients_travel_with_mail_from(pipelining_smtpd: SMTPDServer) -> None:
    """While the server holds its reply to MAIL, every RCPT has already arrived."""
    recorder = pipelining_smtpd.recorder
    recipients = [f"r{i}@example.org" for i in range(5)]
    async with SMTPSession(server_for(pipelining_smtpd)) as session:
        sending = asyncio.create_task(session.send(SENDER, recipients, b"Subject: x\r\n\r\nz\r\n"))
        async with asyncio.timeout(WAIT_S):
            await recorder.paused.wait()
            while recorder.raw.count(b"RCPT TO:") < len(recipients):
                await asyncio.sleep(0.01)
        recorder.resume.set()
        result = await sending
    assert [o.status for o in result.recipients] == [RcptStatus.ACCEPTED] * 5
    assert pipelining_smtpd.messages[0].rcpt_tos == tuple(recipients)


@pytest.mark.parametrize(
    "pipelining_smtpd",
    [{"rcpt_replies": {"x@example.org": "550 no", "y@example.org": "550 no"}}],
    indirect=True,
)
async def test_all_refused_resets_and_stays_usable(pipelining_smtpd: SMTPDServer) -> None:
    async with SMTPSession(server_for(pipelining_smtpd)) as session:
        with pytest.raises(SMTPAllRecipientsRefused) as caught:
            await session.send(SENDER, ["x@example.org", "y@example.org"], b"x\r\n")
        assert [o.smtp_code for o in caught.value.recipients] == [550, 550]
        result = await session.send(SENDER, ["ok@example.org"], b"x\r\n")
    assert result.accepted == ("ok@example.org",)


@pytest.mark.parametrize(
    "pipelining_smtpd", [{"mail_reply": "553 5.1.8 bad sender"}], indirect=True
)
async def test_refused_sender_reads_every_reply(pipelining_smtpd: SMTPDServer) -> None:
    """MAIL refused: the RCPT replies (503) are read too, so the session stays in step."""
    async with SMTPSession(server_for(pipelining_smtpd)) as session:
        with pytest.raises(SMTPReplyError) as caught:
            await session.send(SENDER, ["a@example.org", "b@example.org"], b"x\r\n")
        assert (caught.value.smtp_code, caught.value.stage) == (553, "mail")
        assert session.usable
        await session.reset()  # answered in step: RSET gets its own 250


async def test_smtp_sink_takes_pipelined_recipients(smtp_sink_factory: Any) -> None:
    """smtp-sink offers PIPELINING only without faults configured: a plain send."""
    sink = smtp_sink_factory()
    recipients = ["a@example.org", "b@example.org", "c@example.org"]
    async with SMTPSession(server_for(sink)) as session:
        assert "pipelining" in session.extensions
        for _ in range(3):
            result = await session.send(SENDER, recipients, b"Subject: x\r\n\r\nz\r\n")
            assert result.accepted == tuple(recipients)
        assert session.usable
