"""Short probe connections that tell which TLS mode a mail server port speaks.

A common mix-up is a TLS mode that does not fit the port: STARTTLS (or none) against an
implicit-TLS port (POP3 995, SMTP 465) waits for a greeting that never comes, and implicit
TLS against a plain port (110, 587, 25) fails its handshake on the server's plaintext
greeting. When a check fails that way, one more connection asks the server itself: does
a TLS handshake complete, or does the server greet in plain text? Nothing is sent but a
TLS ClientHello, and nothing is read but the greeting.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from enum import StrEnum

# A greeting line longer than this is not one (POP3 and SMTP lines are at most 512 bytes).
MAX_GREETING_BYTES = 512
_POP3_GREETING = re.compile(rb"^[+]OK\b")
_SMTP_GREETING = re.compile(rb"^[2-5][0-9][0-9][ -]")


class MailProtocol(StrEnum):
    """Which protocol a probed port is expected to speak."""

    POP3 = "pop3"
    SMTP = "smtp"


def _probe_context() -> ssl.SSLContext:
    # Only asks whether the port speaks TLS at all: no data is exchanged over it, so the
    # certificate does not matter here (the real connection verifies it).
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def speaks_tls(address: str, port: int, server_name: str, timeout_s: float) -> bool:
    """Whether a TLS handshake with ``address:port`` completes within ``timeout_s``."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(
                address,
                port,
                ssl=_probe_context(),
                server_hostname=server_name,
                ssl_handshake_timeout=timeout_s,
            )
    except (OSError, TimeoutError, ssl.SSLError):
        return False
    finally:
        if writer is not None:
            writer.transport.abort()  # no goodbye owed: nothing was said
    return True


async def plain_greeting(
    address: str, port: int, protocol: MailProtocol, timeout_s: float
) -> str | None:
    """The server's plaintext greeting line on ``address:port``, if it sends one in time."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(address, port)
            line = await reader.readuntil(b"\n")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    finally:
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.transport.abort()
    line = line[:MAX_GREETING_BYTES].rstrip(b"\r\n")
    pattern = _POP3_GREETING if protocol is MailProtocol.POP3 else _SMTP_GREETING
    if not pattern.match(line):
        return None
    return line.decode("ascii", "replace")


def implicit_tls_hint(port: int, waited_s: float) -> str:
    """The detail of a greeting that never came on a port that speaks TLS."""
    return (
        f"no greeting within {waited_s:g} s; port {port} expects implicit TLS: set security to tls"
    )


def plaintext_hint(port: int) -> str:
    """The detail of a TLS handshake refused by a port that greets in plain text."""
    return (
        f"the server answered in plain text; port {port} expects STARTTLS: set security to starttls"
    )
