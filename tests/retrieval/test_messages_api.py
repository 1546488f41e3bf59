"""The messages API over a retrieved mailbox: filters, pagination, 404s, safe downloads."""

from __future__ import annotations

from typing import Any

from litestar.testing import AsyncTestClient

from tests.api.conftest import OTHER_TENANT_KEY
from tests.retrieval.conftest import DATA, all_messages, create_account, retrieve


async def test_filters_and_pagination(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    for i in range(12):
        sender = "boss@corp.example" if i % 3 == 0 else f"user{i}@example.com"
        mailbox.deliver(f"From: {sender}\nSubject: Report {i}\n\nbody\n".encode())
    mailbox.deliver((DATA / "attachments.eml").read_bytes())
    account = await create_account(client, dovecot, mailbox)
    assert (await retrieve(client, account))["messages_downloaded"] == 13
    url = f"/v1/accounts/{account}/messages"

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 5}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get(url, params=params)).json()
        assert len(page["items"]) <= 5
        seen += [m["id"] for m in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 13
    assert seen == sorted(seen, reverse=True)  # newest first

    boss = (await client.get(url, params={"from": "BOSS@corp"})).json()["items"]
    assert len(boss) == 4 and all("boss@corp.example" in m["from"] for m in boss)
    report_1 = (await client.get(url, params={"subject": "report 1"})).json()["items"]
    assert sorted(m["subject"] for m in report_1) == ["Report 1", "Report 10", "Report 11"]
    with_att = (await client.get(url, params={"has_attachments": "true"})).json()["items"]
    assert len(with_att) == 1 and with_att[0]["has_attachments"] is True
    assert len((await client.get(url, params={"has_attachments": "false"})).json()["items"]) == 12
    future = (await client.get(url, params={"since": "2999-01-01T00:00:00Z"})).json()
    assert future["items"] == []
    assert (await client.get(url, params={"since": "yesterday"})).status_code == 422


async def test_not_found_and_other_tenant(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    mailbox.deliver((DATA / "attachments.eml").read_bytes())
    account = await create_account(client, dovecot, mailbox)
    done = await retrieve(client, account)
    message = (await all_messages(client, account))[0]
    base = f"/v1/accounts/{account}"
    paths = [
        f"{base}/messages",
        f"{base}/messages/{message['id']}",
        f"{base}/messages/{message['id']}/raw",
        f"{base}/messages/{message['id']}/attachments/0",
        f"{base}/retrievals",
        f"{base}/retrievals/{done['id']}",
    ]
    other = {"Authorization": f"Bearer {OTHER_TENANT_KEY}"}
    for path in paths:
        assert (await client.get(path)).status_code == 200, path
        response = await client.get(path, headers=other)
        assert response.status_code == 404, path
        assert response.json()["code"] == "not_found"
    assert (await client.post(f"{base}/retrievals", headers=other)).status_code == 404
    assert (
        await client.delete(f"{base}/messages/{message['id']}", headers=other)
    ).status_code == 404
    assert (await client.get(f"{base}/messages/msg_nope")).status_code == 404
    assert (await client.get(f"{base}/messages/{message['id']}/attachments/99")).status_code == 404
    assert (await client.get(f"{base}/messages/{message['id']}/attachments/-1")).status_code == 422
    assert (await client.get(f"{base}/retrievals/ret_nope")).status_code == 404


async def test_downloads_are_not_executable_on_our_origin(
    client: AsyncTestClient[Any], dovecot: Any, mailbox: Any
) -> None:
    mailbox.deliver(
        b"Subject: html att\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\nhi\n'
        b"--b\nContent-Type: text/html\n"
        b'Content-Disposition: attachment; filename="../../x\r.html"\n\n'
        b"<script>alert(1)</script>\n--b--\n"
    )
    account = await create_account(client, dovecot, mailbox)
    await retrieve(client, account)
    message = (await all_messages(client, account))[0]
    response = await client.get(f"/v1/accounts/{account}/messages/{message['id']}/attachments/0")
    assert response.status_code == 200
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"] == "sandbox"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment")
    assert "/" not in disposition.split("filename", 1)[1]
    assert "\r" not in disposition and "\n" not in disposition
