"""The real process (``python -m service``): crashes and graceful stops lose no mail.

The outbox is in a file database; smtp-sink's ``-W`` delays put the process at a chosen
point of an SMTP session when it is killed. smtp-sink keeps every message whose data it
received (``dump``), so the tests count deliveries exactly.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.process import kill, start, stop
from tests.servers.smtp import SmtpSink

KEY = "process-test-key-0123456789"
HEADERS = {"Authorization": f"Bearer {KEY}"}
WAIT_S = 60  # bound on any wait below; nothing asserts on time
POLL_S = 0.05


@pytest.fixture
def service_env(tmp_path: Path) -> dict[str, str]:
    return {
        "MAILROOM_DATABASE": str(tmp_path / "data" / "mailroom.db"),
        "MAILROOM_API_KEYS": KEY,
        "MAILROOM_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
        "MAILROOM_RETRY_DELAYS": "0.2,0.5,1",
    }


@pytest.fixture
def running(service_env: dict[str, str]) -> Iterator[Callable[[], tuple[Any, str]]]:
    """``running()`` starts the service on the test's database; all stopped at the end."""
    processes: list[Any] = []

    def launch() -> tuple[Any, str]:
        proc, base = start(service_env)
        processes.append(proc)
        return proc, base

    yield launch
    for proc in processes:
        if proc.poll() is None:
            kill(proc)


def create_account(base: str, sink: SmtpSink) -> str:
    body = {
        "name": "Alice",
        "email": "alice@example.com",
        "incoming": {
            "host": "127.0.0.1",
            "port": 1110,
            "security": "none",
            "username": "alice",
            "password": "pop-secret",
        },
        "outgoing": {"host": sink.host, "port": sink.port, "security": "none"},
    }
    response = httpx.post(f"{base}/v1/accounts", json=body, headers=HEADERS)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def send(base: str, account_id: str) -> dict[str, Any]:
    response = httpx.post(
        f"{base}/v1/accounts/{account_id}/outbox",
        json={"to": ["bob@example.org"], "subject": "Crash", "text": "Still here.\n"},
        headers=HEADERS,
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def wait_status(base: str, account_id: str, outgoing_id: str, *statuses: str) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for _ in range(int(WAIT_S / POLL_S)):
        response = httpx.get(
            f"{base}/v1/accounts/{account_id}/outbox/{outgoing_id}", headers=HEADERS
        )
        body = response.json()
        if body["status"] in statuses:
            return body
        time.sleep(POLL_S)
    raise AssertionError(f"never reached {statuses}: {body}")


def wait_dumped(sink: SmtpSink, count: int) -> None:
    for _ in range(int(WAIT_S / POLL_S)):
        if len(sink.messages()) >= count:
            return
        time.sleep(POLL_S)
    raise AssertionError(f"smtp-sink holds {len(sink.messages())} message(s), not {count}")


def test_sigkill_after_202_then_restart_delivers_exactly_once(
    running: Callable[[], tuple[Any, str]], smtp_sink_factory: Any
) -> None:
    # The server greets only after 3 s: the message cannot be delivered before the kill.
    sink: SmtpSink = smtp_sink_factory(delay={"CONNECT": 3}, dump=True)
    proc, base = running()
    account_id = create_account(base, sink)
    accepted = send(base, account_id)
    kill(proc)  # SIGKILL right after the 202: no shutdown code runs
    assert sink.messages() == []

    proc, base = running()
    done = wait_status(base, account_id, accepted["id"], "sent", "failed")
    assert done["status"] == "sent", done
    assert done["message_id"] == accepted["message_id"]
    stop(proc)
    [delivered] = sink.messages()
    assert f"Message-ID: {accepted['message_id']}".encode() in delivered.content


def test_sigkill_while_in_flight_sends_again_with_the_same_message_id(
    running: Callable[[], tuple[Any, str]], smtp_sink_factory: Any
) -> None:
    # The server keeps the data, then waits 3 s before answering the final dot: the
    # process dies after the server has the message but before it knows.
    sink: SmtpSink = smtp_sink_factory(delay={".": 3}, dump=True)
    proc, base = running()
    account_id = create_account(base, sink)
    accepted = send(base, account_id)
    wait_dumped(sink, 1)
    in_flight = httpx.get(
        f"{base}/v1/accounts/{account_id}/outbox/{accepted['id']}", headers=HEADERS
    ).json()
    assert in_flight["status"] == "sending"
    kill(proc)

    proc, base = running()
    done = wait_status(base, account_id, accepted["id"], "sent", "failed")
    assert done["status"] == "sent", done
    stop(proc)
    # At least once, never lost: the server got it again, and it is the same message.
    copies = sink.messages()
    assert len(copies) == 2
    assert copies[0].content == copies[1].content
    assert f"Message-ID: {accepted['message_id']}".encode() in copies[0].content


def test_sigterm_lets_a_send_in_progress_finish(
    running: Callable[[], tuple[Any, str]], smtp_sink_factory: Any
) -> None:
    sink: SmtpSink = smtp_sink_factory(delay={".": 2}, dump=True)
    proc, base = running()
    account_id = create_account(base, sink)
    accepted = send(base, account_id)
    wait_dumped(sink, 1)
    out = stop(proc)  # graceful: the 2 s wait for the reply fits in the grace period
    assert "did not finish" not in out

    proc, base = running()
    done = httpx.get(
        f"{base}/v1/accounts/{account_id}/outbox/{accepted['id']}", headers=HEADERS
    ).json()
    assert done["status"] == "sent", done
    assert len(done["attempts"]) == 1
    time.sleep(1)
    stop(proc)
    assert len(sink.messages()) == 1
