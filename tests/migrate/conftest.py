"""migrate-store tests: a SQLite store made by the real service, copied into PostgreSQL.

``pg_database`` (a fresh database's DSN) comes from ``tests/servers/postgres.py``; until
that module exists, a stand-in here creates one on the PostgreSQL at 127.0.0.1:5432.
"""

from __future__ import annotations

import importlib.util
import secrets
import subprocess
from collections.abc import Iterator

import pytest

if importlib.util.find_spec("tests.servers.postgres") is None:
    SHARED = "postgresql://postgres@127.0.0.1:5432"

    def _psql(sql: str) -> None:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-Atc", sql],
            check=True,
            capture_output=True,
            timeout=60,
        )

    @pytest.fixture
    def pg_database() -> Iterator[str]:
        """Stand-in: a fresh database on the shared server, dropped afterwards."""
        name = f"mr_{secrets.token_hex(6)}"
        _psql(f"CREATE DATABASE {name}")
        try:
            yield f"{SHARED}/{name}"
        finally:
            _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
