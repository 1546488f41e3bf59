"""Retrieval failures that tell the truth, and ends that cannot be recorded (app level).

- a server that refuses logins before TLS (real Dovecot on 127.0.0.2) is `tls_required`
  with the server's words; `-ERR [IN-USE]` is `mailbox_locked` (a scripted server), and
  the schedule tries a locked mailbox again sooner than its poll interval;
- a retrieval whose end the store refuses to record does not wedge the account: the next
  trigger records it and starts, and a background retry records it without any trigger.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

import service.app
import service.services.retrieval as retrieval_module
import service.services.scheduler as scheduler_module
from service.app import create_app
from service.domain.accounts import Account, RetrievalPolicy
from service.domain.enums import RetrievalStatus
from service.domain.retrievals import RetrievalError, RetrievalProgress
from service.repository.errors import StorageFullError
from service.repository.retrievals import RetrievalRepository
from service.repository.store import Store
from service.services.scheduler import is_due
from tests.api.conftest import API_KEY, make_settings
from tests.pop3.fault_server import MiniPOP3, ScriptedServer, Session
from tests.retrieval.conftest import (
    LOOPBACK,
    account_json,
    create_account,
    retrieve,
    scripted_account,
    wait_done,
)
from tests.servers.dovecot import Dovecot, running_dovecot
from tests.waiting import until

DOVECOT_PLAINTEXT_REFUSAL = (
    "[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
)


@pytest.fixture(scope="module")
def strict_dovecot() -> Iterator[Dovecot]:
    """Dovecot that refuses plaintext logins on connections it does not trust (127.0.0.2)."""
    with running_dovecot(listen="127.0.0.1, 127.0.0.2", plaintext_auth=False) as server:
        yield server


async def test_login_refused_before_tls_is_tls_required_with_the_server_text(
    client: AsyncTestClient[Any], strict_dovecot: Dovecot, caplog: pytest.LogCaptureFixture
) -> None:
    mailbox = strict_dovecot.add_user()
    mailbox.deliver(b"Subject: kept\n\nhi\n")
    body = account_json(strict_dovecot, mailbox, security="none")
    body["incoming"]["host"] = "127.0.0.2"  # not "secure" to Dovecot: no plaintext login
    account = (await client.post("/v1/accounts", json=body)).json()["id"]
    caplog.set_level(logging.INFO, logger="mailroom.retrieval")
    done = await retrieve(client, account)
    assert (done["status"], done["error"]["code"]) == ("failed", "tls_required"), done
    assert done["error"]["detail"] == (
        f"the POP3 server answered -ERR to USER: {DOVECOT_PLAINTEXT_REFUSAL}"
    )
    assert mailbox.password not in str(done)
    assert mailbox.count() == 1
    # The same mailbox over 127.0.0.1 (which Dovecot trusts) logs in: the refusal was
    # about the connection, not the credentials.
    body["incoming"]["host"] = "127.0.0.1"
    body["name"] = "trusted"
    trusted = (await client.post("/v1/accounts", json=body)).json()["id"]
    assert (await retrieve(client, trusted))["status"] == "succeeded"
    # One event line per finished retrieval, with its counts and no secret.
    events = [r for r in caplog.records if r.getMessage() == "retrieval finished"]
    assert len(events) == 2
    fields = events[0].fields  # type: ignore[attr-defined]
    assert fields["retrieval_id"] == done["id"]
    assert (fields["status"], fields["code"], fields["account_id"]) == (
        "failed",
        "tls_required",
        account,
    )
    assert fields["tenant"] == "default" and fields["duration_s"] >= 0
    assert events[1].fields["messages_downloaded"] == 1  # type: ignore[attr-defined]
    assert mailbox.password not in caplog.text


async def test_in_use_mailbox_is_mailbox_locked(client: AsyncTestClient[Any]) -> None:
    mini = MiniPOP3(replies={"PASS": b"-ERR [IN-USE] Mailbox is locked by another session\r\n"})
    async with ScriptedServer(mini) as server:
        body = scripted_account(server.port)
        account = (await client.post("/v1/accounts", json=body)).json()["id"]
        done = await retrieve(client, account)
    assert (done["status"], done["error"]["code"]) == ("failed", "mailbox_locked"), done
    assert done["error"]["detail"] == (
        "the POP3 server answered -ERR to PASS: [IN-USE] Mailbox is locked by another session"
    )


async def test_scheduled_poll_retries_a_locked_mailbox_sooner(
    client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler_module, "LOCKED_RETRY_S", 0.3)
    logins: list[bytes] = []

    async def password(session: Session, line: bytes) -> bool:
        logins.append(line)
        if len(logins) == 1:  # the first session finds another one holding the mailbox
            session.send(b"-ERR [IN-USE] Mailbox is locked by another session\r\n")
        else:
            session.authenticated = True
            session.send(b"+OK\r\n")
        return False

    mini = MiniPOP3(messages=[b"Subject: later\r\n\r\nhi\r\n"], replies={"PASS": password})
    async with ScriptedServer(mini) as server:
        body = scripted_account(server.port, poll_interval_minutes=60)
        account = (await client.post("/v1/accounts", json=body)).json()["id"]
        url = f"/v1/accounts/{account}/retrievals"
        listing = await until(
            lambda: client.get(url),
            lambda r: [i["status"] for i in r.json()["items"]] == ["succeeded", "failed"],
        )
    older = listing.json()["items"][1]
    assert (older["trigger"], older["error"]["code"]) == ("schedule", "mailbox_locked")
    # Not an hour later: the locked poll was retried by the schedule, sooner.
    assert listing.json()["items"][0]["trigger"] == "schedule"
    assert listing.json()["items"][0]["messages_downloaded"] == 1


def test_locked_retry_is_sooner_but_keeps_the_login_delay_floor() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    account = Account(
        id="acc_x",
        tenant="default",
        name="n",
        email="a@b.c",
        display_name=None,
        incoming=None,  # type: ignore[arg-type]
        outgoing=None,  # type: ignore[arg-type]
        retrieval=RetrievalPolicy(poll_interval_minutes=30),
        created_at=now,
        updated_at=now,
    )
    two_minutes_ago = now - timedelta(minutes=2)
    assert not is_due(account, two_minutes_ago, now)
    assert is_due(account, two_minutes_ago, now, locked=True)
    slow = msgspec.structs.replace(account, login_delay_s=600)
    assert not is_due(slow, two_minutes_ago, now, locked=True)


# Ends that cannot be recorded ---------------------------------------------------------------


class FlakyFinish:
    """The store's real repository, except that ``finish`` finds the disk full ``failures``
    times."""

    failures = 0
    refused: list[str] = []

    def __init__(self, inner: RetrievalRepository) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def finish(
        self,
        retrieval_id: str,
        status: RetrievalStatus,
        at: datetime,
        progress: RetrievalProgress,
        error: RetrievalError | None,
        *,
        next_poll_at: datetime | None = None,
        tenant: str | None = None,
        account_id: str | None = None,
    ) -> None:
        if FlakyFinish.failures > 0:
            FlakyFinish.failures -= 1
            FlakyFinish.refused.append(retrieval_id)
            raise StorageFullError("database or disk is full")
        await self._inner.finish(
            retrieval_id,
            status,
            at,
            progress,
            error,
            next_poll_at=next_poll_at,
            tenant=tenant,
            account_id=account_id,
        )


@pytest.fixture
async def flaky_client(
    tmp_path: Path, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AsyncTestClient[Any]]:
    create_store = service.app.create_store

    def flaky_store(settings: Any) -> Store:
        store = create_store(settings)
        store.retrievals = FlakyFinish(store.retrievals)  # type: ignore[assignment]
        return store

    monkeypatch.setattr(service.app, "create_store", flaky_store)
    monkeypatch.setattr(FlakyFinish, "refused", [])
    settings = make_settings(tmp_path, allowed_networks=LOOPBACK, ca_file=dovecot.ca_file)
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield test_client


@pytest.mark.sqlite_only  # looks inside the SQLite store itself
async def test_unrecorded_end_does_not_wedge_the_account(
    flaky_client: AsyncTestClient[Any],
    dovecot: Dovecot,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = flaky_client
    # No background retry within this test: the next trigger must do it.
    monkeypatch.setattr(retrieval_module, "FINISH_RETRY_DELAYS_S", (3600.0,))
    mailbox = dovecot.add_user()
    mailbox.deliver(b"Subject: one\n\n1\n")
    account = await create_account(client, dovecot, mailbox)
    FlakyFinish.failures = 1
    first = (await client.post(f"/v1/accounts/{account}/retrievals")).json()
    service = client.app.state.retrievals

    async def slots() -> int:
        return int(service.running)

    await until(slots, lambda held: held == 0)  # its task has ended
    assert FlakyFinish.refused == [first["id"]]
    url = f"/v1/accounts/{account}/retrievals/{first['id']}"
    db = client.app.state.db
    query = "SELECT status FROM retrievals WHERE id = ?"
    assert (await db.fetch_one(query, (first["id"],)))["status"] == "running"  # in the store
    # The API already tells how it ended (the process knows).
    assert (await client.get(url)).json()["status"] == "succeeded"
    # The task is over: the next trigger records the first one's real end and starts.
    second = await client.post(f"/v1/accounts/{account}/retrievals")
    assert second.status_code == 202, second.text
    recorded = (await client.get(url)).json()
    assert (recorded["status"], recorded["messages_downloaded"]) == ("succeeded", 1), recorded
    done = await wait_done(client, account, second.json()["id"])
    assert (done["status"], done["messages_downloaded"]) == ("succeeded", 0)


@pytest.mark.sqlite_only  # looks inside the SQLite store itself
async def test_unrecorded_end_is_recorded_in_the_background(
    flaky_client: AsyncTestClient[Any],
    dovecot: Dovecot,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = flaky_client
    monkeypatch.setattr(retrieval_module, "FINISH_RETRY_DELAYS_S", (0.01, 0.02, 0.05))
    mailbox = dovecot.add_user()
    mailbox.deliver(b"Subject: one\n\n1\n")
    account = await create_account(client, dovecot, mailbox)
    FlakyFinish.failures = 4  # the first attempt and three retries find the disk full
    first = (await client.post(f"/v1/accounts/{account}/retrievals")).json()
    db = client.app.state.db
    query = "SELECT status, messages_downloaded FROM retrievals WHERE id = ?"
    row = await until(
        lambda: db.fetch_one(query, (first["id"],)),
        lambda row: row["status"] not in ("queued", "running"),
    )
    assert (row["status"], row["messages_downloaded"]) == ("succeeded", 1)  # in the store
    assert FlakyFinish.refused == [first["id"]] * 4


@pytest.mark.sqlite_only  # looks inside the SQLite store itself
async def test_active_row_without_a_task_is_closed_by_the_next_trigger(
    client: AsyncTestClient[Any], dovecot: Dovecot
) -> None:
    mailbox = dovecot.add_user()
    account = await create_account(client, dovecot, mailbox)
    # A row left running with no task of this process behind it.
    async with client.app.state.db.transaction() as conn:
        await conn.execute(
            "INSERT INTO retrievals (id, account_id, trigger, status, created_at, started_at)"
            " VALUES ('ret_orphan', ?, 'api', 'running', ?, ?)",
            (account, "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:00.000000Z"),
        )
    started = await client.post(f"/v1/accounts/{account}/retrievals")
    assert started.status_code == 202, started.text
    orphan = (await client.get(f"/v1/accounts/{account}/retrievals/ret_orphan")).json()
    assert (orphan["status"], orphan["error"]["code"]) == ("failed", "interrupted")
    assert (await wait_done(client, account, started.json()["id"]))["status"] == "succeeded"
