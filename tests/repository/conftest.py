"""The repository contract: every test here runs on both stores (a fresh SQLite file and a
fresh PostgreSQL database), so their behaviour cannot drift apart."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.domain.accounts import Account, IncomingServer, OutgoingServer, RetrievalPolicy
from service.domain.enums import RecipientKind, Security
from service.domain.ids import new_id
from service.domain.outbox import NewOutgoing, NewRecipient
from service.domain.retrievals import MessageSummary, NewMessage
from service.domain.threads import thread_id_for
from service.repository.store import Store, create_store
from tests.servers.postgres import new_database

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def store_settings(kind: str, tmp_path: Path, **overrides: Any) -> Settings:
    database = str(tmp_path / "mailroom.db") if kind == "sqlite" else new_database()
    return Settings(database=database, secret_keys=(os.urandom(32),), **overrides)


@pytest.fixture
async def store(store_kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    opened = create_store(store_settings(store_kind, tmp_path))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def make_account(tenant: str = "default", **overrides: Any) -> Account:
    values: dict[str, Any] = {
        "id": new_id("acc"),
        "tenant": tenant,
        "name": "Alice",
        "email": "alice@example.com",
        "display_name": None,
        "incoming": IncomingServer(
            host="pop.example.com",
            port=995,
            security=Security.TLS,
            username="alice",
            password_encrypted="enc-pop",
        ),
        "outgoing": OutgoingServer(
            host="smtp.example.com",
            port=587,
            security=Security.STARTTLS,
            username="alice",
            password_encrypted="enc-smtp",
        ),
        "retrieval": RetrievalPolicy(),
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(overrides)
    return Account(**values)


@pytest.fixture
async def account(store: Store) -> Account:
    created = make_account()
    await store.accounts.add(created)
    return created


def new_message(account_id: str, n: int, **overrides: Any) -> NewMessage:
    values: dict[str, Any] = {
        "id": new_id("msg"),
        "account_id": account_id,
        "uidl": f"uidl-{n}",
        "size": 100 + n,
        "retrieved_at": T0 + timedelta(minutes=n),
        "message_id": f"<{n}@example.com>",
        "from_": f"Sender {n} <s{n}@example.com>",
        "to": ["alice@example.com"],
        "cc": [],
        "subject": f"Subject {n}",
        "date": T0 - timedelta(hours=n),
        "has_attachments": n % 2 == 0,
    }
    values.update(overrides)
    # As a retrieval names it: from the message's own headers (the store may move it).
    values.setdefault(
        "thread_id",
        thread_id_for(
            values["message_id"],
            values.get("in_reply_to"),
            values.get("references", []),
            values["id"],
        ),
    )
    raw = bytes(range(256)) + f"message {n}\r\n".encode()
    return NewMessage(summary=MessageSummary(**values), raw=raw)


def new_outgoing(account_id: str, **overrides: Any) -> NewOutgoing:
    ident = new_id("out")
    values: dict[str, Any] = {
        "id": ident,
        "account_id": account_id,
        "message_id": f"<{ident}@example.com>",
        "mail_from": "alice@example.com",
        "subject": "Hello",
        "smtputf8": False,
        "raw": b"Subject: Hello\r\n\r\nbody \x00\xff\r\n",
        "recipients": (
            NewRecipient("bob@example.com", RecipientKind.TO),
            NewRecipient("carol@example.com", RecipientKind.CC),
        ),
        "idempotency_key": None,
        "request_hash": None,
        "created_at": T0,
        "expires_at": T0 + timedelta(days=5),
    }
    values.update(overrides)
    return NewOutgoing(**values)


Factory = Callable[..., Any]
