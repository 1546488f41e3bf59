"""The OAuth2 SASL mechanisms on the wire: both against Dovecot's oauth2 passdb (POP3),
their encodings, and a server offering neither."""

from __future__ import annotations

import base64

import pytest

from service.domain.enums import Security
from service.pop3.client import AuthMechanism, POP3Client
from service.pop3.errors import AuthFailed, AuthNotSupported
from service.sasl import oauthbearer_response, xoauth2_response
from service.tls import client_context
from tests.oauth.conftest import OAuthStack


def test_encodings_follow_rfc_7628_and_xoauth2() -> None:
    assert xoauth2_response("a@b.c", "T") == b"user=a@b.c\x01auth=Bearer T\x01\x01"
    assert (
        oauthbearer_response("a,=b", "T", "pop.example.com", 995)
        == b"n,a=a=2C=3Db,\x01host=pop.example.com\x01port=995\x01auth=Bearer T\x01\x01"
    )
    assert base64.b64decode(base64.b64encode(xoauth2_response("u", "t"))).startswith(b"user=u")


@pytest.mark.parametrize("mechanism", [AuthMechanism.OAUTHBEARER, AuthMechanism.XOAUTH2, None])
async def test_pop3_login_with_each_mechanism(
    oauth_stack: OAuthStack, mechanism: AuthMechanism | None
) -> None:
    dovecot, provider = oauth_stack.dovecot, oauth_stack.provider
    mailbox = dovecot.add_user()
    token = provider.issue_access_token(mailbox.user)
    context = client_context(dovecot.ca_file)
    async with POP3Client(
        dovecot.hostname, dovecot.pop3s_port, Security.TLS, ssl_context=context
    ) as client:
        await client.login(mailbox.user, token, mechanism=mechanism, oauth2=True)
        assert (await client.stat()).messages == 0
        await client.quit()
    wanted = (mechanism or AuthMechanism.OAUTHBEARER).value
    assert f"method={wanted}" in dovecot.log()

    provider.expire(token)
    async with POP3Client(
        dovecot.hostname, dovecot.pop3s_port, Security.TLS, ssl_context=context
    ) as client:
        with pytest.raises(AuthFailed) as refused:
            await client.login(mailbox.user, token, mechanism=mechanism, oauth2=True)
        assert refused.value.code == "auth_failed"
        assert "Authentication failed" in refused.value.detail  # the verdict, not a cancel


async def test_pop3_server_without_oauth_mechanisms(dovecot: object) -> None:
    server = dovecot
    mailbox = server.add_user()  # type: ignore[attr-defined]
    context = client_context(server.ca_file)  # type: ignore[attr-defined]
    async with POP3Client(
        server.hostname,  # type: ignore[attr-defined]
        server.pop3s_port,  # type: ignore[attr-defined]
        Security.TLS,
        ssl_context=context,
    ) as client:
        with pytest.raises(AuthNotSupported) as refused:
            await client.login(mailbox.user, "at-token", oauth2=True)
        assert refused.value.code == "auth_not_supported"
        assert "PLAIN" in refused.value.detail
