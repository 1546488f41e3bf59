"""SMTP in the delivery child process (``service.services.delivery_process``).

The parent keeps every store write; the child speaks SMTP to real servers on loopback
(aiosmtpd, Postfix smtp-sink). A child killed mid-batch loses nothing: the message in
flight gets an ``interrupted`` attempt and is sent again (same Message-ID), the rest of
the batch goes back to the queue, and a new child takes over.
"""

from __future__ import annotations

import asyncio
import email
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from service.config import ConfigError, Role, Settings
from service.domain.enums import Security
from service.services.delivery import LocalSession
from service.services.delivery_process import (
    DeadlineReached,
    DeliveryProcess,
    DeliveryProcessLost,
    RemoteSession,
)
from service.smtp import (
    RcptStatus,
    SMTPAllRecipientsRefused,
    SMTPAuthError,
    SMTPReplyError,
    SMTPServer,
    SMTPStage,
)
from tests.outbox.conftest import (
    ClientFactory,
    create_account,
    get_message,
    in_app,
    send,
    wait_status,
)
from tests.servers.smtp import SMTPD_USERS, SMTPDServer, SmtpSink

WAIT_S = 30.0  # bound only: keeps a broken test from hanging
FAR = 60.0  # an attempt deadline no test here reaches


def deadline(seconds: float = FAR) -> float:
    return asyncio.get_running_loop().time() + seconds


def server_for(smtpd: SMTPDServer | SmtpSink, **changes: Any) -> SMTPServer:
    values: dict[str, Any] = {
        "host": smtpd.host,
        "port": smtpd.port,
        "security": Security.NONE,
        "local_hostname": "client.example",
    }
    values.update(changes)
    return SMTPServer(**values)


@pytest.fixture
async def process() -> AsyncIterator[DeliveryProcess]:
    started = DeliveryProcess()
    yield started
    await started.stop()


# -- the sessions themselves ----------------------------------------------------------------


async def test_a_remote_session_delivers_the_same_bytes_as_a_local_one(
    process: DeliveryProcess, smtpd: SMTPDServer
) -> None:
    data = b"Subject: hi\r\nMessage-ID: <a@example.com>\r\n\r\n.dot first\r\nbody\r\n"
    results = []
    for session in (process.session(server_for(smtpd)), LocalSession(server_for(smtpd))):
        await session.open(deadline())
        assert session.usable
        results.append(
            await session.send(
                "alice@example.com", ["bob@example.org"], data, smtputf8=False, deadline=deadline()
            )
        )
        await session.close()
        assert not session.usable
    remote, local = results
    assert remote == local
    assert [r.status for r in remote.recipients] == [RcptStatus.ACCEPTED]
    first, second = smtpd.recorder.messages
    assert first.data == second.data == data
    assert process.pid is not None and process.pid != os.getpid()


async def test_one_remote_session_sends_many_messages_on_one_connection(
    process: DeliveryProcess, smtpd: SMTPDServer
) -> None:
    session = process.session(server_for(smtpd))
    await session.open(deadline())
    for i in range(5):
        data = f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
        await session.send(
            "alice@example.com", ["bob@example.org"], data, smtputf8=False, deadline=deadline()
        )
    await session.close()
    assert len(smtpd.recorder.messages) == 5
    assert len(smtpd.recorder.sessions) == 1  # one connection for all five


def described(exc: BaseException) -> tuple[Any, ...]:
    """What the worker reads from an SMTP error."""
    return (
        type(exc),
        getattr(exc, "code", None),
        str(exc),
        getattr(exc, "stage", None),
        getattr(exc, "transient", None),
        getattr(exc, "account_level", None),
        getattr(exc, "smtp_code", None),
        getattr(exc, "smtp_message", None),
        getattr(exc, "recipients", None),
    )


