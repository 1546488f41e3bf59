"""Several real service processes (``python -m service``) on one PostgreSQL database.

``Cluster(dsn, count)`` starts ``count`` replicas sharing the API key, the credential key
and the database; each keeps its port across restarts, as behind a load balancer::

    with Cluster(dsn, 3) as cluster:
        cluster[1].kill()        # SIGKILL: no shutdown code runs
        cluster[1].start()       # same port, a new process (and a new replica id)
        cluster[2].stop()        # SIGTERM, graceful; returns the process output

``Client`` sends and reads through the HTTP API; ``SendLog`` records what each request got
(202, another status, or a transport error) so the tests count only what was accepted.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from tests import process
from tests.waiting import wait_for

API_KEY = "replica-test-key-0123456789"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
#: A short lease (``MAILROOM_LEASE_SECONDS``), so a dead replica's claims are taken over
#: within seconds; the tests' bounds would still allow for the default (60 s).
LEASE_S = 3
#: Seconds a store operation waits for the database before 503 ``storage_unavailable``.
DB_TIMEOUT_S = 3
#: Client-side bound on one request: past it the service "hung" (a failure).
REQUEST_TIMEOUT_S = 30.0
PAGE = 500
MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)


def base_env(dsn: str) -> dict[str, str]:
    """What every replica of one deployment shares."""
    return {
        "MAILROOM_DATABASE": dsn,
        "MAILROOM_API_KEYS": API_KEY,
        "MAILROOM_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
        "MAILROOM_RETRY_DELAYS": "0.2,0.5,1,2,2,2,2,2",
        "MAILROOM_LEASE_SECONDS": str(LEASE_S),
        "MAILROOM_DB_TIMEOUT": str(DB_TIMEOUT_S),
        "MAILROOM_SCHEDULER_INTERVAL": "0.5",
    }


@dataclass
class Replica:
    """One service process; its port stays the same across restarts."""

    name: str
    env: dict[str, str]
    port: int
    proc: subprocess.Popen[str] | None = None
    procs: list[subprocess.Popen[str]] = field(default_factory=list)  # every one started

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start a new process on this replica's port; wait for /health, then /ready."""
        assert not self.running, f"{self.name} is already running"
        self.proc, _ = process.start(self.env, port=self.port)
        self.procs.append(self.proc)
        wait_for(self._ready, interval=0.1)

    def _ready(self) -> bool:
        try:
            return httpx.get(self.base + "/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        assert self.proc is not None
        process.kill(self.proc)

    def stop(self) -> str:
        """SIGTERM; checks the shutdown was graceful and returns the output."""
        assert self.proc is not None
        return process.stop(self.proc)

    def output(self) -> str:
        """Output of every process this replica ran, oldest first."""
        return "\n".join(process.output(proc) for proc in self.procs)


class Cluster:
    """``count`` replicas on one database (``with Cluster(...)`` kills what is left)."""

    def __init__(self, dsn: str, count: int, **env: str) -> None:
        shared = {**base_env(dsn), **env}
        self.replicas = [
            Replica(f"replica-{i}", dict(shared), process.free_port()) for i in range(count)
        ]

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    def __len__(self) -> int:
        return len(self.replicas)

    def start(self) -> None:
        """Start every replica at once (they race to migrate the database)."""
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(Replica.start, self.replicas))

    def close(self) -> None:
        for replica in self.replicas:
            if replica.running:
                replica.kill()

    def logs(self) -> str:
        """Everything every replica printed, for failure messages."""
        return "\n".join(f"==== {r.name}\n{r.output()[-20000:]}" for r in self.replicas)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- HTTP API ----------------------------------------------------------------------------


