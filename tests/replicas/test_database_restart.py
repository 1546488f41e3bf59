"""The database restarted under load: 503 ``storage_unavailable`` meanwhile, then recovery.

Three replicas on a PostgreSQL cluster of the test's own (the machine's shared server is
never restarted). Under a steady send load the cluster is stopped as in a crash
(``pg_ctl -m immediate``): every request then gets a problem+json 503
``storage_unavailable`` within a bounded time (never a 500, never a hang), ``/ready``
says not ready, and every replica keeps running. Once the database is started again every
replica accepts sends by itself (its pool reconnects), its workers resume, and every
message acknowledged before, during or after the outage is delivered.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.replicas.harness import (
    DB_TIMEOUT_S,
    Client,
    Cluster,
    Load,
    SendLog,
    Sent,
    check_delivered_once,
    message_ids,
    smtp_account,
)
from tests.servers.postgres import PrivateCluster
from tests.servers.smtp import SmtpSink
from tests.waiting import wait_for

pytestmark = pytest.mark.replicas

THREADS = 6
# Past this a request "hung": the store must give up after MAILROOM_DB_TIMEOUT and answer.
REQUEST_BOUND_S = 3 * DB_TIMEOUT_S + 5
ANSWERS_BEFORE = 100
OUTAGE_503S_PER_REPLICA = 3
RECOVERY_WAIT_S = 120
DELIVERY_WAIT_S = 180


def is_unavailable(sent: Sent) -> bool:
    return (
        sent.status == 503
        and (sent.content_type or "").startswith("application/problem+json")
        and sent.body is not None
        and sent.body.get("code") == "storage_unavailable"
        and sent.body.get("status") == 503
    )


@pytest.mark.timeout(600)
def test_database_restart_under_load_answers_503_then_every_replica_recovers(
    private_postgres: PrivateCluster, smtp_sink_factory: Any
) -> None:
    pg = private_postgres
    sink: SmtpSink = smtp_sink_factory(dump=True)
    client = Client()
    log = SendLog()
    load = Load([], [], log)  # replaced below; stop() in the finally needs one
    with Cluster(pg.dsn, 3) as cluster:
        try:
            accounts = [
                client.create_account(
                    cluster[i].base, smtp_account(f"outage{i}", sink.host, sink.port)
                )
                for i in range(2)
            ]
            load = Load(
                cluster.replicas,
                accounts,
                log,
                threads=THREADS,
                pause_s=0.02,
                timeout=REQUEST_BOUND_S,
            ).start()

            def answers_since(start: int) -> list[Sent]:
                return log.snapshot()[start:]

            wait_for(lambda: len(log.snapshot()) >= ANSWERS_BEFORE, timeout=120)
            pg.stop("immediate")
            down_at = len(log.snapshot())

            def each_replica_refused() -> bool:
                since = answers_since(down_at)
                return all(
                    sum(1 for s in since if s.replica == r.name and is_unavailable(s))
                    >= OUTAGE_503S_PER_REPLICA
                    for r in cluster.replicas
                )

            wait_for(each_replica_refused, timeout=RECOVERY_WAIT_S, interval=0.1)
            for replica in cluster.replicas:
                assert replica.running, replica.output()[-5000:]
                ready = httpx.get(replica.base + "/ready", timeout=REQUEST_BOUND_S)
                assert ready.status_code == 503, ready.text
            pg.start()
            up_at = len(log.snapshot())

            def each_replica_accepts() -> bool:
                since = answers_since(up_at)
                return all(
                    any(s.replica == r.name and s.status == 202 for s in since)
                    for r in cluster.replicas
                )

            wait_for(each_replica_accepts, timeout=RECOVERY_WAIT_S, interval=0.1)
            back_at = len(log.snapshot())
            wait_for(lambda: len(log.snapshot()) >= back_at + ANSWERS_BEFORE, timeout=120)
            load.stop()
            load.join(timeout=REQUEST_BOUND_S + 30)
            for replica in cluster.replicas:
                assert replica.running, replica.output()[-5000:]
                assert httpx.get(replica.base + "/ready", timeout=10).status_code == 200

            results = log.snapshot()
            # Nothing but 202 or a clean 503: no 500, no transport error, no timeout.
            other = [s for s in results if s.status != 202 and not is_unavailable(s)]
            assert not other, other[:5]
            # Recovered for good: the last answers are all acceptances.
            assert all(s.status == 202 for s in results[-ANSWERS_BEFORE // 2 :])
            accepted = log.accepted

            def stored_all_sent() -> list[dict[str, Any]] | None:
                stored = [m for a in accounts for m in client.outbox(cluster[1].base, a)]
                return stored if all(m["status"] == "sent" for m in stored) else None

            stored = wait_for(stored_all_sent, timeout=DELIVERY_WAIT_S, interval=0.5)
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            load.stop()
            client.close()
    received = message_ids([m.content for m in sink.messages()])
    doubled = check_delivered_once(stored, accepted, received)
    unavailable = sum(1 for s in results if is_unavailable(s))
    print(
        f"accepted {len(accepted)}, 503 storage_unavailable {unavailable},"
        f" stored {len(stored)}, doubled (interrupted) {doubled}"
    )
