"""SMTP sessions in a child process, so accepting and delivering use two cores.

Shape::

    API process (every store write)                    delivery child (no store)
    DeliveryWorker: plan, claim, record outcomes        python -m service.services.delivery_process
      RemoteSession.open / send / close / abort  ──>    SMTPSession per session id
                                                 <──    replies: usable, stage, result or error

The parent keeps everything that touches the store or decides policy (claims, leases,
outcomes, pauses, holds, tenant shares, the attempt deadline): the child only speaks SMTP.
Each request carries what one SMTP step needs: the server's settings with the decrypted
credentials (``open``), the envelope and the raw bytes (``send``). Frames are a 4-byte
big-endian length and a msgpack body, over a socket pair private to the two processes.

The child enforces the attempt deadline itself (a little before the parent's), so a
timeout still names the step the server stalled at; the parent's own deadline is the
backstop for a child that no longer answers.

If the child dies, every call waiting on it fails with :class:`DeliveryProcessLost`; the
worker records the message in flight as ``interrupted`` and gives the rest of its claim
back (exactly what a crash of the whole process leads to, sooner), and the next session
starts a new child (with a backoff when children keep dying at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from service.codes import ErrorCode
from service.smtp import (
    RecipientOutcome,
    SendResult,
    SMTPAllRecipientsRefused,
    SMTPAuthError,
    SMTPConnectionFailed,
    SMTPDeliveryError,
    SMTPExtensionMissing,
    SMTPProtocolError,
    SMTPReplyError,
    SMTPSecurityError,
    SMTPServer,
    SMTPSession,
    SMTPStage,
    SMTPTimedOut,
)

logger = logging.getLogger("mailroom.delivery")

START_TIMEOUT_S = 30.0  # a child that does not say ready within this is killed
STOP_TIMEOUT_S = 15.0  # a stopping child closes its sessions (QUIT) within this, or is killed
# The child gives up on an attempt this much before the parent's deadline, so its answer
# (with the step the server stalled at) arrives before the parent's backstop strikes.
DEADLINE_MARGIN_S = 0.05
RESPAWN_BACKOFF_S = 0.2  # after a child died soon after starting, doubling...
RESPAWN_BACKOFF_MAX_S = 5.0  # ...up to this
STABLE_AFTER_S = 10.0  # a child that lived this long resets the backoff
_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 31
READY = b"ready"


class DeliveryProcessLost(Exception):
    """The delivery child died or stopped while a call waited on it."""


class DeadlineReached(TimeoutError):
    """The attempt's deadline struck inside the child, which dropped the connection."""


# -- the wire -----------------------------------------------------------------------------


class OpenCall(msgspec.Struct, tag="open", array_like=True):
    id: int
    sid: int
    server: SMTPServer
    remaining_s: float


class SendCall(msgspec.Struct, tag="send", array_like=True):
    id: int
    sid: int
    mail_from: str
    recipients: list[str]
    data: bytes
    smtputf8: bool
    remaining_s: float


class CloseCall(msgspec.Struct, tag="close", array_like=True):
    id: int
    sid: int


class AbortCall(msgspec.Struct, tag="abort", array_like=True):
    sid: int


Call = OpenCall | SendCall | CloseCall | AbortCall


class ErrorSpec(msgspec.Struct, array_like=True):
    """An ``SMTPDeliveryError`` as data (its class by name)."""

    kind: str
    code: str
    detail: str
    stage: SMTPStage
    smtp_code: int | None
    smtp_message: str | None
    transient: bool
    account_level: bool
    recipients: tuple[RecipientOutcome, ...] = ()


class Reply(msgspec.Struct, array_like=True, omit_defaults=True):
    id: int
    usable: bool
    stage: SMTPStage
    result: SendResult | None = None
    error: ErrorSpec | None = None
    invalid: str | None = None  # ValueError: an address unsafe on a command line
    timed_out: bool = False
    crash: str | None = None  # a bug in the child: its text


_ERRORS: dict[str, type[SMTPDeliveryError]] = {
    cls.__name__: cls
    for cls in (
        SMTPDeliveryError,
        SMTPConnectionFailed,
        SMTPTimedOut,
        SMTPSecurityError,
        SMTPAuthError,
        SMTPReplyError,
        SMTPAllRecipientsRefused,
        SMTPProtocolError,
        SMTPExtensionMissing,
    )
}


def error_spec(exc: SMTPDeliveryError) -> ErrorSpec:
    """``exc`` as data for the other process."""
    kind = type(exc).__name__
    if kind not in _ERRORS:  # a subclass this module does not know: its nearest known base
        kind = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in _ERRORS)
    return ErrorSpec(
        kind=kind,
        code=str(exc.code),
        detail=exc.detail,
        stage=exc.stage,
        smtp_code=exc.smtp_code,
        smtp_message=exc.smtp_message,
        transient=exc.transient,
        account_level=exc.account_level,
        recipients=exc.recipients if isinstance(exc, SMTPReplyError) else (),
    )


