"""The whole OAuth2 scenario against Dovecot (oauth2 passdb) and Postfix (Dovecot SASL):
create with refresh tokens, retrieve and send, the token expiring and being refreshed and
rotated, the refresh token revoked pausing the account, a PATCH resuming it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from litestar.testing import AsyncTestClient

from service.domain.accounts import Account
from tests.oauth.conftest import OAuthStack
from tests.outbox.conftest import WAIT_S, in_app, send, wait_status
from tests.retrieval.conftest import all_messages, retrieve
from tests.servers.postfix import Postfix
from tests.waiting import feed_until

MESSAGE = b"From: Carol <carol@example.org>\nSubject: Token test\n\nhello over OAuth2\n"


def grant_body(
    stack: OAuthStack, user: str, client: tuple[str, str], refresh: str
) -> dict[str, Any]:
    return {
        "username": user,
        "auth": "oauth2",
        "token_url": stack.provider.token_url,
        "client_id": client[0],
        "client_secret": client[1],
        "refresh_token": refresh,
        "scope": "mail",
    }


async def stored(client: AsyncTestClient[Any], account_id: str) -> Account:
    repo = client.app.state.store.accounts
    account = await in_app(client, lambda: repo.get_any(account_id))
    assert account is not None
    return account  # type: ignore[no-any-return]


async def age_token(client: AsyncTestClient[Any], account_id: str, side: str) -> None:
    """Time passes: the stored access token is past its expiry (as a clock moving on)."""
    account = await stored(client, account_id)
    server = account.incoming if side == "in" else account.outgoing
    sealed = server.password_encrypted
    repo = client.app.state.store.accounts
    past = datetime.now(UTC) - timedelta(seconds=1)
    assert await in_app(
        client, lambda: repo.store_grant(account_id, side, sealed, past, was=sealed)
    )


async def delivered_to(postfix: Postfix, address: str, marker: bytes) -> bool:
    """Postfix accepted the message; wait (bounded) for its queue to put it in the Maildir."""
    for _ in range(int(WAIT_S / 0.05)):
        if any(marker in m for m in postfix.messages(address)):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_oauth2_retrieve_send_refresh_rotate_revoke_resume(
    client: AsyncTestClient[Any], oauth_stack: OAuthStack
) -> None:
    provider, dovecot, postfix = oauth_stack.provider, oauth_stack.dovecot, oauth_stack.postfix
    mailbox = dovecot.add_user()
    mailbox.deliver(MESSAGE)
    app_client = provider.add_client()
    incoming_rt = provider.grant(mailbox.user, app_client[0])
    outgoing_rt = provider.grant(mailbox.user, app_client[0])
    body = {
        "name": "OAuth",
        "email": f"{mailbox.user}@example.com",
        "incoming": {
            "host": dovecot.hostname,
            "port": dovecot.pop3s_port,
            "security": "tls",
            **grant_body(oauth_stack, mailbox.user, app_client, incoming_rt),
        },
        "outgoing": {
            "host": "localhost",
            "port": postfix.submission_port,
            "security": "tls",
            **grant_body(oauth_stack, mailbox.user, app_client, outgoing_rt),
        },
    }
    start = provider.refreshes  # the provider is shared by the session's tests
    created = await client.post("/v1/accounts", json=body)
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    # Secrets are write-only: neither tokens nor the client secret come back.
    for secret in (incoming_rt, outgoing_rt, app_client[1]):
        assert secret not in created.text
    assert created.json()["incoming"]["auth"] == "oauth2"
    assert created.json()["outgoing"]["auth"] == "oauth2"
    assert created.json()["incoming"]["password_set"] is False

    # Retrieve: the first use refreshes (no access token yet) and the provider rotates.
    done = await retrieve(client, account_id)
    assert done["status"] == "succeeded", done
    assert [m["subject"] for m in await all_messages(client, account_id)] == ["Token test"]
    assert provider.refreshes - start == 1
    assert incoming_rt not in provider.refresh_tokens  # rotated away...
    account = await stored(client, account_id)
    assert account.incoming.token_expires_at is not None  # ...and the new one stored
    shown = (await client.get(f"/v1/accounts/{account_id}")).json()
    assert shown["incoming"]["token_expires_at"] is not None

    # Send through Postfix submission, authenticated by Dovecot with the access token.
    recipient = postfix.add_mailbox()
    queued = await send(client, account_id, to=[recipient], subject="Sent with OAuth2")
    sent = await wait_status(client, account_id, queued["id"])
    assert sent["status"] == "sent", sent
    assert provider.refreshes - start == 2  # the outgoing side has its own grant
    assert await delivered_to(postfix, recipient, b"Subject: Sent with OAuth2")
    assert "sasl_method=OAUTHBEARER" in postfix.log()

    # A token still valid is reused: no refresh.
    assert (await retrieve(client, account_id))["status"] == "succeeded"
    assert provider.refreshes - start == 2

    # Mid-run the access token expires (at the provider and by its stored expiry): the
    # next retrieval refreshes, the provider rotates again, the old token is not used.
    old = await stored(client, account_id)
    for token, held in list(provider.access_tokens.items()):
        if held.username == mailbox.user:
            provider.expire(token)
    await age_token(client, account_id, "in")
    assert (await retrieve(client, account_id))["status"] == "succeeded"
    assert provider.refreshes - start == 3
    new = await stored(client, account_id)
    assert new.incoming.password_encrypted != old.incoming.password_encrypted
    assert new.incoming.token_expires_at is not None
    assert new.incoming.token_expires_at > datetime.now(UTC)

    # The user revokes the grant: the next refresh is refused, the account pauses with
    # the provider's text, and retrieval and sending stop.
    for token in provider.active_refresh_tokens(mailbox.user):
        provider.revoke(token)
    await age_token(client, account_id, "in")
    failed = await retrieve(client, account_id)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "oauth_refresh_failed"
    assert "invalid_grant" in failed["error"]["detail"]
    shown = (await client.get(f"/v1/accounts/{account_id}")).json()
    assert shown["smtp_status"] == "oauth_refresh_failed"
    assert "Token has been expired or revoked" in shown["smtp_pause"]["detail"]
    paused = await feed_until(client, bool, types="account.paused")
    assert paused[-1]["data"]["code"] == "oauth_refresh_failed"
    again = await retrieve(client, account_id)  # paused: no refresh is even tried
    assert again["error"]["code"] == "oauth_refresh_failed"
    assert provider.refreshes - start == 3
    # (A message sent now may still leave over an SMTP session opened before the pause;
    # the pause stops new sessions, so only what comes after the PATCH is checked.)

    # PATCH a new refresh token (the user consented again): the account resumes, the
    # held message goes out, retrieval works.
    fresh_in = provider.grant(mailbox.user, app_client[0])
    fresh_out = provider.grant(mailbox.user, app_client[0])
    patched = await client.patch(
        f"/v1/accounts/{account_id}",
        json={"incoming": {"refresh_token": fresh_in}, "outgoing": {"refresh_token": fresh_out}},
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["smtp_status"] == "ok"
    assert fresh_in not in patched.text
    assert (await retrieve(client, account_id))["status"] == "succeeded"
    held = await send(client, account_id, to=[recipient], subject="After the pause")
    delivered = await wait_status(client, account_id, held["id"])
    assert delivered["status"] == "sent", delivered
    assert fresh_in not in provider.refresh_tokens  # the PATCHed token was used, rotated
    assert await feed_until(client, bool, types="account.resumed")
