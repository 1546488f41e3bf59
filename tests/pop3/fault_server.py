"""Small scripted POP3 servers (asyncio, loopback) for faults Dovecot will not produce.

A :class:`ScriptedServer` runs ``handler(session)`` for each connection. A
:class:`Session` records every line the client sent (``session.lines``) and notes which
commands arrived while an earlier one was still unanswered (``session.pipelined``).
:class:`MiniPOP3` is a small compliant server whose replies tests override one command
at a time to inject exactly one fault.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

Handler = Callable[["Session"], Awaitable[None]]


class Session:
    """One client connection as seen by a scripted server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.lines: list[bytes] = []
        #: Lines that were already buffered when the previous command was read.
        self.pipelined: list[bytes] = []
        self.received = bytearray()
        #: Set by MiniPOP3 (or an override) once the client has logged in.
        self.authenticated = False

    async def readline(self) -> bytes | None:
        """The next line without CRLF, or ``None`` at end of stream."""
        while b"\r\n" not in self.buffer:
            chunk = await self.reader.read(65536)
            if not chunk:
                return None
            self.buffer += chunk
            self.received += chunk
        line, _, rest = bytes(self.buffer).partition(b"\r\n")
        self.buffer = bytearray(rest)
        self.lines.append(line)
        if rest:
            self.pipelined.append(rest.split(b"\r\n", 1)[0])
        return line

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context)

    def abort(self) -> None:
        transport = self.writer.transport
        transport.abort()

    def commands(self) -> list[str]:
        """The verbs the client sent, upper-cased."""
        return [line.split(b" ", 1)[0].decode(errors="replace").upper() for line in self.lines]


class ScriptedServer:
    """A loopback server running ``handler`` per connection; use ``async with``."""

    def __init__(self, handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.sessions: list[Session] = []
        self.errors: list[BaseException] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(reader, writer)
        self.sessions.append(session)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(session)
            await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client hung up or failed TLS, which is what many tests provoke
        except asyncio.CancelledError:
            # Cancelled by __aexit__: end quietly (asyncio's start_server logs a cancelled
            # handler task as an error).
            pass
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    @property
    def session(self) -> Session:
        """The first (usually only) session."""
        return self.sessions[0]

    def commands(self) -> list[str]:
        """The verbs received over all sessions (none if TLS failed before any)."""
        return [verb for session in self.sessions for verb in session.commands()]


Reply = bytes | Callable[[Session, bytes], Awaitable[bool | None]]


def dot_stuff(message: bytes) -> bytes:
    """A message as a multi-line RETR body: dot-stuffed, with the terminator."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


@dataclass
class MiniPOP3:
    """A small compliant POP3 server over ``messages``; ``replies`` override commands.

    A reply override is either raw bytes to send, or an async callable
    ``(session, line) -> stop`` that writes what it wants and returns True to end the
    session. Deleted messages are removed from ``messages`` only at QUIT.
    """

    messages: list[bytes] = field(default_factory=list)
    capabilities: Sequence[str] = ("USER", "UIDL", "TOP", "PIPELINING")
    greeting: bytes = b"+OK mini POP3 ready\r\n"
    replies: dict[str, Reply] = field(default_factory=dict)
    user: str = "alice"
    password: str = "secret"
    listed_sizes: dict[int, int] = field(default_factory=dict)
    unique_ids: list[str] | None = None
    deleted_at_quit: list[int] = field(default_factory=list)

    async def __call__(self, session: Session) -> None:
        session.send(self.greeting)
        deleted: set[int] = set()
        while (line := await session.readline()) is not None:
            verb, _, arg = line.decode("utf-8", "replace").partition(" ")
            verb = verb.upper()
            override = self.replies.get(verb)
            if override is not None:
                if isinstance(override, bytes):
                    session.send(override)
                    continue
                if await override(session, line):
                    return
                continue
            if verb == "CAPA":
                body = "".join(f"{c}\r\n" for c in self.capabilities)
                session.send(f"+OK\r\n{body}.\r\n".encode())
            elif verb == "USER":
                session.send(b"+OK\r\n")
            elif verb == "PASS":
                session.authenticated = arg == self.password
                ok = session.authenticated
                session.send(b"+OK logged in\r\n" if ok else b"-ERR [AUTH] no\r\n")
            elif verb == "AUTH":
                session.authenticated = True
                session.send(b"+OK logged in\r\n")
            elif verb == "QUIT":
                if session.authenticated:
                    self.deleted_at_quit = sorted(deleted)
                session.send(b"+OK bye\r\n")
                return
            elif not session.authenticated:
                session.send(b"-ERR log in first\r\n")
            else:
                self._transaction(session, verb, arg, deleted)

    def _transaction(self, session: Session, verb: str, arg: str, deleted: set[int]) -> None:
        numbers = [n for n in range(1, len(self.messages) + 1) if n not in deleted]
        size = {n: self.listed_sizes.get(n, len(self.messages[n - 1])) for n in numbers}
        uids = self.unique_ids or [f"uid-{n}" for n in range(1, len(self.messages) + 1)]
        number = int(arg.split()[0]) if arg.split() and arg.split()[0].isdigit() else 0
        if verb in ("RETR", "TOP", "DELE") or (verb in ("LIST", "UIDL") and arg):
            if number not in size:
                session.send(b"-ERR no such message\r\n")
                return
        if verb == "STAT":
            session.send(f"+OK {len(numbers)} {sum(size.values())}\r\n".encode())
        elif verb == "LIST" and arg:
            session.send(f"+OK {number} {size[number]}\r\n".encode())
        elif verb == "LIST":
            body = "".join(f"{n} {size[n]}\r\n" for n in numbers)
            session.send(f"+OK\r\n{body}.\r\n".encode())
        elif verb == "UIDL" and arg:
            session.send(f"+OK {number} {uids[number - 1]}\r\n".encode())
        elif verb == "UIDL":
            body = "".join(f"{n} {uids[n - 1]}\r\n" for n in numbers)
            session.send(f"+OK\r\n{body}.\r\n".encode())
        elif verb == "RETR":
            session.send(b"+OK message follows\r\n" + dot_stuff(self.messages[number - 1]))
        elif verb == "DELE":
            deleted.add(number)
            session.send(b"+OK marked\r\n")
        elif verb in ("NOOP", "RSET"):
            if verb == "RSET":
                deleted.clear()
            session.send(b"+OK\r\n")
        else:
            session.send(b"-ERR unknown command\r\n")
