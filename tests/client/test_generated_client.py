"""A Python client generated from openapi/openapi.json works for a whole scenario.

The suite runs openapi-python-client on the committed document (a warning fails the
test: the fix belongs in the spec), installs the result into a temporary directory and
drives the real process with it: create an account, send a message to aiosmtpd, let
that message arrive in a Dovecot mailbox, retrieve it, read it, page through the list,
and handle a 404 and a 422 as typed problems.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.process import start, stop
from tests.servers.dovecot import Dovecot
from tests.servers.smtp import SMTPDServer
from tests.waiting import until

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "openapi" / "openapi.json"
KEY = "client-key-0123456789abcdef"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Generate, install into a temporary target directory, import."""
    work = tmp_path_factory.mktemp("client")
    generator = Path(sys.executable).with_name("openapi-python-client")
    result = subprocess.run(
        [
            str(generator),
            "generate",
            "--path",
            str(SPEC),
            "--meta",
            "setup",
            "--output-path",
            str(work / "project"),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Warning" not in output and "WARNING" not in output, output
    target = work / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(work / "project"),
        ],
        check=True,
    )
    sys.path.insert(0, str(target))
    try:
        yield importlib.import_module("mailroom_client")
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m.startswith("mailroom_client")]:
            del sys.modules[name]
        shutil.rmtree(target, ignore_errors=True)


def api(tag: str, operation: str) -> Any:
    """The generated module of one operation, e.g. ``api("accounts", "create_account")``."""
    return importlib.import_module(f"mailroom_client.api.{tag}.{operation}")


def model(name: str) -> Any:
    return getattr(importlib.import_module("mailroom_client.models"), name)


async def test_generated_client_scenario(
    generated: Any, tmp_path: Path, dovecot: Dovecot, smtpd: SMTPDServer
) -> None:
    mailbox = dovecot.add_user()
    proc, base = start(
        {
            "MAILROOM_DATABASE": str(tmp_path / "mailroom.db"),
            "MAILROOM_API_KEYS": KEY,
            "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
            "MAILROOM_CA_FILE": dovecot.ca_file,
        }
    )
    try:
        client = generated.AuthenticatedClient(base_url=base, token=KEY)

        body = model("AccountInput").from_dict(
            {
                "name": "Generated",
                "email": "gen@example.com",
                "display_name": "Generated Client",
                "incoming": {
                    "host": dovecot.hostname,
                    "port": dovecot.pop3_port,
                    "security": "starttls",
                    "username": mailbox.user,
                    "password": mailbox.password,
                },
                "outgoing": {"host": smtpd.host, "port": smtpd.port, "security": "none"},
            }
        )
        created = await api("accounts", "create_account").asyncio_detailed(client=client, body=body)
        assert created.status_code == 201, created.content
        account = created.parsed
        assert isinstance(account, model("AccountOut"))
        assert account.incoming.port == dovecot.pop3_port

        send = model("SendRequest").from_dict(
            {"to": ["reader@example.com"], "subject": "Hello from the SDK", "text": "Body.\n"}
        )
        sent = await api("outbox", "send_message").asyncio_detailed(
            account.id, client=client, body=send
        )
        assert sent.status_code == 202, sent.content
        outgoing = await until(
            lambda: api("outbox", "get_outgoing_message").asyncio(
                account.id, sent.parsed.id, client=client
            ),
            lambda o: str(o.status.value) in ("sent", "failed"),
        )
        assert outgoing.status.value == "sent", outgoing
        delivered = smtpd.messages
        assert len(delivered) == 1 and b"Subject: Hello from the SDK" in delivered[0].data

        # The message "arrives" in the reader's POP3 mailbox, and a few more with it.
        mailbox.deliver(delivered[0].data)
        for i in range(4):
            mailbox.deliver(f"Subject: filler {i}\n\nfiller\n".encode())
        started = await api("retrievals", "start_retrieval").asyncio_detailed(
            account.id, client=client
        )
        assert started.status_code == 202
        done = await until(
            lambda: api("retrievals", "get_retrieval").asyncio(
                account.id, started.parsed.id, client=client
            ),
            lambda r: r.status.value in ("succeeded", "failed"),
        )
        assert done.status.value == "succeeded" and done.messages_downloaded == 5, done

        seen, cursor = [], None
        while True:
            kwargs = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
            page = await api("messages", "list_messages").asyncio(
                account.id, client=client, **kwargs
            )
            seen += page.items
            cursor = page.next_cursor
            if not cursor:
                break
        assert len(seen) == 5
        ours = next(m for m in seen if m.subject == "Hello from the SDK")
        detail = await api("messages", "get_message").asyncio(account.id, ours.id, client=client)
        assert detail.text.content == "Body.\n"
        assert detail.message_id == outgoing.message_id

        missing = await api("accounts", "get_account").asyncio_detailed(
            "acc_missing", client=client
        )
        assert missing.status_code == 404
        assert isinstance(missing.parsed, model("Problem")) and missing.parsed.code == "not_found"

        bad = model("AccountPatch").from_dict({"incoming": {"port": 70000}})
        invalid = await api("accounts", "update_account").asyncio_detailed(
            account.id, client=client, body=bad
        )
        assert invalid.status_code == 422
        assert isinstance(invalid.parsed, model("Problem"))
        assert invalid.parsed.code == "validation_error" and invalid.parsed.errors
    finally:
        stop(proc)