async def test_errors_cross_the_pipe_with_their_class_and_verdicts(
    process: DeliveryProcess, smtpd_factory: Any, smtp_tls_files: Any
) -> None:
    refusing: SMTPDServer = await smtpd_factory(
        rcpt_replies={"gone@example.org": "550 5.1.1 no such user"}
    )
    seen: list[tuple[Any, ...]] = []
    for session in (process.session(server_for(refusing)), LocalSession(server_for(refusing))):
        await session.open(deadline())
        with pytest.raises(SMTPAllRecipientsRefused) as refused:
            await session.send(
                "alice@example.com",
                ["gone@example.org"],
                b"x\r\n",
                smtputf8=False,
                deadline=deadline(),
            )
        seen.append(described(refused.value))
        # An address unsafe on a command line is a ValueError in both.
        with pytest.raises(ValueError, match="not safe"):
            await session.send(
                "alice@example.com",
                ["a b@example.org"],
                b"x\r\n",
                smtputf8=False,
                deadline=deadline(),
            )
        await session.close()
    remote, local = seen
    assert remote == local
    assert isinstance(refused.value, SMTPReplyError) and refused.value.transient is False
    [outcome] = refused.value.recipients
    assert (outcome.address, outcome.status, outcome.smtp_code) == (
        "gone@example.org",
        RcptStatus.REJECTED,
        550,
    )

    auth: SMTPDServer = await smtpd_factory(
        tls="starttls", tls_files=smtp_tls_files, users=SMTPD_USERS
    )
    wrong = server_for(
        auth,
        security=Security.STARTTLS,
        username="alice",
        password="not-" + SMTPD_USERS["alice"],
        ca_file=smtp_tls_files.ca_file,
        host="localhost",
        connect_address="127.0.0.1",
    )
    seen = []
    for failing in (process.session(wrong), LocalSession(wrong)):
        with pytest.raises(SMTPAuthError) as failed:
            await failing.open(deadline())
        assert not failing.usable
        seen.append(described(failed.value))
    assert seen[0] == seen[1]
    assert failed.value.account_level and not failed.value.transient
    assert failed.value.smtp_code == 535


async def test_the_attempt_deadline_is_kept_in_the_child_and_names_the_stage(
    process: DeliveryProcess, smtp_sink_factory: Any
) -> None:
    # smtp-sink holds its reply to RCPT; without PIPELINING the stage is exact.
    sink: SmtpSink = smtp_sink_factory(delay={"RCPT": 60}, extra_args=["-p"])
    session = process.session(server_for(sink))
    await session.open(deadline())
    with pytest.raises(DeadlineReached):
        await session.send(
            "alice@example.com", ["bob@example.org"], b"x\r\n", smtputf8=False, deadline=deadline(1)
        )
    assert session.stage is SMTPStage.RCPT
    assert not session.usable


async def test_a_dead_child_fails_its_calls_and_a_new_one_starts(
    process: DeliveryProcess, smtpd_factory: Any
) -> None:
    held: SMTPDServer = await smtpd_factory(pause_before="DATA")
    session = process.session(server_for(held))
    await session.open(deadline())
    sending = asyncio.create_task(
        session.send(
            "alice@example.com", ["bob@example.org"], b"x\r\n", smtputf8=False, deadline=deadline()
        )
    )
    async with asyncio.timeout(WAIT_S):
        await held.recorder.paused.wait()
    first = process.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    with pytest.raises(DeliveryProcessLost):
        await sending
    assert not session.usable
    held.recorder.resume.set()
    # The next session starts a new child, which delivers.
    again = process.session(server_for(held))
    await again.open(deadline())
    await again.send(
        "alice@example.com", ["bob@example.org"], b"y\r\n", smtputf8=False, deadline=deadline()
    )
    await again.close()
    assert process.pid not in (None, first)
    assert process.restarts == 1
    # The transaction cut short never got its final dot: the server kept only the second.
    assert [m.data for m in held.recorder.messages] == [b"y\r\n"]


async def test_stop_ends_the_child(process: DeliveryProcess, smtpd: SMTPDServer) -> None:
    session = process.session(server_for(smtpd))
    await session.open(deadline())
    pid = process.pid
    assert pid is not None
    await process.stop()
    assert process.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped
    # Its session said QUIT on the way out.
    assert smtpd.recorder.sessions[-1].commands[-1] == "QUIT"


def test_remote_sessions_are_delivery_sessions() -> None:
    # Both kinds have what the worker uses (a Protocol, checked by mypy; here at run time).
    for kind in (RemoteSession, LocalSession):
        for name in ("open", "send", "close", "abort", "usable", "stage"):
            assert hasattr(kind, name), (kind, name)


