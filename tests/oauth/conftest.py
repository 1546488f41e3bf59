"""OAuth2 against real servers: one CA, a token provider, Dovecot with its ``oauth2`` passdb,
and Postfix submission authenticating through that Dovecot (XOAUTH2, OAUTHBEARER)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from litestar.testing import AsyncTestClient

from service.app import create_app
from tests.api.conftest import API_KEY, make_settings
from tests.outbox.conftest import in_app
from tests.servers.dovecot import Dovecot, running_dovecot
from tests.servers.oauth import OAuthProvider, running_oauth_provider
from tests.servers.postfix import Postfix, _postfix_binary, running_postfix

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass
class OAuthStack:
    provider: OAuthProvider
    dovecot: Dovecot
    postfix: Postfix

    @property
    def ca_file(self) -> str:
        return self.dovecot.ca_file


@pytest.fixture(scope="session")
def oauth_stack() -> Iterator[OAuthStack]:
    if _postfix_binary() is None or os.geteuid() != 0:
        pytest.skip("needs the postfix binary and root (scripts/test.sh installs postfix)")
    ca = trustme.CA()
    with (
        running_oauth_provider(ca) as provider,
        running_dovecot(ca=ca, introspection_url=provider.introspection_url) as dovecot,
        running_postfix(submission=(dovecot.auth_socket, ca)) as postfix,
    ):
        yield OAuthStack(provider, dovecot, postfix)


@pytest.fixture
async def client(tmp_path: Path, oauth_stack: OAuthStack) -> AsyncIterator[AsyncTestClient[Any]]:
    settings = make_settings(
        tmp_path,
        allowed_networks=LOOPBACK,
        ca_file=oauth_stack.ca_file,
        retry_delays_s=(0.2, 0.5),
        retry_jitter=0.0,
    )
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield test_client
        await in_app(test_client, test_client.app.state.delivery.stop)
