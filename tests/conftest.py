"""Root test configuration: real-server fixtures (tests/servers/) and the full disk
(tests/disk.py) are plugins.

``MAILROOM_TEST_STORE=postgres`` runs the app-level suites on PostgreSQL (``make_settings``
points each app at a fresh database); tests marked ``sqlite_only`` (file modes, a full
tmpfs, SQLite migrations) are skipped then.
"""

import os

import pytest

pytest_plugins = [
    "tests.disk",
    "tests.servers.dovecot",
    "tests.servers.smtp",
    "tests.servers.postfix",
    "tests.servers.postgres",
]

STORE_ENV = "MAILROOM_TEST_STORE"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only: about the SQLite store itself; skipped on the PostgreSQL pass"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(STORE_ENV, "sqlite") != "postgres":
        return
    skip = pytest.mark.skip(reason="SQLite-specific; this pass runs on PostgreSQL")
    for item in items:
        if item.get_closest_marker("sqlite_only"):
            item.add_marker(skip)
