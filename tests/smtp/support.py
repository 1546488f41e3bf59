"""Shared helpers for the SMTP sender tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from service.domain.enums import Security
from service.mail import ComposedMessage, Draft, compose
from service.smtp import SMTPServer, SMTPTimeouts
from tests.servers.smtp import SMTPD_USERS, SMTPDServer, SmtpSink

# Upper bounds that only keep a broken test from hanging; nothing asserts on time.
TEST_TIMEOUTS = SMTPTimeouts(
    connect=5,
    greeting=5,
    command=5,
    mail=5,
    rcpt=5,
    data_initiation=5,
    data_block=5,
    data_termination=5,
    quit=2,
)
PASSWORD = SMTPD_USERS["alice"]
CLIENT_NAME = "client.mailroom.test"

_SECURITY = {"none": Security.NONE, "starttls": Security.STARTTLS, "implicit": Security.TLS}


def server_for(target: SMTPDServer | SmtpSink, **changes: Any) -> SMTPServer:
    """An SMTPServer for a test server: its TLS mode, its CA, no credentials."""
    if isinstance(target, SmtpSink):
        base: dict[str, Any] = {"host": target.host, "port": target.port, "security": Security.NONE}
    else:
        base = {
            # The certificate is for "localhost"; dial the loopback address it listens on.
            "host": "localhost",
            "connect_address": target.host,
            "port": target.port,
            "security": _SECURITY[target.tls],
            "ca_file": target.ca_file,
        }
    base.update(local_hostname=CLIENT_NAME, timeouts=TEST_TIMEOUTS)
    base.update(changes)
    return SMTPServer(**base)


def with_login(target: SMTPDServer, password: str = PASSWORD, **changes: Any) -> SMTPServer:
    """``server_for`` plus alice's credentials."""
    return server_for(target, username="alice", password=password, **changes)


def message(**changes: Any) -> ComposedMessage:
    """A composed message from sender@example.com to rcpt@example.org."""
    fields: dict[str, Any] = {
        "from_address": "sender@example.com",
        "to": ["rcpt@example.org"],
        "subject": "Test",
        "message_id": "<test-0001@example.com>",
        "date": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "text": "Hello.\n",
    }
    fields.update(changes)
    return compose(Draft(**fields))
