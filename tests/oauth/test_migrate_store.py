"""migrate-store checks OAuth2 grants with the field they were sealed under (migration 11)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

from litestar.testing import AsyncTestClient

from service.app import create_app
from service.config import ApiKey, Settings
from tests.migrate.test_migrate_store import HEADERS, KEY, migrate_store, secret_key


async def test_oauth2_grants_decrypt_in_the_copy_check(tmp_path: Path, pg_database: str) -> None:
    secret = secret_key()
    db = tmp_path / "mailroom.db"
    settings = Settings(
        database=str(db),
        api_keys=(ApiKey("default", KEY),),
        secret_keys=(base64.urlsafe_b64decode(secret),),
    )
    async with AsyncTestClient(app=create_app(settings)) as client:
        created = await client.post(
            "/v1/accounts",
            headers=HEADERS,
            json={
                "name": "o",
                "email": "o@example.com",
                "incoming": {
                    "host": "pop.example.com",
                    "username": "u",
                    "auth": "oauth2",
                    "token_url": "https://oauth.example.com/token",
                    "client_id": "c",
                    "refresh_token": "r",
                },
                "outgoing": {
                    "host": "smtp.example.com",
                    "username": "u",
                    "auth": "oauth2",
                    "access_token": "a",
                },
            },
        )
        assert created.status_code == 201, created.text
    wrong = await asyncio.to_thread(migrate_store, f"sqlite:///{db}", pg_database, secret_key())
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    copied = await asyncio.to_thread(migrate_store, f"sqlite:///{db}", pg_database, secret)
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert "credentials: 2 decrypt with MAILROOM_SECRET_KEY" in copied.stdout + copied.stderr
