"""Multi-replica tests: real service processes on one PostgreSQL database.

``pg_database`` (a fresh database on the suite's PostgreSQL) comes from
``tests/servers/postgres.py``; ``private_postgres`` is a cluster of the test's own, which
it may stop and start (the shared server is never restarted).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers.postgres import PrivateCluster, running_postgres


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "replicas: several real service processes on one PostgreSQL database"
    )


@pytest.fixture
def private_postgres() -> Iterator[PrivateCluster]:
    """A PostgreSQL cluster of this test's own (initdb, a free port), removed after it."""
    with running_postgres() as cluster:
        yield cluster