# -- through the app ----------------------------------------------------------------------


def message_ids(server: SMTPDServer) -> list[str]:
    return [str(email.message_from_bytes(m.data)["Message-ID"]) for m in server.recorder.messages]


async def test_the_app_delivers_through_its_child_by_default(
    client_factory: ClientFactory, smtpd: SMTPDServer
) -> None:
    client = await client_factory()
    process = client.app.state.delivery_process
    assert isinstance(process, DeliveryProcess)
    account_id = await create_account(client, smtpd)
    accepted = await send(client, account_id)
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent", done
    assert process.pid is not None and process.pid != os.getpid()
    assert message_ids(smtpd) == [done["message_id"]]


async def test_off_delivers_in_the_process_itself(
    client_factory: ClientFactory, smtpd: SMTPDServer
) -> None:
    client = await client_factory(delivery_process="off")
    assert client.app.state.delivery_process is None
    account_id = await create_account(client, smtpd)
    accepted = await send(client, account_id)
    done = await wait_status(client, account_id, accepted["id"])
    assert done["status"] == "sent", done


async def test_a_child_killed_mid_batch_loses_nothing_and_sends_nothing_twice(
    client_factory: ClientFactory, smtpd_factory: Any
) -> None:
    client = await client_factory()
    held: SMTPDServer = await smtpd_factory(pause_before="DATA")
    account_id = await create_account(client, held)
    accepted = [(await send(client, account_id, subject=f"m{i}"))["id"] for i in range(3)]
    async with asyncio.timeout(WAIT_S):
        await held.recorder.paused.wait()
    process: DeliveryProcess = client.app.state.delivery_process
    first = process.pid
    assert first is not None
    # One session took all three (one claim); the first is in DATA, held by the server.
    os.kill(first, signal.SIGKILL)

    async def interrupted() -> dict[str, Any]:
        while True:
            for outgoing_id in accepted:
                body = await get_message(client, account_id, outgoing_id)
                if any(a["outcome"] == "interrupted" for a in body["attempts"]):
                    return body
            await asyncio.sleep(0.02)

    async with asyncio.timeout(WAIT_S):
        cut_short = await interrupted()
    held.recorder.resume.set()
    done = [await wait_status(client, account_id, outgoing_id) for outgoing_id in accepted]
    assert [d["status"] for d in done] == ["sent"] * 3, done
    # The one in flight: an interrupted attempt, then sent; the others were given back
    # unattempted and sent once.
    for body in done:
        outcomes = [a["outcome"] for a in body["attempts"]]
        expected = ["interrupted", "sent"] if body["id"] == cut_short["id"] else ["sent"]
        assert outcomes == expected, body
    # Killed before its final dot: the server has every message exactly once.
    assert sorted(message_ids(held)) == sorted(d["message_id"] for d in done)
    assert process.restarts == 1 and process.pid not in (None, first)


async def test_the_app_stops_its_child(client_factory: ClientFactory, smtpd: SMTPDServer) -> None:
    client = await client_factory()
    account_id = await create_account(client, smtpd)
    accepted = await send(client, account_id)
    await wait_status(client, account_id, accepted["id"])
    process: DeliveryProcess = client.app.state.delivery_process
    pid = process.pid
    assert pid is not None
    await in_app(client, client.app.state.delivery.stop)
    await in_app(client, process.stop)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_setting_chooses_where_smtp_runs() -> None:
    assert Settings.from_env({}).delivers_in_child  # auto, role all
    assert not Settings.from_env({"MAILROOM_DELIVERY_PROCESS": "off"}).delivers_in_child
    assert Settings.from_env({"MAILROOM_DELIVERY_PROCESS": "ON"}).delivers_in_child
    worker = Settings(role=Role.WORKER)
    assert not worker.delivers_in_child  # a worker process delivers and serves no API
    assert msgspec.structs.replace(worker, delivery_process="on").delivers_in_child
    with pytest.raises(ConfigError, match="MAILROOM_DELIVERY_PROCESS"):
        Settings.from_env({"MAILROOM_DELIVERY_PROCESS": "sometimes"})
