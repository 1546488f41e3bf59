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
    # The attempt the crash cut short is on record, dated when it began.
    interrupted, sent = done["attempts"]
    assert (interrupted["outcome"], interrupted["error_code"]) == ("interrupted", "interrupted")
    assert interrupted["at"] is not None and interrupted["at"] <= sent["at"]
    assert (sent["outcome"], sent["smtp_code"]) == ("sent", 250)
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


def test_sigterm_past_the_grace_period_records_the_interrupted_attempt(
    running: Callable[[], tuple[Any, str]], smtp_sink_factory: Any
) -> None:
    # The server has the data and answers the final dot only after 60 s: longer than
    # the shutdown grace (10 s), so the stop cuts the send short.
    sink: SmtpSink = smtp_sink_factory(delay={".": 60}, dump=True)
    proc, base = running()
    account_id = create_account(base, sink)
    accepted = send(base, account_id)
    wait_dumped(sink, 1)
    out = stop(proc)
    assert "did not finish" in out
    assert "message deferred" in out and "code=interrupted" in out

    proc, base = running()
    body = httpx.get(
        f"{base}/v1/accounts/{account_id}/outbox/{accepted['id']}", headers=HEADERS
    ).json()
    # Queued again (it is being sent anew, or about to be) with the trace of the cut.
    interrupted = body["attempts"][0]
    assert (interrupted["outcome"], interrupted["error_code"]) == ("interrupted", "interrupted")
    assert body["status"] in ("queued", "sending"), body
    kill(proc)


def test_a_pause_is_stored_across_a_restart_and_a_patch_ends_it(
    running: Callable[[], tuple[Any, str]], smtp_sink_factory: Any
) -> None:
    # The server refuses EHLO and HELO: a configuration error, not worth five days of
    # retries. The pause must survive a restart (no new attempt after it).
    refusing: SmtpSink = smtp_sink_factory(hard_reject=["EHLO", "HELO"])
    proc, base = running()
    account_id = create_account(base, refusing)
    accepted = send(base, account_id)
    account_url = f"{base}/v1/accounts/{account_id}"
    account = wait_paused(account_url)
    assert account["smtp_status"] == "rejected"
    out = stop(proc)
    assert "account paused" in out and f"account_id={account_id}" in out

    proc, base = running()
    account_url = f"{base}/v1/accounts/{account_id}"
    account = httpx.get(account_url, headers=HEADERS).json()
    assert account["smtp_status"] != "ok"
    assert account["smtp_status"] == "rejected"
    time.sleep(1.0)  # longer than the retry schedule: nothing may be tried meanwhile
    waiting = httpx.get(f"{account_url}/outbox/{accepted['id']}", headers=HEADERS).json()
    assert waiting["status"] == "deferred" and waiting["next_attempt_at"] is None
    assert len(waiting["attempts"]) == 1

    healthy: SmtpSink = smtp_sink_factory(dump=True)
    response = httpx.patch(account_url, json={"outgoing": {"port": healthy.port}}, headers=HEADERS)
    assert response.status_code == 200
    assert response.json()["smtp_status"] == "ok"
    done = wait_status(base, account_id, accepted["id"], "sent", "failed")
    assert done["status"] == "sent", done
    out = stop(proc)
    assert "account resumed" in out and "message sent" in out
    assert len(healthy.messages()) == 1


def wait_paused(account_url: str) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for _ in range(int(WAIT_S / POLL_S)):
        body = httpx.get(account_url, headers=HEADERS).json()
        if body["smtp_status"] != "ok":
            return body
        time.sleep(POLL_S)
    raise AssertionError(f"the account was never paused: {body}")
