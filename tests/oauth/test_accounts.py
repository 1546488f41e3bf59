"""OAuth2 credentials in the API: validation, write-only secrets, caller-managed access
tokens replaced by PATCH, the verify report's token step, and a provider that cannot be
reached (transient: no pause)."""

from __future__ import annotations

import socket
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from service.netguard import ConnectionGuard
from service.services.oauth import OAuthTokens
from tests.oauth.conftest import LOOPBACK, OAuthStack
from tests.outbox.conftest import in_app, send, wait_status
from tests.retrieval.conftest import retrieve

MESSAGE = b"From: Dan <dan@example.org>\nSubject: Caller token\n\nhello\n"


def body(stack: OAuthStack, user: str, incoming: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "OAuth",
        "email": f"{user}@example.com",
        "incoming": {
            "host": stack.dovecot.hostname,
            "port": stack.dovecot.pop3s_port,
            "security": "tls",
            "username": user,
            **incoming,
        },
        "outgoing": {
            "host": "localhost",
            "port": stack.postfix.submission_port,
            "security": "tls",
            "username": user,
            "auth": "oauth2",
            "access_token": "at-unused",
        },
    }


@pytest.mark.parametrize(
    ("incoming", "message"),
    [
        ({"auth": "oauth2"}, "`refresh_token` or `access_token`"),
        ({"auth": "oauth2", "refresh_token": "r"}, "needs `token_url`"),
        (
            {"auth": "oauth2", "refresh_token": "r", "token_url": "https://t.example/token"},
            "needs `client_id`",
        ),
        ({"auth": "oauth2", "access_token": "a", "refresh_token": "r"}, "not both"),
        ({"auth": "oauth2", "access_token": "a", "password": "p"}, "takes no `password`"),
        ({"password": "p", "access_token": "a"}, "needs `auth: oauth2`"),
        ({"auth": "oauth2", "access_token": "a", "token_url": "http://t.example/token"}, "https"),
    ],
)
async def test_invalid_oauth2_credentials_are_422(
    client: AsyncTestClient[Any], oauth_stack: OAuthStack, incoming: dict[str, Any], message: str
) -> None:
    response = await client.post("/v1/accounts", json=body(oauth_stack, "u", incoming))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    text = response.text
    assert message in text or (message == "https" and "token_url" in text), text


async def test_caller_managed_access_token_replaced_by_patch(
    client: AsyncTestClient[Any], oauth_stack: OAuthStack
) -> None:
    provider, dovecot = oauth_stack.provider, oauth_stack.dovecot
    mailbox = dovecot.add_user()
    mailbox.deliver(MESSAGE)
    token = provider.issue_access_token(mailbox.user)
    created = await client.post(
        "/v1/accounts",
        json=body(oauth_stack, mailbox.user, {"auth": "oauth2", "access_token": token}),
    )
    assert created.status_code == 201, created.text
    assert token not in created.text
    assert created.json()["incoming"]["auth"] == "oauth2"
    account_id = created.json()["id"]
    start = provider.refreshes  # the provider is shared by the session's tests
    assert (await retrieve(client, account_id))["status"] == "succeeded"
    assert provider.refreshes == start  # Mailroom never refreshes a caller's token

    provider.expire(token)
    failed = await retrieve(client, account_id)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "auth_failed"

    new_token = provider.issue_access_token(mailbox.user)
    patched = await client.patch(
        f"/v1/accounts/{account_id}", json={"incoming": {"access_token": new_token}}
    )
    assert patched.status_code == 200, patched.text
    assert new_token not in patched.text
    assert (await retrieve(client, account_id))["status"] == "succeeded"

    # Back to a password needs one; OAuth2 fields without oauth2 are refused.
    refused = await client.patch(
        f"/v1/accounts/{account_id}", json={"incoming": {"auth": "password"}}
    )
    assert refused.status_code == 422, refused.text
    refused = await client.patch(
        f"/v1/accounts/{account_id}",
        json={"incoming": {"auth": "password", "password": "x", "access_token": "a"}},
    )
    assert refused.status_code == 422, refused.text


async def test_verify_reports_the_token_step(
    client: AsyncTestClient[Any], oauth_stack: OAuthStack
) -> None:
    provider, dovecot = oauth_stack.provider, oauth_stack.dovecot
    mailbox = dovecot.add_user()
    app_client = provider.add_client()
    grant = {
        "auth": "oauth2",
        "token_url": provider.token_url,
        "client_id": app_client[0],
        "client_secret": app_client[1],
        "refresh_token": provider.grant(mailbox.user, app_client[0]),
    }
    created = await client.post("/v1/accounts", json=body(oauth_stack, mailbox.user, grant))
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    report = (await client.post(f"/v1/accounts/{account_id}/verify")).json()
    steps = report["incoming"]["steps"]
    assert [s["step"] for s in steps] == ["token", "connect", "tls", "auth", "mailbox"], steps
    assert all(s["ok"] for s in steps), steps
    assert "refreshed" in steps[0]["detail"]
    # Held now: a second verify uses it.
    again = (await client.post(f"/v1/accounts/{account_id}/verify")).json()
    assert again["incoming"]["steps"][0]["detail"].startswith("access token held")
    assert again["incoming"]["ok"] is True

    # A refused refresh: the token step fails and nothing is connected.
    revoked = dict(grant, refresh_token="rt-never-issued")
    draft = await client.post("/v1/verify", json=body(oauth_stack, mailbox.user, revoked))
    assert draft.status_code == 200, draft.text
    steps = draft.json()["incoming"]["steps"]
    assert [(s["step"], s["ok"], s["code"]) for s in steps] == [
        ("token", False, "oauth_refresh_failed")
    ]
    assert "invalid_grant" in steps[0]["detail"]
    # The outgoing caller-managed token is held: the token step passes, AUTH is refused.
    out_steps = draft.json()["outgoing"]["steps"]
    assert out_steps[0]["step"] == "token" and out_steps[0]["ok"]
    assert any(s["step"] == "auth" and s["code"] == "auth_failed" for s in out_steps), out_steps


