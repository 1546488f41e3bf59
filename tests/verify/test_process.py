"""``POST /v1/accounts/{id}/verify`` on the real process, against real servers.

- A TLS mode that does not fit the port (STARTTLS against Dovecot's pop3s port and an
  implicit-TLS aiosmtpd; implicit TLS against their plain ports) answers within the
  verify budget with ``tls_failed`` and a hint, found by probing what the port speaks.
- A silent server (no greeting, no TLS either) is a plain ``timeout``, no hint; a server
  slower than the budget fails the step it was in, named.
- Postfix with ``reject_non_fqdn_helo_hostname``: a MAILROOM_EHLO_NAME it refuses shows
  as a 504 at the envelope step; the default name passes, and a real send is delivered.

The HTTP client's timeout is only a hang guard, far above the budget and far below the
RFC greeting timeout that verify used to wait for.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx

from service.services.connect import ehlo_name
from tests.process import start, stop
from tests.servers.dovecot import Dovecot, Mailbox
from tests.servers.postfix import Postfix
from tests.servers.smtp import SMTPDServer, SmtpSink
from tests.waiting import until

KEY = "verify-key-0123456789abcdef"
HANG_GUARD_S = 60.0  # the HTTP client's bound: verify used to take up to 300 s
SMTP_PASSWORD = "Smtp-verify-s3cret-never-shown"
NOT_A_HOST_NAME = "10.20"  # reject_non_fqdn_helo_hostname refuses it (504 at RCPT)

SmtpdFactory = Callable[..., Awaitable[SMTPDServer]]


@contextmanager
def service(tmp_path: Path, **env: str) -> Iterator[str]:
    database = tmp_path / "mailroom.db"
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_text(base64.urlsafe_b64encode(os.urandom(32)).decode())
    proc, base = start(
        {
            "MAILROOM_DATABASE": str(database),
            "MAILROOM_API_KEYS": KEY,
            "MAILROOM_SECRET_KEY": secret.read_text(),
            "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
            "MAILROOM_RETRY_DELAYS": "0.2,0.5,1",
            **env,
        }
    )
    try:
        yield base
    finally:
        stop(proc)


@asynccontextmanager
async def http(base: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=HANG_GUARD_S
    ) as client:
        yield client


def account(
    mailbox: Mailbox,
    *,
    pop3_port: int,
    pop3_security: str,
    smtp_port: int,
    smtp_security: str,
    email: str = "me@example.com",
    smtp_login: bool = True,
) -> dict[str, Any]:
    outgoing: dict[str, Any] = {"host": "127.0.0.1", "port": smtp_port, "security": smtp_security}
    if smtp_login:
        outgoing.update(username="alice", password=SMTP_PASSWORD)
    return {
        "name": "verify",
        "email": email,
        "incoming": {
            "host": "127.0.0.1",
            "port": pop3_port,
            "security": pop3_security,
            "username": mailbox.user,
            "password": mailbox.password,
        },
        "outgoing": outgoing,
    }


async def verify(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    created = await client.post("/v1/accounts", json=body)
    assert created.status_code == 201, created.text
    response = await client.post(f"/v1/accounts/{created.json()['id']}/verify")
    assert response.status_code == 200, response.text
    for secret in (body["incoming"]["password"], body["outgoing"].get("password")):
        assert not secret or secret not in response.text
    result: dict[str, Any] = response.json()
    return result


def last(check: dict[str, Any]) -> tuple[str, bool, str | None, str]:
    step = check["steps"][-1]
    return step["step"], step["ok"], step["code"], step["detail"]


async def test_a_tls_mode_that_does_not_fit_the_port_is_named_with_a_hint(
    tmp_path: Path, dovecot: Dovecot, smtpd_factory: SmtpdFactory
) -> None:
    assert dovecot.pop3s_port is not None
    mailbox = dovecot.add_user()
    implicit = await smtpd_factory(tls="implicit")
    plain = await smtpd_factory()
    # A budget of 6 s: a greeting may take 2 s, the probe that explains it 1 s.
    with service(tmp_path, MAILROOM_VERIFY_TIMEOUT="6") as base:
        async with http(base) as client:
            # STARTTLS against implicit-TLS ports: no greeting ever comes.
            result = await verify(
                client,
                account(
                    mailbox,
                    pop3_port=dovecot.pop3s_port,
                    pop3_security="starttls",
                    smtp_port=implicit.port,
                    smtp_security="starttls",
                ),
            )
            assert result["ok"] is False
            assert last(result["incoming"]) == (
                "connect",
                False,
                "tls_failed",
                f"no greeting within 2 s; port {dovecot.pop3s_port} expects implicit TLS: "
                "set security to tls",
            )
            assert last(result["outgoing"]) == (
                "connect",
                False,
                "tls_failed",
                f"no greeting within 2 s; port {implicit.port} expects implicit TLS: "
                "set security to tls",
            )
            assert "AUTH" not in " ".join(implicit.commands)  # nothing reached the server

            # Implicit TLS against plain ports: the server greets in plain text.
            result = await verify(
                client,
                account(
                    mailbox,
                    pop3_port=dovecot.pop3_port,
                    pop3_security="tls",
                    smtp_port=plain.port,
                    smtp_security="tls",
                ),
            )
            checks = ((result["incoming"], dovecot.pop3_port), (result["outgoing"], plain.port))
            for check, port in checks:
                assert [s["step"] for s in check["steps"]] == ["connect", "tls"]
                assert last(check) == (
                    "tls",
                    False,
                    "tls_failed",
                    f"the server answered in plain text; port {port} expects STARTTLS: "
                    "set security to starttls",
                )


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """Accepts connections and never says a word (no greeting, no TLS)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def test_silence_and_slowness_are_timeouts_named_by_step(
    tmp_path: Path,
    mailbox: Mailbox,
    smtp_sink_factory: Callable[..., SmtpSink],
) -> None:
    slow_mail = smtp_sink_factory(delay={"MAIL": 60})
    async with silent_server() as silent_port:
        with service(tmp_path, MAILROOM_VERIFY_TIMEOUT="3") as base:
            async with http(base) as client:
                # Silent on both: not a TLS port either (the probe says so), so no hint.
                result = await verify(
                    client,
                    account(
                        mailbox,
                        pop3_port=silent_port,
                        pop3_security="starttls",
                        smtp_port=silent_port,
                        smtp_security="starttls",
                    ),
                )
                for check in (result["incoming"], result["outgoing"]):
                    step, ok, code, detail = last(check)
                    assert (step, ok, code) == ("connect", False, "timeout"), check
                    assert "implicit TLS" not in detail

                # A working POP3 server, and an SMTP server slower than the whole budget.
                result = await verify(
                    client,
                    account(
                        mailbox,
                        pop3_port=mailbox.server.pop3_port,
                        pop3_security="none",
                        smtp_port=slow_mail.port,
                        smtp_security="none",
                        smtp_login=False,
                    ),
                )
                assert result["incoming"]["ok"] is True, result
                assert [s["step"] for s in result["incoming"]["steps"]] == [
                    "connect",
                    "auth",
                    "mailbox",
                ]
                assert last(result["outgoing"]) == (
                    "envelope",
                    False,
                    "timeout",
                    "the envelope step did not finish within the verify time limit of 3 s",
                )


