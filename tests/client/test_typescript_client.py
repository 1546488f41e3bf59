"""A TypeScript client generated from openapi/openapi.json works for a whole scenario.

``clients/typescript`` pins openapi-typescript, openapi-fetch and TypeScript in its
``package.json`` and ``package-lock.json``. The suite installs them with ``npm ci`` (when
``node_modules`` does not match the lock file), generates the types from the committed
document with the generator's default settings (a warning fails the test: the fix belongs
in the spec), compiles the client and the scenario with ``tsc --strict``, and runs the
scenario with ``node`` against the real process, with Dovecot (messages waiting, one with
attachments) and aiosmtpd behind it. What the scenario sent is then checked on aiosmtpd.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.process import output, start, stop
from tests.servers.dovecot import Dovecot
from tests.servers.smtp import SMTPDServer

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "typescript"
KEY = "ts-client-key-0123456789abcdef"
#: Upper bounds for the tool steps and the scenario (bounded waits, not speed checks).
NPM_TIMEOUT_S = 300
SCENARIO_TIMEOUT_S = 180
FILLER_MESSAGES = 4
ATTACHMENTS = [
    # A binary type, and a text type whose bytes (CRLF, Latin-1) must come back unchanged.
    ("report.pdf", "application/pdf", b"%PDF-1.4\n" + bytes(range(256)) * 3 + b"\n%%EOF\n"),
    ("table.csv", "text/csv", "name,city\r\nZo\u00eb,S\u00e3o Paulo\r\n".encode("latin-1")),
]


def _run(argv: list[str], what: str) -> str:
    """Run one npm step in the package; its output, or fail with it."""
    result = subprocess.run(
        argv,
        cwd=PACKAGE,
        capture_output=True,
        text=True,
        check=False,
        timeout=NPM_TIMEOUT_S,
        env={**os.environ, "NO_COLOR": "1", "npm_config_update_notifier": "false"},
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{what} failed:\n{out}"
    return out


@pytest.fixture(scope="module")
def built() -> Path:
    """Install the pinned tools, generate the types, compile with ``tsc --strict``."""
    npm = shutil.which("npm")
    # Missing Node is an error, never a skip: CI installs it (scripts/test.sh).
    assert npm is not None and shutil.which("node") is not None, "node and npm are required"
    lock = PACKAGE / "package-lock.json"
    installed = PACKAGE / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        _run([npm, "ci", "--no-audit", "--no-fund"], "npm ci")
    generated = _run([npm, "run", "--silent", "generate"], "openapi-typescript")
    assert "warn" not in generated.lower() and "error" not in generated.lower(), generated
    _run([npm, "run", "--silent", "build"], "tsc --strict")
    return PACKAGE / "dist" / "scenario.js"


def _with_attachments() -> bytes:
    """A message with a text body and ATTACHMENTS, CRLF line ends (as Dovecot serves it)."""
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = "Sender <sender@example.com>"
    message["To"] = "ts@example.com"
    message["Subject"] = "Files for the TypeScript client"
    message["Message-ID"] = "<files.ts@example.com>"
    message.set_content("See attached.\n")
    for filename, content_type, data in ATTACHMENTS:
        maintype, subtype = content_type.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message.as_bytes()


async def test_typescript_client_scenario(
    built: Path, tmp_path: Path, dovecot: Dovecot, smtpd: SMTPDServer
) -> None:
    mailbox = dovecot.add_user()
    files = _with_attachments()
    assert b"\r\n" in files and b"\n" not in files.replace(b"\r\n", b"")
    mailbox.deliver(files)
    for i in range(FILLER_MESSAGES):
        mailbox.deliver(f"Subject: filler {i}\r\n\r\nfiller\r\n".encode())

    proc, base = start(
        {
            "MAILROOM_DATABASE": str(tmp_path / "mailroom.db"),
            "MAILROOM_API_KEYS": KEY,
            "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
            "MAILROOM_CA_FILE": dovecot.ca_file,
        }
    )
    setup = {
        "base_url": base,
        "api_key": KEY,
        "pop3": {
            "host": dovecot.hostname,
            "port": dovecot.pop3_port,
            "user": mailbox.user,
            "password": mailbox.password,
        },
        "smtp": {"host": smtpd.host, "port": smtpd.port},
        "mailbox_count": 1 + FILLER_MESSAGES,
        "with_attachments": {
            "subject": "Files for the TypeScript client",
            "raw_sha256": hashlib.sha256(files).hexdigest(),
            "attachments": [
                {
                    "filename": name,
                    "content_type": content_type,
                    "content_base64": base64.b64encode(data).decode(),
                }
                for name, content_type, data in ATTACHMENTS
            ],
        },
    }
    try:
        # Not subprocess.run: aiosmtpd answers from this event loop while node runs.
        node = await asyncio.create_subprocess_exec(
            shutil.which("node") or "node",
            str(built),
            cwd=PACKAGE,
            env={**os.environ, "MAILROOM_SCENARIO": json.dumps(setup)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(node.communicate(), SCENARIO_TIMEOUT_S)
        except TimeoutError:
            node.kill()
            await node.wait()
            raise
        assert node.returncode == 0, (
            f"scenario failed:\n{stderr.decode()}\n--- service log:\n{output(proc)}"
        )
        report = json.loads(stdout.decode().strip().splitlines()[-1])
    finally:
        stop(proc)

    # What the scenario sent reached the SMTP server once (the replay sent nothing),
    # with its attachment intact.
    assert len(smtpd.messages) == 1
    received = message_from_bytes(smtpd.messages[0].data, policy=policy.default)
    assert received["Message-ID"] == report["sent_message_id"]
    assert received["Subject"] == "Hello from TypeScript"
    parts = list(received.iter_attachments())
    assert [p.get_filename() for p in parts] == ["sent.bin"]
    assert parts[0].get_content() == base64.b64decode(report["sent_attachment_base64"])
    # The retrieval left the mailbox on the server (leave_on_server defaults to true).
    assert mailbox.count() == 1 + FILLER_MESSAGES