async def test_unreachable_token_endpoint_fails_without_pausing(
    client: AsyncTestClient[Any], oauth_stack: OAuthStack
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mailbox = oauth_stack.dovecot.add_user()
    grant = {
        "auth": "oauth2",
        "token_url": f"https://localhost:{port}/token",
        "client_id": "c",
        "refresh_token": "r",
    }
    created = await client.post("/v1/accounts", json=body(oauth_stack, mailbox.user, grant))
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    failed = await retrieve(client, account_id)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "oauth_refresh_failed"
    shown = (await client.get(f"/v1/accounts/{account_id}")).json()
    assert shown["smtp_status"] == "ok"  # a provider that is down is no reason to pause


async def test_refused_refresh_at_delivery_pauses_and_holds_the_message(
    client: AsyncTestClient[Any], oauth_stack: OAuthStack
) -> None:
    provider = oauth_stack.provider
    mailbox = oauth_stack.dovecot.add_user()
    app_client = provider.add_client()
    data = body(oauth_stack, mailbox.user, {"auth": "oauth2", "access_token": "at-unused"})
    data["outgoing"] = {
        "host": "localhost",
        "port": oauth_stack.postfix.submission_port,
        "security": "tls",
        "username": mailbox.user,
        "auth": "oauth2",
        "token_url": provider.token_url,
        "client_id": app_client[0],
        "client_secret": app_client[1],
        "refresh_token": "rt-revoked-long-ago",
    }
    created = await client.post("/v1/accounts", json=data)
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    queued = await send(client, account_id, to=[oauth_stack.postfix.add_mailbox()])
    held = await wait_status(client, account_id, queued["id"], ["deferred"], attempts=1)
    assert held["attempts"][0]["error_code"] == "oauth_refresh_failed", held
    assert "invalid_grant" in held["error"]["detail"]
    assert held["next_attempt_at"] is None  # held by the pause, not retried on a schedule
    shown = (await client.get(f"/v1/accounts/{account_id}")).json()
    assert shown["smtp_status"] == "oauth_refresh_failed"
    assert "invalid_grant" in shown["smtp_pause"]["detail"]

    # New credentials resume delivery at once.
    fresh = provider.grant(mailbox.user, app_client[0])
    patched = await client.patch(
        f"/v1/accounts/{account_id}", json={"outgoing": {"refresh_token": fresh}}
    )
    assert patched.status_code == 200, patched.text
    sent = await wait_status(client, account_id, queued["id"])
    assert sent["status"] == "sent", sent


async def test_a_refresh_lost_to_another_process_uses_its_token_without_pausing(
    client: AsyncTestClient[Any], oauth_stack: OAuthStack
) -> None:
    """Two replicas refresh one account at once; the provider rotates, so the loser's
    refresh token is refused: it takes the winner's stored token instead of pausing."""
    provider = oauth_stack.provider
    mailbox = oauth_stack.dovecot.add_user()
    app_client = provider.add_client()
    grant = {
        "auth": "oauth2",
        "token_url": provider.token_url,
        "client_id": app_client[0],
        "client_secret": app_client[1],
        "refresh_token": provider.grant(mailbox.user, app_client[0]),
    }
    created = await client.post("/v1/accounts", json=body(oauth_stack, mailbox.user, grant))
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    state = client.app.state
    repo = state.store.accounts
    cipher = state.accounts._cipher  # the app's own key, as a second replica would have

    def replica() -> OAuthTokens:
        return OAuthTokens(repo, cipher, ConnectionGuard(LOOPBACK), ca_file=oauth_stack.ca_file)

    async def race() -> tuple[str, str]:
        account = await repo.get_any(account_id)
        winner = await replica().access_token(account, "in")
        # The loser read the account before the winner stored its refresh.
        stale = msgspec.structs.replace(
            account, incoming=msgspec.structs.replace(account.incoming, token_expires_at=None)
        )
        loser = OAuthTokens(repo, cipher, ConnectionGuard(LOOPBACK), ca_file=oauth_stack.ca_file)
        original_get = repo.get_any
        calls = 0

        async def first_read_stale(aid: str) -> Any:
            nonlocal calls
            calls += 1
            return stale if calls == 1 else await original_get(aid)

        loser._repo = _Proxy(repo, get_any=first_read_stale)  # type: ignore[assignment]
        return winner, await loser.access_token(stale, "in")

    winner, loser = await in_app(client, race)
    assert loser == winner
    shown = (await client.get(f"/v1/accounts/{account_id}")).json()
    assert shown["smtp_status"] == "ok"


class _Proxy:
    """A repository with one method replaced."""

    def __init__(self, inner: Any, **replaced: Any) -> None:
        self._inner, self._replaced = inner, replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced.get(name) or getattr(self._inner, name)
