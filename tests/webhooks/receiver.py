"""A webhook receiver on loopback for tests: records every request, verifies its signature
with the ``standardwebhooks`` library, and answers as scripted (e.g. 500 twice, then 200)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import standardwebhooks


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    verified_with: list[int]  # indexes of the secrets whose signature verified
    arrived: float = field(default_factory=time.monotonic)

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """``await Receiver().start()``; ``url``; ``secrets`` to verify with; ``script``: the
    statuses to answer next (then ``default_status``)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.secrets: list[str] = []
        self.script: list[int] = []
        self.default_status = 200
        self.extra_headers: dict[str, str] = {}
        self.delay_s = 0.0
        self.gate: asyncio.Event | None = None  # when set: answers wait until it is
        # The first event to arrive is answered 500 this many times (then as usual).
        self.fail_first_event = 0
        self._first_id: str | None = None
        self.close_connections = False
        self.connections = 0  # connections accepted
        self.on_request: Callable[[Received], None] | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/mailroom"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def verified(self) -> list[Received]:
        return [r for r in self.requests if r.verified_with]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HTTP/1.1 with keep-alive: requests on one connection until the client closes it
        (``close_connections``: one request per connection)."""
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                if not await self._answer(head, reader, writer):
                    return
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        verified = []
        for index, secret in enumerate(self.secrets):
            try:
                standardwebhooks.Webhook(secret).verify(body, headers)
                verified.append(index)
            except Exception:
                pass
        msg_id = headers.get("webhook-id")
        if self._first_id is None:
            self._first_id = msg_id
        if msg_id == self._first_id and self.fail_first_event > 0:
            self.fail_first_event -= 1
            status = 500
        else:
            status = self.script.pop(0) if self.script else self.default_status
        received = Received(headers, body, status, verified)
        self.requests.append(received)
        if self.on_request is not None:
            self.on_request(received)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.gate is not None:
            await self.gate.wait()
        reply = b"ok" if status < 300 else b"failure " + str(status).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.extra_headers.items())
        close = "Connection: close\r\n" if self.close_connections else ""
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(reply)}\r\n{extra}{close}\r\n".encode()
            + reply
        )
        await writer.drain()
        return not self.close_connections
