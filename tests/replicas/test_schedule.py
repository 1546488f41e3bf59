"""Scheduled polls across replicas: each due poll starts once among them.

Three replicas run the scheduler on one PostgreSQL database; thirty accounts fall due at
once (no spread). Every replica claims due accounts (``FOR UPDATE SKIP LOCKED``), so each
account is polled exactly once, its mail stored once. (An empty poll takes milliseconds:
a second claim of an account would mostly come after the first poll ended and show as a
second retrieval. The store-level test of concurrent claims is the exact one:
``tests/repository/test_poll_schedule.py``.)
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.replicas.harness import Client, Cluster
from tests.servers.dovecot import Dovecot
from tests.waiting import wait_for

pytestmark = pytest.mark.replicas

ACCOUNTS = 30
POLL_WAIT_S = 120


def polled_account(dovecot: Dovecot, user: str, password: str) -> dict[str, Any]:
    return {
        "name": user,
        "email": f"{user}@example.com",
        "incoming": {
            "host": dovecot.host,
            "port": dovecot.pop3_port,
            "security": "none",  # Dovecot trusts loopback: plaintext login without TLS
            "username": user,
            "password": password,
        },
        "outgoing": {"host": "127.0.0.1", "port": 2525, "security": "none"},
        "retrieval": {"poll_interval_minutes": 60},
    }


@pytest.mark.timeout(600)
def test_each_due_poll_starts_once_among_replicas(pg_database: str, dovecot: Dovecot) -> None:
    mailboxes = [dovecot.add_user() for _ in range(ACCOUNTS)]
    for i, mailbox in enumerate(mailboxes):
        mailbox.deliver(f"Subject: poll {i}\n\nhi\n".encode())
    client = Client()
    with Cluster(pg_database, 3, MAILROOM_POLL_SPREAD="0") as cluster:
        try:
            accounts = [
                client.create_account(
                    cluster[i % 3].base, polled_account(dovecot, m.user, m.password)
                )
                for i, m in enumerate(mailboxes)
            ]

            def retrievals(account: str) -> list[dict[str, Any]]:
                return list(client.pages(f"{cluster[0].base}/v1/accounts/{account}/retrievals"))

            def all_polled() -> dict[str, list[dict[str, Any]]] | None:
                found = {a: retrievals(a) for a in accounts}
                ended = all(
                    items and all(r["status"] not in ("queued", "running") for r in items)
                    for items in found.values()
                )
                return found if ended else None

            found = wait_for(all_polled, timeout=POLL_WAIT_S, interval=0.2)
            for account, items in found.items():
                assert [(r["trigger"], r["status"]) for r in items] == [
                    ("schedule", "succeeded")
                ], (account, items)
                stored = client.messages(cluster[0].base, account)
                assert len(stored) == 1, (account, stored)
        finally:
            client.close()
