"""Event store tests run on both stores (a fresh SQLite file and a fresh PostgreSQL database)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.repository.store import Store, create_store
from tests.repository.conftest import store_settings


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(store_kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    opened = create_store(store_settings(store_kind, tmp_path))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