class Client:
    """The API of one deployment, through any of its replicas."""

    def __init__(self, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.http = httpx.Client(headers=HEADERS, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def create_account(self, base: str, body: dict[str, Any]) -> str:
        response = self.http.post(f"{base}/v1/accounts", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def pages(self, url: str) -> Iterator[dict[str, Any]]:
        """Every item of a paged list."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": PAGE}
            if cursor:
                params["cursor"] = cursor
            response = self.http.get(url, params=params)
            assert response.status_code == 200, response.text
            body = response.json()
            yield from body["items"]
            cursor = body["next_cursor"]
            if not cursor:
                return

    def outbox(self, base: str, account_id: str) -> list[dict[str, Any]]:
        return list(self.pages(f"{base}/v1/accounts/{account_id}/outbox"))

    def messages(self, base: str, account_id: str) -> list[dict[str, Any]]:
        return list(self.pages(f"{base}/v1/accounts/{account_id}/messages"))


def smtp_account(name: str, host: str, port: int) -> dict[str, Any]:
    """An account whose outgoing server is the test's SMTP server (POP3 unused)."""
    return {
        "name": name,
        "email": f"{name}@example.com",
        "incoming": {
            "host": "127.0.0.1",
            "port": 1110,
            "security": "none",
            "username": name,
            "password": "pop-secret",
        },
        "outgoing": {"host": host, "port": port, "security": "none"},
    }


@dataclass
class Sent:
    """What one send request got."""

    replica: str
    account_id: str
    status: int | None  # None: transport error (refused, reset, timed out)
    body: dict[str, Any] | None
    error: str | None = None
    content_type: str | None = None


@dataclass
class SendLog:
    """Every send request and its answer; thread-safe."""

    results: list[Sent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sent: Sent) -> None:
        with self._lock:
            self.results.append(sent)

    def snapshot(self) -> list[Sent]:
        with self._lock:
            return list(self.results)

    @property
    def accepted(self) -> list[Sent]:
        return [s for s in self.snapshot() if s.status == 202]

    def count(self, predicate: Any) -> int:
        return sum(1 for s in self.snapshot() if predicate(s))


def send_one(http: httpx.Client, replica: Replica, account_id: str, seq: int, log: SendLog) -> Sent:
    """One POST to the outbox through ``replica``; the answer goes into ``log``."""
    body = {
        "to": [f"rcpt{seq % 7}@example.org"],
        "subject": f"replicas {seq}",
        "text": f"message {seq} through {replica.name}\n",
    }
    url = f"{replica.base}/v1/accounts/{account_id}/outbox"
    try:
        response = http.post(url, json=body)
    except httpx.TransportError as exc:
        sent = Sent(replica.name, account_id, None, None, error=repr(exc))
    else:
        try:
            payload = response.json()
        except ValueError:
            payload = {"text": response.text}
        sent = Sent(
            replica.name,
            account_id,
            response.status_code,
            payload,
            content_type=response.headers.get("content-type"),
        )
    log.add(sent)
    return sent


# -- what the SMTP server received -----------------------------------------------------


def message_ids(contents: Sequence[bytes]) -> Counter[str]:
    """Message-ID header of each received message, counted."""
    found: Counter[str] = Counter()
    for content in contents:
        match = MESSAGE_ID.search(content.split(b"\n\n", 1)[0].replace(b"\r\n", b"\n"))
        assert match is not None, content[:500]
        found[match.group(1).decode()] += 1
    return found


def interrupted_attempts(message: dict[str, Any]) -> int:
    """How many of the message's attempts a crash cut short (the after-DATA window)."""
    return sum(1 for a in message["attempts"] if a.get("outcome") == "interrupted")


def check_delivered_once(
    stored: Sequence[dict[str, Any]], accepted: Sequence[Sent], received: Counter[str]
) -> int:
    """Every accepted message is stored and sent; each arrived once, or once more per
    ``interrupted`` attempt on record; nothing arrived that the store does not hold.
    Returns how many arrived twice (or more)."""
    by_id = {m["id"]: m for m in stored}
    problems: list[str] = []
    for sent in accepted:
        assert sent.body is not None
        if sent.body["id"] not in by_id:
            problems.append(f"accepted {sent.body['id']} is not in the store")
    known = {m["message_id"] for m in stored}
    for message_id in received:
        if message_id not in known:
            problems.append(f"{message_id} arrived but the store never had it")
    doubled = 0
    for message in stored:
        copies = received.get(message["message_id"], 0)
        allowed = 1 + interrupted_attempts(message)
        if message["status"] != "sent":
            problems.append(f"{message['id']} is {message['status']}: {message}")
        if copies == 0:
            problems.append(f"{message['id']} {message['message_id']} never arrived")
        elif copies > allowed:
            problems.append(
                f"{message['id']} arrived {copies} times with {allowed - 1} interrupted"
                f" attempt(s): {message['attempts']}"
            )
        doubled += copies > 1
    assert not problems, "\n".join(problems[:30]) + f"\n({len(problems)} problems)"
    return doubled


# -- load ------------------------------------------------------------------------------


class Load:
    """Send requests from ``threads`` threads, round-robin over the replicas ``targets()``
    names (all of them by default) and over ``accounts``, until ``total`` requests were
    made or ``stop()`` is called. Every answer goes into ``log``."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        accounts: Sequence[str],
        log: SendLog,
        *,
        total: int | None = None,
        threads: int = 6,
        pause_s: float = 0.0,
        targets: Any = None,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.replicas = list(replicas)
        self.accounts = list(accounts)
        self.log = log
        self.total = total
        self.pause_s = pause_s  # between one thread's requests: a steady, not maximal, load
        self.targets = targets or (lambda: self.replicas)
        self.timeout = timeout
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.failures: list[BaseException] = []

    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or (self.total is not None and self._next >= self.total):
                return None
            seq = self._next
            self._next += 1
            return seq

    def _run(self) -> None:
        try:
            with httpx.Client(headers=HEADERS, timeout=self.timeout) as http:
                while (seq := self._take()) is not None:
                    replicas = list(self.targets())
                    replica = replicas[seq % len(replicas)]
                    account = self.accounts[(seq // len(replicas)) % len(self.accounts)]
                    send_one(http, replica, account, seq, self.log)
                    if self.pause_s:
                        self._stop.wait(self.pause_s)
        except BaseException as exc:  # reported by join(): a thread must not die silently
            self.failures.append(exc)

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        """Wait for every thread (bounded), then re-raise what one of them raised."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "the load did not finish"
        if self.failures:
            raise self.failures[0]
