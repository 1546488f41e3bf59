"""Process roles (``MAILROOM_ROLE``): the setting, the refusal on SQLite, and an API-only
process with a worker process on one PostgreSQL database (real processes and servers).

The split test starts the API process alone first: what it accepts (a send, a retrieval
trigger) stays queued in the store, since it runs no worker; a worker process started
afterwards finds that work in the database (not through a wake-up it could not have
heard) and finishes it: the send reaches smtp-sink, the retrieval stores Dovecot's mail.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import ConfigError, Role, Settings
from tests import process
from tests.replicas.harness import HEADERS, Replica, base_env, message_ids
from tests.servers.dovecot import Dovecot, Mailbox
from tests.servers.smtp import SmtpSink
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
SENDS = 20
MESSAGES = 30
WAIT_S = 120  # bound on the worker finishing the queued work
EXIT_TIMEOUT_S = 60
PG_ENV = {
    "MAILROOM_DATABASE": "postgresql://mailroom@127.0.0.1:5432/mailroom",
    "MAILROOM_SECRET_KEY": base64.urlsafe_b64encode(bytes(32)).decode(),
}


@pytest.mark.parametrize("role", list(Role))
def test_role_setting_is_read_and_defaults_to_all(role: Role) -> None:
    assert Settings.from_env({}).role is Role.ALL
    settings = Settings.from_env({**PG_ENV, "MAILROOM_ROLE": role.value.upper()})
    assert settings.role is role
    assert settings.role.serves_api is (role is not Role.WORKER)
    assert settings.role.runs_work is (role is not Role.API)


def test_unknown_role_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="MAILROOM_ROLE"):
        Settings.from_env({**PG_ENV, "MAILROOM_ROLE": "scheduler"})


@pytest.mark.parametrize("role", [Role.API, Role.WORKER])
def test_split_roles_are_refused_on_sqlite(role: Role, tmp_path: Path) -> None:
    env = {"MAILROOM_ROLE": role.value, "MAILROOM_DATABASE": str(tmp_path / "m.db")}
    with pytest.raises(ConfigError, match=r"MAILROOM_ROLE: .*PostgreSQL"):
        Settings.from_env(env)
    # The real command exits 2 with the reason, before it opens anything.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env={**clean, **env, "MAILROOM_PORT": str(process.free_port())},
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
    )
    assert result.returncode == 2, result.stderr
    assert "MAILROOM_ROLE" in result.stderr and "PostgreSQL" in result.stderr
    assert not (tmp_path / "m.db").exists()


def _account(dovecot: Dovecot, mailbox: Mailbox, sink: SmtpSink) -> dict[str, Any]:
    return {
        "name": mailbox.user,
        "email": f"{mailbox.user}@example.com",
        "incoming": {
            "host": dovecot.host,
            "port": dovecot.pop3_port,
            "security": "none",  # Dovecot trusts loopback: plaintext login without TLS
            "username": mailbox.user,
            "password": mailbox.password,
        },
        "outgoing": {"host": sink.host, "port": sink.port, "security": "none"},
        "retrieval": {"leave_on_server": False},
    }


@pytest.mark.timeout(600)
def test_api_process_accepts_and_a_worker_process_delivers_and_retrieves(
    pg_database: str, dovecot: Dovecot, mailbox: Mailbox, smtp_sink_factory: Any
) -> None:
    sink: SmtpSink = smtp_sink_factory(dump=True)
    for i in range(MESSAGES):
        mailbox.deliver(f"Subject: roles {i}\nMessage-ID: <{i}@roles>\n\nbody {i}\n".encode())
    shared = base_env(pg_database)
    api = Replica("api", {**shared, "MAILROOM_ROLE": "api"}, process.free_port())
    worker = Replica("worker", {**shared, "MAILROOM_ROLE": "worker"}, process.free_port())
    http = httpx.Client(headers=HEADERS, timeout=30)
    try:
        api.start()
        account = http.post(f"{api.base}/v1/accounts", json=_account(dovecot, mailbox, sink))
        assert account.status_code == 201, account.text
        account_id = account.json()["id"]
        outbox = f"{api.base}/v1/accounts/{account_id}/outbox"
        accepted = []
        for i in range(SENDS):
            body = {"to": [f"rcpt{i}@example.org"], "subject": f"roles {i}", "text": "hi\n"}
            response = http.post(outbox, json=body)
            assert response.status_code == 202, response.text
            accepted.append(response.json()["id"])
        trigger = http.post(f"{api.base}/v1/accounts/{account_id}/retrievals")
        assert trigger.status_code == 202, trigger.text
        assert trigger.json()["status"] == "queued"
        retrieval_url = f"{api.base}/v1/accounts/{account_id}/retrievals/{trigger.json()['id']}"
        # One active retrieval per account, queued ones included.
        again = http.post(f"{api.base}/v1/accounts/{account_id}/retrievals")
        assert again.status_code == 409, again.text
        assert again.json()["code"] == "retrieval_running"
        # No worker yet: the API process ran none of it.
        assert http.get(retrieval_url).json()["status"] == "queued"
        assert {m["status"] for m in http.get(outbox, params={"limit": 500}).json()["items"]} == {
            "queued"
        }
        assert mailbox.count() == MESSAGES

        worker.start()

        def retrieved() -> dict[str, Any] | None:
            state: dict[str, Any] = http.get(retrieval_url).json()
            return state if state["status"] not in ("queued", "running") else None

        done = wait_for(retrieved, timeout=WAIT_S, interval=0.1)
        assert done["status"] == "succeeded", done
        assert done["messages_downloaded"] == MESSAGES
        messages = http.get(
            f"{api.base}/v1/accounts/{account_id}/messages", params={"limit": 500}
        ).json()["items"]
        assert sorted(m["subject"] for m in messages) == sorted(
            f"roles {i}" for i in range(MESSAGES)
        )
        assert mailbox.count() == 0

        def delivered() -> list[dict[str, Any]] | None:
            items: list[dict[str, Any]] = http.get(outbox, params={"limit": 500}).json()["items"]
            return items if all(m["status"] == "sent" for m in items) else None

        stored = wait_for(delivered, timeout=WAIT_S, interval=0.1)
        assert sorted(m["id"] for m in stored) == sorted(accepted)
        received = message_ids([m.content for m in sink.messages()])
        assert set(received) == {m["message_id"] for m in stored}
        assert all(count == 1 for count in received.values()), received

        # The worker serves health, readiness and metrics, not the API.
        assert httpx.get(worker.base + "/health").status_code == 200
        assert httpx.get(worker.base + "/ready").status_code == 200
        assert httpx.get(worker.base + "/metrics").status_code == 200
        assert http.get(f"{worker.base}/v1/accounts").status_code == 404
        # Both stop gracefully.
        worker.stop()
        api.stop()
    except BaseException:
        print(f"==== api\n{api.output()[-20000:]}\n==== worker\n{worker.output()[-20000:]}")
        raise
    finally:
        for replica in (api, worker):
            if replica.running:
                replica.kill()
        http.close()
