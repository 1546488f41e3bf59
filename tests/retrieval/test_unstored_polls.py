"""Scheduled polls on the only process of a SQLite store: stored when they end (one write
for a poll that finds nothing new), or as running as soon as they find work, run longer
than a moment, or an API trigger asks for their account.

The app runs on the test's own event loop (its lifespan, an ASGI transport), so the tests
can start a poll the way the scheduler does (``RetrievalService.poll``) and watch the
store's transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import service.services.retrieval as retrieval_module
from service.app import create_app
from service.domain.accounts import Account
from tests.api.conftest import API_KEY, make_settings
from tests.pop3.fault_server import ScriptedServer
from tests.retrieval.conftest import LOOPBACK, account_json, held_at_pass, scripted_account
from tests.waiting import feed_until, until

pytestmark = pytest.mark.sqlite_only  # PostgreSQL stores every retrieval as it starts


class App:
    def __init__(self, app: Any, http: httpx.AsyncClient) -> None:
        self.app, self.http = app, http
        self.service = app.state.retrievals

    async def account(self, body: dict[str, Any]) -> Account:
        response = await self.http.post("/v1/accounts", json=body)
        assert response.status_code == 201, response.text
        account: Account = await self.app.state.accounts.get("default", response.json()["id"])
        return account

    async def retrievals(self, account_id: str) -> list[dict[str, Any]]:
        response = await self.http.get(f"/v1/accounts/{account_id}/retrievals")
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items


@contextlib.asynccontextmanager
async def running(tmp_path: Path, dovecot: Any) -> AsyncIterator[App]:
    """The app, started in the test's own task (its lifespan cannot span two tasks)."""
    settings = make_settings(
        tmp_path, allowed_networks=LOOPBACK, ca_file=dovecot.ca_file, scheduler_interval_s=3600.0
    )
    application = create_app(settings)
    async with (
        application.lifespan(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application),
            base_url="http://test",
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as http,
    ):
        yield App(application, http)


def count_transactions(app: App, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the store's write transactions from now on (one list item per transaction,
    whether opened with ``transaction()`` or run whole with ``write()``)."""
    db = app.app.state.db
    original: Callable[..., Any] = db.transaction
    original_write: Callable[..., Any] = db.write
    opened: list[int] = []

    @contextlib.asynccontextmanager
    async def counted(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        opened.append(1)
        async with original(*args, **kwargs) as conn:
            yield conn

    async def counted_write(*args: Any, **kwargs: Any) -> Any:
        opened.append(1)
        return await original_write(*args, **kwargs)

    monkeypatch.setattr(db, "transaction", counted)
    monkeypatch.setattr(db, "write", counted_write)
    return opened


async def test_an_empty_poll_is_one_write_and_keeps_its_record(
    tmp_path: Path, dovecot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, dovecot) as app:
        mailbox = dovecot.add_user()
        account = await app.account(account_json(dovecot, mailbox, security="none"))
        writes = count_transactions(app, monkeypatch)
        poll = await app.service.poll(account)
        await app.service.wait_idle()
        assert len(writes) == 1  # the retrieval, its event, in one transaction
        (listed,) = await app.retrievals(account.id)
        assert listed["id"] == poll.id
        assert (listed["status"], listed["trigger"], listed["messages_on_server"]) == (
            "succeeded",
            "schedule",
            0,
        )
        assert listed["started_at"] is not None and listed["finished_at"] is not None
        ended = await feed_until(app.http, bool, types="retrieval.succeeded")
        assert [e["data"]["retrieval_id"] for e in ended] == [poll.id]


async def test_a_poll_that_finds_mail_is_stored_as_running_before_it_stores_any(
    tmp_path: Path, dovecot: Any
) -> None:
    async with running(tmp_path, dovecot) as app:
        mailbox = dovecot.add_user()
        mailbox.deliver(b"Subject: one\n\nbody\n")
        account = await app.account(account_json(dovecot, mailbox, security="none"))
        service = app.service
        seen: list[str] = []

        class Watch:
            """The store's repository, noting the status of the poll when a batch is stored."""

            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self._inner, name)

            async def store_batch(
                self, account_id: str, messages: Any, retrieval_id: str, p: Any
            ) -> Any:
                row = await service._retrievals.get(account_id, retrieval_id)
                seen.append(row.status.value if row else "absent")
                return await self._inner.store_batch(account_id, messages, retrieval_id, p)

        service._messages = Watch(service._messages)
        poll = await service.poll(account)
        await service.wait_idle()
        assert seen == ["running"]
        (listed,) = await app.retrievals(account.id)
        assert (listed["id"], listed["status"], listed["messages_downloaded"]) == (
            poll.id,
            "succeeded",
            1,
        )


@pytest.fixture
async def held_server() -> AsyncIterator[tuple[ScriptedServer, asyncio.Event]]:
    """A POP3 server whose sessions wait at PASS until released."""
    async with held_at_pass() as held:
        yield held


async def test_an_api_trigger_during_an_unstored_poll_is_409_with_its_id(
    tmp_path: Path,
    dovecot: Any,
    held_server: tuple[ScriptedServer, asyncio.Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running(tmp_path, dovecot) as app:
        server, release = held_server
        # Never stored by time in this test: only the trigger stores it.
        monkeypatch.setattr(retrieval_module, "STORE_RUNNING_AFTER_S", 3600.0)
        account = await app.account(scripted_account(server.port))
        poll = await app.service.poll(account)
        assert await app.retrievals(account.id) == []  # not stored: it has found nothing yet
        refused = await app.http.post(f"/v1/accounts/{account.id}/retrievals")
        assert refused.status_code == 409, refused.text
        assert refused.json()["code"] == "retrieval_running"
        assert refused.json()["resource_id"] == poll.id
        (listed,) = await app.retrievals(account.id)
        assert (listed["id"], listed["status"]) == (poll.id, "running")
        release.set()
        await app.service.wait_idle()
        (listed,) = await app.retrievals(account.id)
        assert (listed["id"], listed["status"]) == (poll.id, "succeeded")


async def test_a_slow_poll_is_stored_as_running(
    tmp_path: Path,
    dovecot: Any,
    held_server: tuple[ScriptedServer, asyncio.Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running(tmp_path, dovecot) as app:
        server, release = held_server
        monkeypatch.setattr(retrieval_module, "STORE_RUNNING_AFTER_S", 0.05)
        account = await app.account(scripted_account(server.port))
        poll = await app.service.poll(account)
        # It shows as running while it waits at PASS.
        listed = await until(lambda: app.retrievals(account.id), bool)
        assert [(r["id"], r["status"]) for r in listed] == [(poll.id, "running")]
        release.set()
        await app.service.wait_idle()
        (done,) = await app.retrievals(account.id)
        assert (done["id"], done["status"]) == (poll.id, "succeeded")
