"""Apps with a durable outbox, delivering to real SMTP servers on loopback.

Every app here runs on a temporary database with the loopback network allowed (so the
outbound guard lets it reach the test servers), the test CA trusted, and a short retry
schedule with no jitter. Waits poll with a bound; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.config import Settings
from tests.api.conftest import API_KEY, make_settings
from tests.retrieval.conftest import account_json, all_messages, retrieve
from tests.servers.dovecot import Dovecot, Mailbox
from tests.servers.postfix import Postfix, bouncing_postfix_for_test
from tests.servers.smtp import SMTPD_USERS, SMTPDServer, SmtpSink, SMTPTLSFiles

WAIT_S = 30  # upper bound for a status to be reached; only keeps a broken test from hanging
POLL_S = 0.02
RETRY_DELAYS = (0.2, 0.5)
FINAL = ("sent", "failed", "cancelled")
ClientFactory = Callable[..., Awaitable[AsyncTestClient[Any]]]


def outbox_settings(tmp_path: Path, tls_files: SMTPTLSFiles, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "allowed_networks": (ipaddress.ip_network("127.0.0.0/8"),),
        "ca_file": tls_files.ca_file,
        "retry_delays_s": RETRY_DELAYS,
        "retry_jitter": 0.0,
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


@pytest.fixture
async def client_factory(
    tmp_path: Path, smtp_tls_files: SMTPTLSFiles
) -> AsyncIterator[ClientFactory]:
    """``await client_factory(**settings)``: a started app's client (stopped at teardown)."""
    clients: list[AsyncTestClient[Any]] = []

    async def start(**overrides: Any) -> AsyncTestClient[Any]:
        settings = outbox_settings(tmp_path, smtp_tls_files, **overrides)
        test_client: AsyncTestClient[Any] = AsyncTestClient(app=create_app(settings))
        await test_client.__aenter__()
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        clients.append(test_client)
        return test_client

    yield start
    for test_client in reversed(clients):
        # Stop delivery first, without blocking this loop: the app's shutdown runs
        # through a blocking portal call, and the test SMTP servers live in this loop.
        await in_app(test_client, test_client.app.state.delivery.stop)
        await test_client.__aexit__(None, None, None)


@pytest.fixture
async def client(client_factory: ClientFactory) -> AsyncTestClient[Any]:
    return await client_factory()


@pytest.fixture
def maildir(dovecot: Dovecot) -> Mailbox:
    return dovecot.add_user()


@pytest.fixture
def postfix_to_dovecot(dovecot: Dovecot, maildir: Mailbox) -> Iterator[Postfix]:
    """A real Postfix delivering everything for its domain into ``maildir``'s Maildir (and
    bouncing mail for its bounce domain), so what was sent can be read back over POP3."""
    with bouncing_postfix_for_test(dovecot.directory / "mail", maildir.user) as server:
        yield server


def outgoing_for(
    server: SMTPDServer | SmtpSink,
    *,
    security: str | None = None,
    login: bool = False,
    password: str | None = None,
) -> dict[str, Any]:
    """The ``outgoing`` settings of an account that sends through ``server``."""
    if isinstance(server, SmtpSink):
        mode = "none"
        host = server.host
    else:
        mode = {"none": "none", "starttls": "starttls", "implicit": "tls"}[server.tls]
        # TLS checks the certificate, issued for localhost and 127.0.0.1.
        host = server.host
    outgoing: dict[str, Any] = {
        "host": host,
        "port": server.port,
        "security": security or mode,
    }
    if login:
        outgoing["username"] = "alice"
        outgoing["password"] = password or SMTPD_USERS["alice"]
    return outgoing


async def stored_message(
    client: AsyncTestClient[Any],
    dovecot: Dovecot,
    raw: bytes,
    server: SMTPDServer | SmtpSink | Postfix,
    *,
    mailbox: Mailbox | None = None,
    address: str = "alice@example.com",
) -> tuple[str, str]:
    """An account at ``address`` sending through ``server``, with ``raw`` delivered to its
    Dovecot mailbox and retrieved into its store: (account id, message id)."""
    mailbox = mailbox or dovecot.add_user()
    mailbox.deliver(raw)
    outgoing = (
        {"host": server.host, "port": server.port, "security": "none"}
        if isinstance(server, Postfix)
        else outgoing_for(server)
    )
    body = account_json(dovecot, mailbox, security="none") | {
        "email": address,
        "outgoing": outgoing,
    }
    created = await client.post("/v1/accounts", json=body)
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    done = await retrieve(client, account_id)
    assert done["status"] == "succeeded", done
    [message] = await all_messages(client, account_id)
    return account_id, message["id"]


async def create_account(
    client: AsyncTestClient[Any],
    server: SMTPDServer | SmtpSink,
    *,
    email: str = "alice@example.com",
    display_name: str | None = "Alice Example",
    **outgoing: Any,
) -> str:
    body: dict[str, Any] = {
        "name": "Alice",
        "email": email,
        "incoming": {
            "host": "127.0.0.1",
            "port": 1110,
            "security": "none",
            "username": "alice",
            "password": "pop-secret",
        },
        "outgoing": outgoing_for(server, **outgoing),
    }
    if display_name is not None:
        body["display_name"] = display_name
    response = await client.post("/v1/accounts", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def send_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "to": ["bob@example.org"],
        "subject": "Hello",
        "text": "Hi Bob,\nsee you.\n",
    }
    body.update(overrides)
    return body


async def send(
    client: AsyncTestClient[Any],
    account_id: str,
    expect: int = 202,
    headers: dict[str, str] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    response = await client.post(
        f"/v1/accounts/{account_id}/outbox", json=send_body(**overrides), headers=headers
    )
    assert response.status_code == expect, response.text
    return dict(response.json())


async def get_message(
    client: AsyncTestClient[Any], account_id: str, outgoing_id: str
) -> dict[str, Any]:
    response = await client.get(f"/v1/accounts/{account_id}/outbox/{outgoing_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_status(
    client: AsyncTestClient[Any],
    account_id: str,
    outgoing_id: str,
    statuses: Iterable[str] = FINAL,
    *,
    attempts: int | None = None,
) -> dict[str, Any]:
    """Poll until the message is in one of ``statuses`` (and has made ``attempts``)."""
    wanted = set(statuses)
    body: dict[str, Any] = {}
    for _ in range(int(WAIT_S / POLL_S)):
        body = await get_message(client, account_id, outgoing_id)
        if body["status"] in wanted and (attempts is None or len(body["attempts"]) >= attempts):
            return body
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"message {outgoing_id} never reached {sorted(wanted)}: {body}")


async def in_app(client: AsyncTestClient[Any], function: Callable[..., Awaitable[Any]]) -> Any:
    """Run ``function()`` in the app's own event loop (the test client runs the app in a
    thread), without blocking the test's loop, where the test SMTP servers run."""
    return await asyncio.to_thread(client.blocking_portal.call, function)
