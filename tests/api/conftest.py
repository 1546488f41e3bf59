"""An app on a temporary database, driven through Litestar's async test client.

``MAILROOM_TEST_STORE=postgres``: ``make_settings`` gives each app a fresh PostgreSQL
database instead of a SQLite file (dropped when the test ends).
"""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.config import ApiKey, Settings
from tests.servers.postgres import new_database

API_KEY = "test-key-0123456789abcdef"
OTHER_TENANT_KEY = "other-key-0123456789abcdef"


def app_database(tmp_path: Path) -> str:
    """The database of a test's app: a file in ``tmp_path``, or a new PostgreSQL database
    on the PostgreSQL pass (``MAILROOM_TEST_STORE=postgres``)."""
    if os.environ.get("MAILROOM_TEST_STORE", "sqlite") == "postgres":
        return new_database()
    return str(tmp_path / "mailroom.db")


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database": overrides.pop("database", None) or app_database(tmp_path),
        "api_keys": (ApiKey("default", API_KEY), ApiKey("other", OTHER_TENANT_KEY)),
        "secret_keys": (os.urandom(32),),
    }
    values.update(overrides)
    return Settings(**values)


def account_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Alice",
        "email": "alice@example.com",
        "incoming": {
            "host": "pop.example.com",
            "security": "tls",
            "username": "alice",
            "password": "pop-secret-Zq9",
        },
        "outgoing": {
            "host": "smtp.example.com",
            "security": "starttls",
            "username": "alice",
            "password": "smtp-secret-Xk4",
        },
    }
    body.update(overrides)
    return body


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(settings)
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield test_client


@pytest.fixture
def b64key() -> Callable[[], str]:
    return lambda: base64.urlsafe_b64encode(os.urandom(32)).decode()