async def test_postfix_refusing_the_ehlo_name_shows_in_verify_and_the_default_sends(
    tmp_path: Path, mailbox: Mailbox, postfix: Postfix
) -> None:
    address = postfix.add_mailbox()
    body = account(
        mailbox,
        pop3_port=mailbox.server.pop3_port,
        pop3_security="none",
        smtp_port=postfix.port,
        smtp_security="none",
        email=address,
        smtp_login=False,
    )
    # The service refuses a single-label MAILROOM_EHLO_NAME at startup; a dotted but
    # all-numeric name gets through, and Postfix does not take it for a host name.
    with service(tmp_path, MAILROOM_EHLO_NAME=NOT_A_HOST_NAME) as base:
        async with http(base) as client:
            result = await verify(client, body)
    assert result["incoming"]["ok"] is True, result
    assert result["outgoing"]["ok"] is False
    step, ok, code, detail = last(result["outgoing"])
    assert (step, ok, code) == ("envelope", False, "rejected")
    assert f"504 5.5.2 <{NOT_A_HOST_NAME}>: Helo command rejected" in detail

    # The default name: this host's FQDN if dotted, else the account's domain.
    with service(tmp_path) as base:
        async with http(base) as client:
            result = await verify(client, body)
            assert result["ok"] is True, result
            assert [s["step"] for s in result["outgoing"]["steps"]] == ["connect", "envelope"]
            account_id = (await client.get("/v1/accounts")).json()["items"][0]["id"]
            sent = await client.post(
                f"/v1/accounts/{account_id}/outbox",
                json={"to": [address], "subject": "Through Postfix", "text": "Hello.\n"},
            )
            assert sent.status_code == 202, sent.text
            url = f"/v1/accounts/{account_id}/outbox/{sent.json()['id']}"
            final = await until(
                lambda: client.get(url),
                lambda r: r.json()["status"] in ("sent", "failed", "deferred"),
            )
            assert final.json()["status"] == "sent", final.text
    delivered = await until(
        lambda: asyncio.to_thread(postfix.messages, address), lambda found: len(found) == 1
    )
    expected_name = ehlo_name(None, socket.getfqdn(), address)
    assert f"Received: from {expected_name} (".encode() in delivered[0]
    assert b"Subject: Through Postfix" in delivered[0]
