"""Several SMTP sessions per account, as many as the server allows.

The server is a real aiosmtpd behind a small connection-limiting front (a scripted fault:
a 421 greeting to connections over its limit, as Postfix's anvil limits do), since
aiosmtpd itself takes any number of connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.outbox.conftest import ClientFactory, create_account, send, wait_status
from tests.servers.smtp import SMTPDServer

WAIT_S = 30.0  # bound only


@dataclass
class ConnectionLimit:
    """A TCP front for ``backend`` that greets connections over ``limit`` with 421."""

    backend: SMTPDServer
    limit: int
    host: str = "127.0.0.1"
    port: int = 0
    tls: str = "none"  # what ``outgoing_for`` reads
    active: int = 0
    most: int = 0  # most connections passed through at once
    refused: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.limit:
            self.refused += 1
            writer.write(b"421 4.7.0 too many connections from your host\r\n")
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            back_reader, back_writer = await asyncio.open_connection(
                self.backend.host, self.backend.port
            )

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                with contextlib.suppress(OSError):
                    dst.close()

            await asyncio.gather(pipe(reader, back_writer), pipe(back_reader, writer))
        finally:
            self.active -= 1


@pytest.fixture
async def limited(smtpd_factory: Any) -> AsyncIterator[ConnectionLimit]:
    backend: SMTPDServer = await smtpd_factory(pause_before="DATA")
    front = ConnectionLimit(backend, limit=1)
    server = await asyncio.start_server(front.handle, front.host, 0)
    front.port = server.sockets[0].getsockname()[1]
    yield front
    backend.recorder.resume.set()
    server.close()


async def test_sessions_stop_at_what_the_server_allows_and_nothing_is_deferred(
    client_factory: ClientFactory, limited: ConnectionLimit, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom.delivery")
    client = await client_factory(smtp_concurrency=4)
    delivery = client.app.state.delivery
    # Two messages per claim, so eight due messages want four sessions.
    delivery._policy = dataclasses.replace(delivery._policy, claim_batch=2)
    account_id = await create_account(client, limited)  # type: ignore[arg-type]
    first = (await send(client, account_id))["id"]
    # The first session holds its connection (the server keeps its DATA waiting) while
    # the rest arrive and the dispatcher wants more sessions for them.
    async with asyncio.timeout(WAIT_S):
        await limited.backend.recorder.paused.wait()
    rest = [(await send(client, account_id, subject=f"m{i}"))["id"] for i in range(7)]
    async with asyncio.timeout(WAIT_S):
        while limited.refused == 0:
            await asyncio.sleep(0.02)
    limited.backend.recorder.resume.set()
    done = [await wait_status(client, account_id, i) for i in (first, *rest)]
    assert [d["status"] for d in done] == ["sent"] * 8
    # The refused sessions gave their messages back untried: no deferral, no backoff.
    assert all([a["outcome"] for a in d["attempts"]] == ["sent"] for d in done), done
    assert limited.most == 1
    account = (await client.get(f"/v1/accounts/{account_id}")).json()
    assert account["smtp_status"] == "ok"
    [event] = [
        dict(getattr(r, "fields", {}))
        for r in caplog.records
        if r.getMessage() == "smtp sessions limited by the server"
    ][:1]
    assert event["account_id"] == account_id and event["sessions"] >= 1
    assert len(limited.backend.recorder.messages) == 8
