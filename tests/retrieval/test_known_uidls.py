"""Known UIDLs the server no longer lists are forgotten after the retrieval, not during it."""

from __future__ import annotations

import asyncio
import os
import poplib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from service.config import Settings
from service.repository.store import Store, create_store
from tests.retrieval.conftest import WAIT_S, create_account, retrieve


@asynccontextmanager
async def own_store(client: AsyncTestClient[Any], tmp_path: Path) -> AsyncIterator[Store]:
    """The app's database, opened on this test's loop (the app runs on another one)."""
    dsn = getattr(client.app.state.store.db, "dsn", None)
    database = dsn or str(tmp_path / "mailroom.db")
    store = create_store(Settings(database=database, secret_keys=(os.urandom(32),)))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def delete_on_server(dovecot: Any, mailbox: Any, number: int) -> str:
    """Another client deletes message ``number``; returns its UIDL."""
    conn = poplib.POP3("127.0.0.1", dovecot.pop3_port, timeout=30)
    try:
        conn.user(mailbox.user)
        conn.pass_(mailbox.password)
        uidl = conn.uidl(number).split()[2].decode()
        conn.dele(number)
    finally:
        conn.quit()
    return uidl


async def test_uidls_gone_from_the_server_are_forgotten_after_the_retrieval(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any, tmp_path: Path
) -> None:
    async with own_store(client, tmp_path) as store:
        await check_forgotten(client, dovecot, mailbox, store)


async def check_forgotten(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any, store: Store
) -> None:
    for n in range(3):
        mailbox.deliver(f"Subject: kept {n}\n\nbody {n}\n".encode())
    account = await create_account(client, dovecot, mailbox, security="none")
    first = await retrieve(client, account)
    assert (first["status"], first["messages_downloaded"]) == ("succeeded", 3)
    known = set(await store.messages.known(account))
    assert len(known) == 3

    gone = delete_on_server(dovecot, mailbox, 1)
    second = await retrieve(client, account)
    assert (second["status"], second["messages_downloaded"]) == ("succeeded", 0)
    # Forgotten in the background once the retrieval has ended (bounded wait).
    for _ in range(WAIT_S * 20):
        if set(await store.messages.known(account)) == known - {gone}:
            break
        await asyncio.sleep(0.05)
    assert set(await store.messages.known(account)) == known - {gone}
    # The stored message stays; nothing is downloaded again.
    assert await store.messages.count(account) == 3
    third = await retrieve(client, account)
    assert (third["status"], third["messages_downloaded"]) == ("succeeded", 0)
