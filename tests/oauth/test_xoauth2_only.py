"""Servers offering only XOAUTH2 (as Gmail's and Outlook's do): Mailroom picks it on POP3
(Dovecot) and SMTP (Postfix submission through that Dovecot)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from litestar.testing import AsyncTestClient

from service.app import create_app
from tests.api.conftest import API_KEY, make_settings
from tests.oauth.conftest import OAuthStack
from tests.oauth.test_scenario import delivered_to
from tests.outbox.conftest import in_app, send, wait_status
from tests.retrieval.conftest import retrieve
from tests.servers.dovecot import running_dovecot
from tests.servers.oauth import running_oauth_provider
from tests.servers.postfix import _postfix_binary, running_postfix


@pytest.fixture(scope="module")
def xoauth2_stack() -> Iterator[OAuthStack]:
    if _postfix_binary() is None or os.geteuid() != 0:
        pytest.skip("needs the postfix binary and root (scripts/test.sh installs postfix)")
    ca = trustme.CA()
    with (
        running_oauth_provider(ca) as provider,
        running_dovecot(
            ca=ca, introspection_url=provider.introspection_url, oauth_mechanisms="xoauth2"
        ) as dovecot,
        running_postfix(submission=(dovecot.auth_socket, ca)) as postfix,
    ):
        yield OAuthStack(provider, dovecot, postfix)


@pytest.fixture
async def xclient(tmp_path: Path, xoauth2_stack: OAuthStack) -> AsyncIterator[AsyncTestClient[Any]]:
    settings = make_settings(
        tmp_path,
        allowed_networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        ca_file=xoauth2_stack.ca_file,
    )
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield test_client
        await in_app(test_client, test_client.app.state.delivery.stop)


async def test_xoauth2_is_chosen_when_it_is_all_the_server_offers(
    xclient: AsyncTestClient[Any], xoauth2_stack: OAuthStack
) -> None:
    provider, dovecot, postfix = (
        xoauth2_stack.provider,
        xoauth2_stack.dovecot,
        xoauth2_stack.postfix,
    )
    mailbox = dovecot.add_user()
    mailbox.deliver(b"Subject: only xoauth2\n\nhi\n")
    token = provider.issue_access_token(mailbox.user)
    side = {"username": mailbox.user, "auth": "oauth2", "access_token": token}
    created = await xclient.post(
        "/v1/accounts",
        json={
            "name": "x",
            "email": f"{mailbox.user}@example.com",
            "incoming": {
                "host": dovecot.hostname,
                "port": dovecot.pop3s_port,
                "security": "tls",
                **side,
            },
            "outgoing": {
                "host": "localhost",
                "port": postfix.submission_port,
                "security": "tls",
                **side,
            },
        },
    )
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    assert (await retrieve(xclient, account_id))["status"] == "succeeded"
    assert f"user=<{mailbox.user}>, method=XOAUTH2" in dovecot.log()
    recipient = postfix.add_mailbox()
    queued = await send(xclient, account_id, to=[recipient], subject="Via XOAUTH2")
    assert (await wait_status(xclient, account_id, queued["id"]))["status"] == "sent"
    assert await delivered_to(postfix, recipient, b"Subject: Via XOAUTH2")
    assert "sasl_method=XOAUTH2" in postfix.log()
