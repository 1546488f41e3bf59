"""The EHLO name: MAILROOM_EHLO_NAME, else a dotted FQDN, else the account's email domain."""

from __future__ import annotations

import ipaddress

import msgspec
import pytest

from service.domain.accounts import Account
from service.netguard import ConnectionGuard
from service.services.connect import MailConnector, ehlo_name


@pytest.mark.parametrize(
    ("configured", "fqdn", "email", "expected"),
    [
        # A configured name wins, even an unqualified one: the operator's choice.
        ("mail.example.net", "host.example.org", "a@example.com", "mail.example.net"),
        ("relayhost", "host.example.org", "a@example.com", "relayhost"),
        # A dotted FQDN is used as it is.
        (None, "host.example.org", "a@example.com", "host.example.org"),
        ("", "host.example.org", "a@example.com", "host.example.org"),
        # No dot, or a name that says nothing: the account's domain.
        (None, "localhost", "a@example.com", "example.com"),
        (None, "buildbox", "a@Example.COM", "example.com"),
        (None, "localhost.localdomain", "a@example.com", "example.com"),
        (None, "", "a@example.com", "example.com"),
        (None, ".", "a@example.com", "example.com"),
        # An FQDN with a space or a control character is not a name to send.
        (None, "bad host.example.org", "a@example.com", "example.com"),
        # An internationalized domain goes on the wire in its ASCII form.
        (None, "localhost", "a@bücher.example", "xn--bcher-kva.example"),
    ],
)
def test_ehlo_name(configured: str | None, fqdn: str, email: str, expected: str) -> None:
    assert ehlo_name(configured, fqdn, email) == expected


def _account(email: str) -> Account:
    return msgspec.convert(
        {
            "id": "acc_1",
            "tenant": "t",
            "name": "n",
            "email": email,
            "display_name": None,
            "incoming": {
                "host": "127.0.0.1",
                "port": 110,
                "security": "none",
                "username": "u",
                "password_encrypted": "unused",
            },
            "outgoing": {"host": "127.0.0.1", "port": 25, "security": "none"},
            "retrieval": {},
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:00:00Z",
        },
        Account,
        strict=False,
    )


async def test_connector_puts_the_name_into_the_smtp_settings() -> None:
    guard = ConnectionGuard([ipaddress.ip_network("127.0.0.0/8")])
    configured = MailConnector(
        guard, ca_file=None, pop3_timeout_s=5, connect_timeout_s=5, ehlo_name="mx.example.net"
    )
    server = await configured.smtp_server(_account("a@example.com"), None)
    assert server.local_hostname == "mx.example.net"
    assert server.connect_address == "127.0.0.1"

    default = MailConnector(guard, ca_file=None, pop3_timeout_s=5, connect_timeout_s=5)
    server = await default.smtp_server(_account("a@mail.example.org"), None)
    # This host's FQDN if it has a dot, else the account's domain: never a bare name.
    assert server.local_hostname is not None
    assert "." in server.local_hostname
    assert server.local_hostname.lower() not in ("localhost", "localhost.localdomain")
