"""Three replicas share one outbox: a replica killed mid-run loses and doubles nothing.

1,000 send requests go round-robin over three real processes on one PostgreSQL database;
replica 1 is SIGKILLed when 300 have been answered and started again (same port) 100
answers later. smtp-sink keeps every message it receives (``dump``), so deliveries are
counted at the server by Message-ID: every accepted message arrives, once, or once more
for each ``interrupted`` attempt the store records (a kill after the server had the data
and before its reply was committed: the documented at-least-once window).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.replicas.harness import (
    Client,
    Cluster,
    Load,
    SendLog,
    check_delivered_once,
    interrupted_attempts,
    message_ids,
    smtp_account,
)
from tests.servers.smtp import SmtpSink
from tests.waiting import wait_for

pytestmark = pytest.mark.replicas

SENDS = 1000
KILL_AFTER = 300  # answers before replica 1 is killed
RESTART_AFTER = 100  # more answers before it is started again
ACCOUNTS = 3
DELIVERY_WAIT_S = 240  # bound: the dead replica's leases must expire first


@pytest.mark.timeout(600)
def test_sigkill_one_of_three_replicas_mid_run_delivers_every_accepted_message_once(
    pg_database: str, smtp_sink_factory: Any
) -> None:
    sink: SmtpSink = smtp_sink_factory(dump=True)
    client = Client()
    log = SendLog()
    load = Load([], [], log)  # replaced below; stop() in the finally needs one
    with Cluster(pg_database, 3) as cluster:
        try:
            accounts = [
                client.create_account(
                    cluster[i % 3].base, smtp_account(f"sender{i}", sink.host, sink.port)
                )
                for i in range(ACCOUNTS)
            ]
            load = Load(cluster.replicas, accounts, log, total=SENDS).start()
            wait_for(lambda: len(log.snapshot()) >= KILL_AFTER, timeout=120)
            cluster[1].kill()
            killed_at = len(log.snapshot())
            wait_for(lambda: len(log.snapshot()) >= killed_at + RESTART_AFTER, timeout=120)
            cluster[1].start()
            load.join(timeout=300)

            results = log.snapshot()
            assert len(results) == SENDS
            # Only the dead replica fails, and only at the transport level.
            unexpected = [s for s in results if s.status not in (202, None)]
            assert not unexpected, unexpected[:5]
            refused = [s for s in results if s.status is None]
            assert refused, "no request reached the killed replica"
            assert {s.replica for s in refused} == {cluster[1].name}, refused[:5]
            accepted = log.accepted
            assert len(accepted) + len(refused) == SENDS

            def stored_all_sent() -> list[dict[str, Any]] | None:
                stored = [m for a in accounts for m in client.outbox(cluster[0].base, a)]
                done = all(m["status"] == "sent" for m in stored)
                return stored if done else None

            stored = wait_for(stored_all_sent, timeout=DELIVERY_WAIT_S, interval=1.0)
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            load.stop()
            client.close()
    received = message_ids([m.content for m in sink.messages()])
    doubled = check_delivered_once(stored, accepted, received)
    # Requests cut off by the kill may have committed: stored, delivered, not counted.
    assert len(accepted) <= len(stored) <= len(accepted) + len(refused)
    taken_over = sum(1 for m in stored if interrupted_attempts(m))
    print(
        f"accepted {len(accepted)}, refused {len(refused)}, stored {len(stored)},"
        f" received {sum(received.values())}, taken over after the kill {taken_over},"
        f" doubled (interrupted after DATA) {doubled}"
    )
