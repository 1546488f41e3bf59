"""The session deadline and the minimum transfer rate, against trickling scripted servers.

Dovecot never trickles, so these faults are staged by small asyncio servers. Nothing here
asserts on time: each test checks which error ends the session (or that none does).
"""

from __future__ import annotations

import asyncio

import pytest

from service.domain.enums import Security
from service.pop3 import (
    POP3Client,
    POP3TimeoutError,
    SessionDeadlineExceeded,
    TransferTooSlow,
)

from .conftest import StartServer
from .fault_server import MiniPOP3, Session, dot_stuff

BIG = b"Subject: slow\r\n\r\n" + b"x" * 76 * 2000 + b"\r\n"


def trickle(chunk: int, pause: float) -> object:
    """A RETR reply that sends ``chunk`` bytes every ``pause`` seconds."""

    async def reply(session: Session, line: bytes) -> bool:
        number = int(line.split()[1])
        data = b"+OK\r\n" + dot_stuff(MESSAGES[number - 1])
        for start in range(0, len(data), chunk):
            session.send(data[start : start + chunk])
            await session.writer.drain()
            await asyncio.sleep(pause)
        return False

    return reply


MESSAGES = [b"Subject: fast\r\n\r\nhello\r\n", BIG]


def client(port: int, **kwargs: object) -> POP3Client:
    kwargs.setdefault("timeout", 10)
    return POP3Client("localhost", port, Security.NONE, **kwargs)  # type: ignore[arg-type]


async def test_deadline_ends_a_trickling_retr_and_deletes_nothing(serve: StartServer) -> None:
    mini = MiniPOP3(messages=list(MESSAGES), replies={"RETR": trickle(1, 0.01)})
    server = await serve(mini)
    pop = client(server.port, session_timeout=1.0)
    with pytest.raises(SessionDeadlineExceeded) as caught:
        async with pop:
            await pop.login("alice", "secret")
            await pop.dele(1)
            await pop.retr(2)  # each byte comes well within the 10 s step timeout
    assert caught.value.code == "timeout"
    assert caught.value.detail == "the POP3 session ran past its limit of 1 s"
    assert isinstance(caught.value, POP3TimeoutError)
    await asyncio.sleep(0.05)
    assert "QUIT" not in server.commands()  # dropped: the DELE marked above is void
    assert mini.deleted_at_quit == []
    assert not pop.usable


async def test_deadline_bounds_a_server_that_never_greets(serve: StartServer) -> None:
    async def silent(session: Session) -> None:
        await asyncio.sleep(3600)

    server = await serve(silent)
    with pytest.raises(SessionDeadlineExceeded):
        await client(server.port, session_timeout=0.5).connect()


async def test_a_transfer_below_the_minimum_rate_is_abandoned(serve: StartServer) -> None:
    # About 100 bytes/s against a minimum of 1,000 bytes/s over 0.3 s windows.
    mini = MiniPOP3(messages=list(MESSAGES), replies={"RETR": trickle(5, 0.05)})
    server = await serve(mini)
    pop = client(server.port, min_rate=1000, rate_window=0.3)
    with pytest.raises(TransferTooSlow) as caught:
        async with pop:
            await pop.login("alice", "secret")
            await pop.retr(2)
    assert caught.value.code == "timeout"
    assert "below the minimum rate of 1000 bytes/s" in caught.value.detail
    assert "QUIT" not in server.commands()


async def test_a_transfer_above_the_minimum_rate_completes(serve: StartServer) -> None:
    # The same windows and minimum, but about 160,000 bytes/s: several windows, all full.
    mini = MiniPOP3(messages=list(MESSAGES), replies={"RETR": trickle(8000, 0.05)})
    server = await serve(mini)
    async with client(server.port, min_rate=1000, rate_window=0.3) as pop:
        await pop.login("alice", "secret")
        assert await pop.retr(2) == BIG


async def test_slow_small_replies_are_not_a_slow_transfer(serve: StartServer) -> None:
    # Each NOOP is answered after 0.2 s with a few bytes: together far more waiting than
    # one window at far less than the minimum rate, but each reply is complete, so the
    # rate (measured within a reply) does not abandon the session.
    async def slow_noop(session: Session, line: bytes) -> bool:
        await asyncio.sleep(0.2)
        session.send(b"+OK\r\n")
        return False

    mini = MiniPOP3(messages=list(MESSAGES), replies={"NOOP": slow_noop})
    server = await serve(mini)
    async with client(server.port, min_rate=1000, rate_window=0.3) as pop:
        await pop.login("alice", "secret")
        for _ in range(5):
            await pop.noop()
    assert server.commands()[-1] == "QUIT"


def test_limits_are_checked() -> None:
    for kwargs in ({"session_timeout": 0}, {"min_rate": -1}, {"rate_window": 0}):
        with pytest.raises(ValueError):
            client(110, **kwargs)