def error_from(spec: ErrorSpec) -> SMTPDeliveryError:
    """The error ``spec`` describes, of the same class and with the same verdicts."""
    cls = _ERRORS[spec.kind]
    common: dict[str, Any] = {
        "stage": spec.stage,
        "smtp_code": spec.smtp_code,
        "smtp_message": spec.smtp_message,
        "transient": spec.transient,
        "account_level": spec.account_level,
    }
    if issubclass(cls, SMTPReplyError):
        return cls(ErrorCode(spec.code), spec.detail, recipients=spec.recipients, **common)
    return cls(ErrorCode(spec.code), spec.detail, **common)


_call_encoder = msgspec.msgpack.Encoder()
_call_decoder = msgspec.msgpack.Decoder(Call)
_reply_encoder = msgspec.msgpack.Encoder()
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(_LENGTH.size)
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ValueError("frame too large")
    return await reader.readexactly(length)


# -- the parent's side --------------------------------------------------------------------


# The child imports this package from where the parent did.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _popen(fd: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", __name__, str(fd)],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        env=env,
        close_fds=True,
    )


class _Child:
    """One running child: its process, its socket, and the calls waiting for replies."""

    def __init__(
        self, proc: subprocess.Popen[bytes], reader: asyncio.StreamReader, writer: Any
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.writer: asyncio.StreamWriter = writer
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.alive = True
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None


class DeliveryProcess:
    """Starts, watches and stops the delivery child; hands out :class:`RemoteSession`.

    The child starts on first use (an app that never sends spawns none) and again after
    it died; ``stop`` ends it (its open sessions say QUIT).
    """

    def __init__(self) -> None:
        self._child: _Child | None = None
        self._starting: asyncio.Lock | None = None
        self._next_id = 0
        self._next_sid = 0
        self._stopping = False
        self._quick_deaths = 0
        self._last_death = -float("inf")
        self.generation = 0  # one per child started: sessions of an older one are gone
        self.restarts = 0  # children started after one died

    @property
    def pid(self) -> int | None:
        """The running child's process id, if one runs."""
        child = self._child
        return child.proc.pid if child is not None and child.alive else None

    def session(self, server: SMTPServer) -> RemoteSession:
        """A session with ``server``, run in the child (not open yet)."""
        self._next_sid += 1
        return RemoteSession(self, server, self._next_sid)

    async def start(self) -> None:
        """Start the child now, unless one runs."""
        await self._ready()

    async def stop(self) -> None:
        """Stop the child: its sessions say QUIT; killed if it takes too long."""
        self._stopping = True
        lock = self._lock()
        async with lock:
            child, self._child = self._child, None
        if child is None:
            return
        child.alive = False
        with contextlib.suppress(OSError):
            child.writer.close()  # EOF: the child closes its sessions and exits
        try:
            await asyncio.wait_for(asyncio.to_thread(child.proc.wait), STOP_TIMEOUT_S)
        except TimeoutError:
            child.proc.kill()
            await asyncio.to_thread(child.proc.wait)
        if child.task is not None:
            child.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await child.task
        self._fail_pending(child)

    def _lock(self) -> asyncio.Lock:
        if self._starting is None:
            self._starting = asyncio.Lock()
        return self._starting

    async def _ready(self) -> _Child:
        child = self._child
        if child is not None and child.alive:
            return child
        async with self._lock():
            child = self._child
            if child is not None and child.alive:
                return child
            if self._stopping:
                raise DeliveryProcessLost("delivery is stopping")
            if self._quick_deaths:
                delay = min(
                    RESPAWN_BACKOFF_S * 2 ** (self._quick_deaths - 1), RESPAWN_BACKOFF_MAX_S
                )
                wait = self._last_death + delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            child = await self._spawn()
            if self.generation:
                self.restarts += 1
            self.generation += 1
            self._child = child
            child.task = asyncio.create_task(self._read(child), name="delivery child replies")
            return child

    async def _spawn(self) -> _Child:
        parent_end, child_end = socket.socketpair()
        try:
            proc = await asyncio.to_thread(_popen, child_end.fileno())
        except BaseException as exc:
            parent_end.close()
            if isinstance(exc, OSError):  # no process to be had (out of them, say)
                self._died_now()
                raise DeliveryProcessLost(f"cannot start the delivery child: {exc}") from exc
            raise
        finally:
            child_end.close()
        try:
            reader, writer = await asyncio.open_connection(sock=parent_end)
            async with asyncio.timeout(START_TIMEOUT_S):
                hello = await _read_frame(reader)
            if hello != READY:
                raise DeliveryProcessLost("the delivery child did not start")
        except BaseException as exc:
            proc.kill()
            await asyncio.to_thread(proc.wait)
            parent_end.close()
            if isinstance(exc, asyncio.IncompleteReadError | OSError | TimeoutError):
                self._died_now()
                raise DeliveryProcessLost(f"the delivery child did not start: {exc!r}") from exc
            raise
        logger.info("delivery child process %d started", proc.pid)
        return _Child(proc, reader, writer)

    def _died_now(self) -> None:
        self._quick_deaths += 1
        self._last_death = time.monotonic()

    async def _read(self, child: _Child) -> None:
        try:
            while True:
                reply = _reply_decoder.decode(await _read_frame(child.reader))
                future = child.pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (asyncio.IncompleteReadError, OSError, ValueError, msgspec.DecodeError):
            pass
        finally:
            self._lost(child)

    def _lost(self, child: _Child) -> None:
        if not child.alive:
            self._fail_pending(child)
            return
        child.alive = False
        if self._child is child:
            self._child = None
        with contextlib.suppress(OSError):
            child.writer.close()
        code = child.proc.poll()
        if code is None:
            # A child whose socket failed is of no use: end it.
            child.proc.kill()
        # Reaped off the loop, so no zombie stays behind.
        asyncio.get_running_loop().run_in_executor(None, child.proc.wait)
        lived = time.monotonic() - child.started
        if lived < STABLE_AFTER_S:
            self._died_now()
        else:
            self._quick_deaths = 0
        if not self._stopping:
            logger.warning(
                "delivery child process %d ended (exit %s) with %d call(s) in flight;"
                " a new one starts with the next session",
                child.proc.pid,
                code,
                len(child.pending),
            )
        self._fail_pending(child)

    def _fail_pending(self, child: _Child) -> None:
        pending, child.pending = child.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(DeliveryProcessLost("the delivery child process ended"))

    async def running(self) -> _Child:
        """The running child, started (or restarted) if needed."""
        return await self._ready()

    async def call(self, child: _Child, make: Callable[[int], Call]) -> Reply:
        """Send the call ``make(id)`` builds to ``child`` and wait for its reply."""
        if not child.alive:
            raise DeliveryProcessLost("the delivery child process ended")
        self._next_id += 1
        call_id = self._next_id
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        child.pending[call_id] = future
        try:
            child.writer.write(_frame(_call_encoder.encode(make(call_id))))
            await child.writer.drain()
            return await future
        except (OSError, RuntimeError) as exc:
            raise DeliveryProcessLost(f"the delivery child process is gone: {exc}") from exc
        finally:
            child.pending.pop(call_id, None)

    def post(self, child: _Child, call: AbortCall) -> None:
        """Send ``call`` and expect no reply."""
        if child.alive:
            with contextlib.suppress(OSError, RuntimeError):
                child.writer.write(_frame(_call_encoder.encode(call)))


class RemoteSession:
    """An SMTP session run by the delivery child; the worker's view of it."""

    def __init__(self, process: DeliveryProcess, server: SMTPServer, sid: int) -> None:
        self._process = process
        self.server = server
        self._sid = sid
        self._child: _Child | None = None
        self._usable = False
        self._stage = SMTPStage.CONNECT

    @property
    def usable(self) -> bool:
        """Open in a child that still runs."""
        return self._usable and self._child is not None and self._child.alive

    @property
    def stage(self) -> SMTPStage:
        """The step the child last reported."""
        return self._stage

    async def open(self, deadline: float) -> None:
        """Connect, secure and authenticate (in the child) before ``deadline`` (loop time).

        :raises SMTPDeliveryError: as ``SMTPSession.open``.
        :raises DeadlineReached: the deadline struck first.
        :raises DeliveryProcessLost: the child died (or none could be started).
        """
        self._child = await self._process.running()
        remaining = deadline - asyncio.get_running_loop().time()
        budget = _child_budget(remaining)
        self._apply(await self._call(lambda i: OpenCall(i, self._sid, self.server, budget)))

    async def send(
        self,
        mail_from: str,
        recipients: list[str],
        data: bytes,
        *,
        smtputf8: bool,
        deadline: float,
    ) -> SendResult:
        """One mail transaction, as ``SMTPSession.send``, before ``deadline``."""
        budget = _child_budget(deadline - asyncio.get_running_loop().time())
        reply = await self._call(
            lambda i: SendCall(i, self._sid, mail_from, recipients, data, smtputf8, budget)
        )
        self._apply(reply)
        if reply.result is None:
            raise DeliveryProcessLost("the delivery child answered a send with no result")
        return reply.result

    async def close(self) -> None:
        """QUIT (in the child); nothing to do if the child is gone."""
        child, self._child = self._child, None
        self._usable = False
        if child is None or not child.alive:
            return
        with contextlib.suppress(DeliveryProcessLost):
            await self._process.call(child, lambda i: CloseCall(i, self._sid))

    def abort(self) -> None:
        """Drop the connection without QUIT (the child cancels what it was doing)."""
        self._usable = False
        child, self._child = self._child, None
        if child is not None:
            self._process.post(child, AbortCall(self._sid))

    async def _call(self, make: Callable[[int], Call]) -> Reply:
        child = self._child
        if child is None:
            raise DeliveryProcessLost("the session is not open")
        try:
            return await self._process.call(child, make)
        except asyncio.CancelledError:
            # The parent's deadline or a stop: the child must not go on with it.
            self.abort()
            raise

    def _apply(self, reply: Reply) -> None:
        self._usable = reply.usable
        self._stage = reply.stage
        if reply.timed_out:
            raise DeadlineReached("the attempt's deadline struck in the delivery child")
        if reply.error is not None:
            raise error_from(reply.error)
        if reply.invalid is not None:
            raise ValueError(reply.invalid)
        if reply.crash is not None:
            raise RuntimeError(f"the delivery child failed: {reply.crash}")


def _child_budget(remaining: float) -> float:
    """The child's share of the time left: a little less, so it answers first."""
    return max(remaining - DEADLINE_MARGIN_S, remaining / 2, 0.0)


# -- the child's side ---------------------------------------------------------------------


class _Worker:
    """The child: runs the parent's calls, one task each, sessions by id."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._sessions: dict[int, SMTPSession] = {}
        self._running: dict[int, asyncio.Task[None]] = {}

    def _reply(self, reply: Reply) -> None:
        self._writer.write(_frame(_reply_encoder.encode(reply)))

    def handle(self, call: Call) -> None:
        if isinstance(call, AbortCall):
            task = self._running.pop(call.sid, None)
            if task is not None:
                task.cancel()
            session = self._sessions.pop(call.sid, None)
            if session is not None:
                session.abort()
            return
        task = asyncio.create_task(self._run(call))
        self._running[call.sid] = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        for sid, running in list(self._running.items()):
            if running is task:
                del self._running[sid]

    async def _run(self, call: OpenCall | SendCall | CloseCall) -> None:
        session = self._sessions.get(call.sid)
        if isinstance(call, CloseCall):
            self._sessions.pop(call.sid, None)
            if session is not None:
                await session.close()
            self._reply(Reply(call.id, False, SMTPStage.CONNECT))
            return
        if isinstance(call, OpenCall):
            session = SMTPSession(call.server)
            self._sessions[call.sid] = session
        if session is None:
            error = SMTPConnectionFailed(
                ErrorCode.CONNECTION_LOST,
                "the session is not connected",
                stage=SMTPStage.MAIL,
            )
            self._reply(Reply(call.id, False, SMTPStage.MAIL, error=error_spec(error)))
            return
        reply = Reply(call.id, False, session.stage)
        timeout = asyncio.timeout(call.remaining_s)
        try:
            async with timeout:
                if isinstance(call, OpenCall):
                    await session.open()
                else:
                    reply.result = await session.send(
                        call.mail_from, call.recipients, call.data, smtputf8=call.smtputf8
                    )
        except TimeoutError:
            if not timeout.expired():
                raise
            session.abort()
            reply.timed_out = True
        except SMTPDeliveryError as exc:
            reply.error = error_spec(exc)
        except ValueError as exc:
            reply.invalid = str(exc)
        except Exception as exc:
            logger.exception("delivery child: %s failed", type(call).__name__)
            session.abort()
            reply.crash = repr(exc)
        reply.usable = session.usable
        reply.stage = session.stage
        if not reply.usable:
            self._sessions.pop(call.sid, None)
        self._reply(reply)

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        if self._running:
            await asyncio.wait(list(self._running.values()))
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


async def _child_main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    worker = _Worker(writer)
    writer.write(_frame(READY))
    try:
        while True:
            try:
                frame = await _read_frame(reader)
            except (asyncio.IncompleteReadError, OSError):
                return  # the parent closed its end (a stop) or died: finish up
            worker.handle(_call_decoder.decode(frame))
    finally:
        await worker.close()
        with contextlib.suppress(OSError):
            writer.close()


def main(argv: list[str]) -> int:
    """The child's entry point: ``python -m service.services.delivery_process FD``."""
    # The parent decides when this process ends (EOF on its socket, also when the parent
    # dies): a Ctrl-C or a SIGTERM sent to the whole group (a terminal, systemd) must not
    # cut short the sends the parent's graceful stop lets finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The parent's log format and level (the same MAILROOM_* environment).
    from service.config import ConfigError, Settings
    from service.logs import configure_logging

    try:
        configure_logging(Settings.from_env())
    except ConfigError:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_child_main(int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
