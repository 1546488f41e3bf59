"""Retrieval end to end against a real Dovecot: storage, policies, failures, schedule."""

from __future__ import annotations

import asyncio
import poplib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.domain.accounts import Account, RetrievalPolicy
from service.services.scheduler import is_due
from tests.retrieval.conftest import (
    DATA,
    account_json,
    all_messages,
    create_account,
    retrieve,
    wait_done,
)

CORPUS = sorted(DATA.glob("*.eml"))


def served_by_dovecot(dovecot: Any, mailbox: Any) -> dict[str, bytes]:
    """UIDL -> the exact bytes Dovecot serves for RETR (dot-unstuffed, CRLF)."""
    conn = poplib.POP3("127.0.0.1", dovecot.pop3_port, timeout=30)
    try:
        conn.user(mailbox.user)
        conn.pass_(mailbox.password)
        out: dict[str, bytes] = {}
        for line in conn.uidl()[1]:
            number, uidl = line.split()
            lines = conn.retr(int(number))[1]
            out[uidl.decode()] = b"".join(part + b"\r\n" for part in lines)
        return out
    finally:
        conn.quit()


async def test_every_shape_stored_byte_identical(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    for path in CORPUS:
        mailbox.deliver(path.read_bytes())
    expected = served_by_dovecot(dovecot, mailbox)
    assert len(expected) == len(CORPUS) > 20
    account = await create_account(client, dovecot, mailbox)
    done = await retrieve(client, account)
    assert done["status"] == "succeeded", done
    assert done["messages_on_server"] == len(CORPUS)
    assert done["messages_downloaded"] == len(CORPUS)
    assert done["bytes_downloaded"] == sum(len(b) for b in expected.values())
    assert done["messages_deleted"] == 0
    messages = await all_messages(client, account)
    assert sorted(m["uidl"] for m in messages) == sorted(expected)
    for summary in messages:
        url = f"/v1/accounts/{account}/messages/{summary['id']}"
        raw = await client.get(url + "/raw")
        assert raw.status_code == 200
        assert raw.headers["content-type"].startswith("message/rfc822")
        assert raw.content == expected[summary["uidl"]]
        assert summary["size"] == len(raw.content)
        detail = await client.get(url)
        assert detail.status_code == 200, (summary, detail.text)
        for attachment in detail.json()["attachments"]:
            got = await client.get(f"{url}/attachments/{attachment['index']}")
            assert got.status_code == 200
            assert len(got.content) == attachment["size"]
            assert got.headers["content-disposition"].startswith("attachment")
    # leave_on_server (the default) kept every message on the server
    assert mailbox.count() == len(CORPUS)


async def test_parsed_views_of_real_shapes(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    for name in ("attachments.eml", "koi8-r.eml", "malformed-no-close-boundary.eml"):
        mailbox.deliver((DATA / name).read_bytes())
    account = await create_account(client, dovecot, mailbox)
    assert (await retrieve(client, account))["status"] == "succeeded"
    by_subject = {m["subject"]: m for m in await all_messages(client, account)}
    koi = next(m for s, m in by_subject.items() if s and any("\u0400" <= c <= "\u04ff" for c in s))
    detail = (await client.get(f"/v1/accounts/{account}/messages/{koi['id']}")).json()
    assert detail["text"]["charset"] == "koi8-r"
    assert any("\u0400" <= c <= "\u04ff" for c in detail["text"]["content"])
    with_binary = [m for m in by_subject.values() if m["has_attachments"]]
    assert with_binary
    for message in with_binary:
        detail = (await client.get(f"/v1/accounts/{account}/messages/{message['id']}")).json()
        for att in detail["attachments"]:
            if att["content_type"] == "application/octet-stream" and not detail["defects"]:
                data = (
                    await client.get(
                        f"/v1/accounts/{account}/messages/{message['id']}"
                        f"/attachments/{att['index']}"
                    )
                ).content
                assert data == bytes(range(256))


async def test_leave_on_server_false_empties_mailbox_once(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    for i in range(30):
        mailbox.deliver(f"Subject: m{i}\n\nbody {i}\n".encode())
    account = await create_account(client, dovecot, mailbox, leave_on_server=False)
    done = await retrieve(client, account)
    assert (done["status"], done["messages_downloaded"], done["messages_deleted"]) == (
        "succeeded",
        30,
        30,
    )
    assert mailbox.count() == 0
    again = await retrieve(client, account)
    assert (again["messages_on_server"], again["messages_downloaded"]) == (0, 0)
    subjects = sorted(m["subject"] for m in await all_messages(client, account))
    assert subjects == sorted(f"m{i}" for i in range(30))


async def test_only_new_mail_is_downloaded_and_local_delete_sticks(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    mailbox.deliver(b"Subject: first\n\none\n")
    account = await create_account(client, dovecot, mailbox)
    assert (await retrieve(client, account))["messages_downloaded"] == 1
    mailbox.deliver(b"Subject: second\n\ntwo\n")
    done = await retrieve(client, account)
    assert (done["messages_on_server"], done["messages_downloaded"]) == (2, 1)
    first = next(m for m in await all_messages(client, account) if m["subject"] == "first")
    url = f"/v1/accounts/{account}/messages/{first['id']}"
    assert (await client.delete(url)).status_code == 204
    assert (await client.get(url)).status_code == 404
    done = await retrieve(client, account)
    assert done["messages_downloaded"] == 0  # a local delete does not bring it back
    assert [m["subject"] for m in await all_messages(client, account)] == ["second"]


async def test_oversized_messages_skipped_and_never_deleted(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    mailbox.deliver(b"Subject: small\n\nhi\n")
    mailbox.deliver(b"Subject: big\n\n" + b"x" * 5000 + b"\n")
    account = await create_account(
        client, dovecot, mailbox, leave_on_server=False, max_message_bytes=2048
    )
    done = await retrieve(client, account)
    assert done["status"] == "succeeded", done
    assert (done["messages_downloaded"], done["messages_skipped"], done["messages_deleted"]) == (
        1,
        1,
        1,
    )
    assert mailbox.count() == 1  # the big one stays on the server
    again = await retrieve(client, account)
    assert (again["messages_downloaded"], again["messages_skipped"]) == (0, 0)
    assert mailbox.count() == 1


@pytest.mark.sqlite_only  # looks inside the SQLite store itself
async def test_delete_after_days_removes_old_server_copies(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    mailbox.deliver(b"Subject: old\n\nold\n")
    account = await create_account(client, dovecot, mailbox, delete_after_days=3)
    done = await retrieve(client, account)
    assert (done["messages_downloaded"], done["messages_deleted"]) == (1, 0)
    mailbox.deliver(b"Subject: new\n\nnew\n")
    # Age the first message's retrieval by four days, as if time had passed.
    db = client.app.state.db
    async with db.transaction() as conn:
        await conn.execute(
            "UPDATE server_messages SET seen_at = ? WHERE account_id = ?",
            ((datetime.now(UTC) - timedelta(days=4)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), account),
        )
    done = await retrieve(client, account)
    assert (done["messages_downloaded"], done["messages_deleted"]) == (1, 1)
    assert mailbox.count() == 1  # only the new one, retrieved just now, stays
    assert len(await all_messages(client, account)) == 2


async def test_wrong_password_fails_with_auth_failed(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    body = account_json(dovecot, mailbox)
    body["incoming"]["password"] = "wrong-password"
    account = (await client.post("/v1/accounts", json=body)).json()["id"]
    done = await retrieve(client, account)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "auth_failed"
    assert "wrong-password" not in str(done)


async def test_server_down_fails_with_connect_failed(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any, unused_tcp_port: int
) -> None:
    body = account_json(dovecot, mailbox)
    body["incoming"]["port"] = unused_tcp_port
    account = (await client.post("/v1/accounts", json=body)).json()["id"]
    done = await retrieve(client, account)
    assert (done["status"], done["error"]["code"]) == ("failed", "connect_failed")
    # the service keeps working
    assert (await client.get("/ready")).status_code == 200


async def test_starttls_and_plain_security_modes(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    mailbox.deliver(b"Subject: s\n\nhello\n")
    for security in ("starttls", "none"):
        body = account_json(dovecot, mailbox, security=security)
        body["name"] = security
        account = (await client.post("/v1/accounts", json=body)).json()["id"]
        done = await retrieve(client, account)
        assert (done["status"], done["messages_downloaded"]) == ("succeeded", 1), done


async def test_concurrent_trigger_is_409_with_running_id(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    for i in range(200):
        mailbox.deliver(f"Subject: {i}\n\n".encode() + b"y" * 4000 + b"\n")
    account = await create_account(client, dovecot, mailbox)
    first = await client.post(f"/v1/accounts/{account}/retrievals")
    second = await client.post(f"/v1/accounts/{account}/retrievals")
    assert first.status_code == 202
    assert second.status_code == 409, second.text
    assert second.json()["code"] == "retrieval_running"
    assert second.json()["resource_id"] == first.json()["id"]
    await wait_done(client, account, first.json()["id"])
    listing = (await client.get(f"/v1/accounts/{account}/retrievals")).json()
    assert [r["id"] for r in listing["items"]] == [first.json()["id"]]


async def test_schedule_retrieves_without_a_trigger(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    mailbox.deliver(b"Subject: scheduled\n\nhi\n")
    account = await create_account(client, dovecot, mailbox, poll_interval_minutes=60)
    for _ in range(600):
        items = (await client.get(f"/v1/accounts/{account}/retrievals")).json()["items"]
        if items and items[0]["status"] == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert items and items[0]["trigger"] == "schedule", items
    assert [m["subject"] for m in await all_messages(client, account)] == ["scheduled"]
    # not due again for an hour: the scheduler leaves it alone
    await asyncio.sleep(0.5)
    assert len((await client.get(f"/v1/accounts/{account}/retrievals")).json()["items"]) == 1


def test_schedule_due_rule_and_login_delay_floor() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    base = Account(
        id="acc_x",
        tenant="default",
        name="n",
        email="a@b.c",
        display_name=None,
        incoming=None,  # type: ignore[arg-type]
        outgoing=None,  # type: ignore[arg-type]
        retrieval=RetrievalPolicy(poll_interval_minutes=5),
        created_at=now,
        updated_at=now,
    )
    assert is_due(base, None, now)
    assert not is_due(base, now - timedelta(minutes=4), now)
    assert is_due(base, now - timedelta(minutes=5), now)
    slow = Account(
        **{**{f: getattr(base, f) for f in base.__struct_fields__}, "login_delay_s": 900}
    )
    assert not is_due(slow, now - timedelta(minutes=10), now)
    assert is_due(slow, now - timedelta(minutes=15), now)
    never = Account(
        **{**{f: getattr(base, f) for f in base.__struct_fields__}, "retrieval": RetrievalPolicy()}
    )
    assert not is_due(never, None, now)


@pytest.mark.sqlite_only  # looks inside the SQLite store itself
async def test_deleting_account_deletes_its_mail(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any, tmp_path: Path
) -> None:
    mailbox.deliver(b"Subject: x\n\nx\n")
    account = await create_account(client, dovecot, mailbox)
    await retrieve(client, account)
    assert (await client.delete(f"/v1/accounts/{account}")).status_code == 204
    assert (await client.get(f"/v1/accounts/{account}/messages")).status_code == 404
    conn = sqlite3.connect(tmp_path / "mailroom.db")
    for table in ("messages", "message_bodies", "retrievals", "server_messages"):
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
