"""An authoritative DNS server on loopback (UDP and TCP) for tests, built on dnspython.

    async with running_dns({"example.test.": {"MX": ["10 mx.example.test."]},
                            "mx.example.test.": {"A": ["127.0.0.1"]}}) as server:
        server.address          # ("127.0.0.1", port): give it as MAILROOM_DNS_SERVERS
        server.queries          # [(name, type), ...] as asked

``dns_in_thread(records)`` (a plain ``with``) serves from its own thread instead.

Records are given as zone-file text per name and type. A name not in the table is
NXDOMAIN; a known name without the type asked gets an empty NOERROR answer. Both
transports answer from the same table: dnspython falls back to TCP on a truncated reply,
and TCP is also how a large SRV set arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

LOOPBACK = "127.0.0.1"
TTL = 60
Records = Mapping[str, Mapping[str, list[str]]]


@dataclass
class DNSServer:
    """A running server: its address and the questions it was asked."""

    host: str
    port: int
    records: dict[dns.name.Name, dict[int, list[str]]]
    queries: list[tuple[str, str]] = field(default_factory=list)
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def setting(self) -> str:
        """The value of ``MAILROOM_DNS_SERVERS`` that points at this server."""
        return f"{self.host}:{self.port}"

    def answer(self, wire: bytes) -> bytes | None:
        """The wire-format reply to one query (``None`` for a message that is no query)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            self.queries.append((question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
            table = self.records.get(question.name)
            if table is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                continue
            texts = table.get(question.rdtype, [])
            if texts:
                rrset = dns.rrset.from_text_list(
                    question.name, TTL, dns.rdataclass.IN, question.rdtype, texts
                )
                response.answer.append(rrset)
        return response.to_wire()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def start_dns(records: Records, host: str = LOOPBACK) -> DNSServer:
    """Serve ``records`` on one free port, UDP and TCP."""
    table: dict[dns.name.Name, dict[int, list[str]]] = {}
    for name, types in records.items():
        entry = table.setdefault(dns.name.from_text(name), {})
        for kind, texts in types.items():
            entry[dns.rdatatype.from_text(kind)] = list(texts)
    loop = asyncio.get_running_loop()
    server = DNSServer(host, 0, table)

    async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = server.answer(await reader.readexactly(length))
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    # The TCP port first (kernel-chosen), then UDP on the same number.
    for _ in range(20):
        tcp = await asyncio.start_server(serve_tcp, host, 0)
        port = tcp.sockets[0].getsockname()[1]
        try:
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UDP(server), local_addr=(host, port)
            )
        except OSError:
            tcp.close()
            await tcp.wait_closed()
            continue
        server.port, server._tcp, server._udp = port, tcp, udp
        return server
    raise RuntimeError("no free port for the DNS server")


@contextlib.asynccontextmanager
async def running_dns(records: Records, host: str = LOOPBACK) -> AsyncIterator[DNSServer]:
    server = await start_dns(records, host)
    try:
        yield server
    finally:
        await server.stop()


@contextlib.contextmanager
def dns_in_thread(records: Records, host: str = LOOPBACK) -> Iterator[DNSServer]:
    """:func:`running_dns` in its own thread and event loop: for an app under test that
    runs in a portal thread while the test's loop waits on it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        server = asyncio.run_coroutine_threadsafe(start_dns(records, host), loop).result(30)
        try:
            yield server
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
