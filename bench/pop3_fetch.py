"""Benchmark: download 2,000 messages of about 10 KB from a real Dovecot over loopback.

Compares, in one run and on the same mailbox:

(a) ``POP3Client.retrieve_many`` (pipelined RETR, chunked dot-unstuffing);
(b) the standard library's ``poplib``, one command at a time;
(c) a bare pipelined read over an asyncio socket that only counts terminators: the
    practical limit of the server and the loopback.

Each run is a whole session on the plain port: connect, log in, fetch everything, QUIT
(nothing is deleted). Runs are interleaved and repeated; medians are reported. The last
line is machine-readable::

    pop3_fetch: client_s=... poplib_s=... raw_s=... vs_poplib=... vs_raw=...

``vs_poplib`` is poplib's time over the client's (higher is better, target >= 3);
``vs_raw`` is the client's time over the raw read's (lower is better, target <= 1.5).

Run from the repository root: ``python bench/pop3_fetch.py [--messages N] [--repeat R]``.
Needs Dovecot (Debian ``dovecot-pop3d``) and root, like the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import poplib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.domain.enums import Security
from service.pop3 import POP3Client
from tests.servers.dovecot import Mailbox, running_dovecot

MESSAGES = 2000
MESSAGE_BYTES = 10 * 1024
REPEAT = 5
TERMINATOR = b"\r\n.\r\n"
RAW_WINDOW = 256


def make_message(index: int, size: int) -> bytes:
    """A plain-text message of about ``size`` bytes, CRLF line ends, a few dot lines."""
    head = (
        f"From: sender{index}@example.org\r\n"
        f"To: rcpt@example.net\r\n"
        f"Subject: benchmark message {index}\r\n"
        f"Message-ID: <bench.{index}@example.org>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = bytearray()
    while len(head) + len(body) < size:
        body += b".a line that starts with a dot\r\n" if len(body) % 1600 == 0 else line
    return head + bytes(body)


async def fetch_client(host: str, port: int, box: Mailbox) -> tuple[int, int]:
    count = total = 0
    async with POP3Client(host, port, Security.NONE, timeout=60) as client:
        await client.login(box.user, box.password)
        sizes = await client.list()
        async for _number, data in client.retrieve_many(sorted(sizes)):
            count += 1
            total += len(data)
    return count, total


def fetch_poplib(host: str, port: int, box: Mailbox) -> tuple[int, int]:
    count = total = 0
    client = poplib.POP3(host, port, timeout=60)
    try:
        client.user(box.user)
        client.pass_(box.password)
        _, listing, _ = client.list()
        for entry in listing:
            _, lines, _ = client.retr(int(entry.split()[0]))
            count += 1
            total += sum(len(line) + 2 for line in lines)
        client.quit()
    finally:
        client.close()
    return count, total


async def fetch_raw(host: str, port: int, box: Mailbox, messages: int) -> tuple[int, int]:
    """Pipelined RETRs over a bare asyncio stream, only counting terminators.

    No parsing, no unstuffing, nothing kept. Like the client it keeps a window of
    RETRs in flight (sending all 2,000 at once measured no faster here).
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()
        # USER and PASS one at a time, as the client does: pipelining them costs a 40 ms
        # delayed-ACK stall at Dovecot's login here, which would flatter the client.
        for command in (f"USER {box.user}\r\n", f"PASS {box.password}\r\n"):
            writer.write(command.encode())
            if not (await reader.readline()).startswith(b"+OK"):
                raise RuntimeError("raw login failed")
        sent = found = total = 0
        tail = b""
        while found < messages:
            if sent < messages and sent - found <= RAW_WINDOW // 2:
                stop = min(messages, found + RAW_WINDOW)
                writer.write(b"".join(b"RETR %d\r\n" % n for n in range(sent + 1, stop + 1)))
                sent = stop
            chunk = await reader.read(1 << 20)
            if not chunk:
                raise RuntimeError("connection closed early")
            total += len(chunk)
            # Count a terminator straddling two reads once: it needs bytes from both.
            found += (tail + chunk[:4]).count(TERMINATOR) + chunk.count(TERMINATOR)
            tail = chunk[-4:]
        writer.write(b"QUIT\r\n")
        await reader.readline()
        return found, total
    finally:
        writer.close()
        await writer.wait_closed()


def timed(action: Callable[[], tuple[int, int]], expected: int) -> float:
    start = time.perf_counter()
    count, _ = action()
    elapsed = time.perf_counter() - start
    if count != expected:
        raise RuntimeError(f"fetched {count} messages, expected {expected}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--size", type=int, default=MESSAGE_BYTES)
    parser.add_argument("--repeat", type=int, default=REPEAT)
    args = parser.parse_args()
    messages = [make_message(i, args.size) for i in range(args.messages)]
    with running_dovecot() as server:
        box = server.add_user()
        box.deliver_many(messages)
        host, port, n = server.host, server.pop3_port, args.messages

        # Check correctness once before timing: every byte, in order.
        async def check() -> None:
            async with POP3Client(host, port, Security.NONE) as client:
                await client.login(box.user, box.password)
                got = [d async for _, d in client.retrieve_many(range(1, n + 1))]
            if got != messages:
                raise RuntimeError("POP3Client returned different bytes than were delivered")

        asyncio.run(check())
        runs: dict[str, list[float]] = {"client": [], "poplib": [], "raw": []}
        for _ in range(args.repeat):
            runs["client"].append(timed(lambda: asyncio.run(fetch_client(host, port, box)), n))
            runs["poplib"].append(timed(lambda: fetch_poplib(host, port, box), n))
            runs["raw"].append(timed(lambda: asyncio.run(fetch_raw(host, port, box, n)), n))
    medians = {name: statistics.median(times) for name, times in runs.items()}
    megabytes = sum(map(len, messages)) / 1e6
    print(f"{n} messages, {megabytes:.1f} MB, {args.repeat} runs each (median, seconds):")
    for name, times in runs.items():
        print(f"  {name:7s} {medians[name]:.3f}  (runs: {', '.join(f'{t:.3f}' for t in times)})")
    print(
        f"pop3_fetch: client_s={medians['client']:.3f} poplib_s={medians['poplib']:.3f} "
        f"raw_s={medians['raw']:.3f} vs_poplib={medians['poplib'] / medians['client']:.2f} "
        f"vs_raw={medians['client'] / medians['raw']:.2f}"
    )


if __name__ == "__main__":
    main()
