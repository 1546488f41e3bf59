"""A replica killed mid-retrieval: another replica finishes the job, nothing doubled.

5,000 messages wait in a Dovecot Maildir; replica 0 retrieves them with
``leave_on_server=false`` and is SIGKILLed once more than 1,000 are stored. While it runs,
replica 1 answers 409 to a trigger (one retrieval per account across replicas). After the
dead replica's lease expires, replica 1 (never restarted, so it is not a restart that
notices) marks that retrieval ``interrupted`` and accepts the next trigger, which
finishes the job: every message stored once (counted by UIDL through the API), the
mailbox empty.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.replicas.harness import Client, Cluster
from tests.servers.dovecot import Dovecot, Mailbox
from tests.waiting import wait_for

pytestmark = pytest.mark.replicas

MESSAGES = 5000
KILL_AFTER = 1000  # messages stored before the kill
BODY = b"x" * 76 + b"\n"
TAKEOVER_WAIT_S = 180  # bound: the lease must expire and a sweep must notice
RETRIEVAL_WAIT_S = 300


def account_body(dovecot: Dovecot, mailbox: Mailbox) -> dict[str, Any]:
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
        "outgoing": {"host": "127.0.0.1", "port": 2525, "security": "none"},
        "retrieval": {"leave_on_server": False},
    }


@pytest.mark.timeout(900)
def test_sigkill_mid_retrieval_then_another_replica_finishes_the_job(
    pg_database: str, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    for i in range(MESSAGES):
        mailbox.deliver(
            f"Subject: replica {i}\nMessage-ID: <{i}@replicas>\n\n".encode() + BODY * 16
        )
    client = Client()
    http = client.http
    with Cluster(pg_database, 2) as cluster:
        try:
            a, b = cluster[0], cluster[1]
            account = client.create_account(a.base, account_body(dovecot, mailbox))
            trigger = http.post(f"{a.base}/v1/accounts/{account}/retrievals")
            assert trigger.status_code == 202, trigger.text
            first = trigger.json()["id"]
            first_url = f"/v1/accounts/{account}/retrievals/{first}"

            def stored_enough() -> dict[str, Any] | None:
                state: dict[str, Any] = http.get(a.base + first_url).json()
                assert state["status"] in ("queued", "running"), state  # it must not finish
                return state if state["messages_downloaded"] >= KILL_AFTER else None

            wait_for(stored_enough, timeout=RETRIEVAL_WAIT_S, interval=0.05)
            # One retrieval per account across replicas: B refuses while A retrieves.
            refused = http.post(f"{b.base}/v1/accounts/{account}/retrievals")
            assert refused.status_code == 409, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            a.kill()
            assert mailbox.count() == MESSAGES  # deletions happen only at QUIT

            def takeover() -> str | None:
                response = http.post(f"{b.base}/v1/accounts/{account}/retrievals")
                if response.status_code == 409:
                    return None  # the dead replica's lease has not expired yet
                assert response.status_code == 202, response.text
                return str(response.json()["id"])

            second = wait_for(takeover, timeout=TAKEOVER_WAIT_S, interval=0.5)
            dead = http.get(b.base + first_url).json()
            assert dead["status"] == "failed", dead
            assert dead["error"]["code"] == "interrupted", dead
            assert dead["messages_downloaded"] >= KILL_AFTER

            second_url = f"{b.base}/v1/accounts/{account}/retrievals/{second}"
            final = wait_for(
                lambda: (
                    (s := http.get(second_url).json())["status"] not in ("queued", "running") and s
                ),
                timeout=RETRIEVAL_WAIT_S,
                interval=0.2,
            )
            assert final["status"] == "succeeded", final
            assert final["messages_on_server"] == MESSAGES, final
            assert final["messages_deleted"] == MESSAGES, final
            # The messages A committed before it died were not downloaded again.
            assert final["messages_downloaded"] <= MESSAGES - KILL_AFTER, final

            stored = client.messages(b.base, account)
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            client.close()
    assert mailbox.count() == 0
    uidls = [m["uidl"] for m in stored]
    assert len(uidls) == len(set(uidls)) == MESSAGES
    assert {m["message_id"] for m in stored} == {f"<{i}@replicas>" for i in range(MESSAGES)}
