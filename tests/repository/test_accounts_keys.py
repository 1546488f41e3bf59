"""Accounts and API keys: the same behaviour on both stores."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from service.domain.accounts import OutgoingServer, RetrievalPolicy, SMTPPause
from service.domain.enums import OutgoingStatus, Security
from service.repository.errors import DuplicateError
from service.repository.store import Store
from tests.repository.conftest import T0, make_account, new_outgoing


async def test_round_trip_keeps_every_field(store: Store) -> None:
    account = make_account(
        display_name="Alice A.",
        outgoing=OutgoingServer(
            host="smtp.example.com",
            port=25,
            security=Security.NONE,
            allow_insecure_auth=True,
        ),
        retrieval=RetrievalPolicy(
            leave_on_server=False,
            delete_after_days=7,
            max_message_bytes=5_000_000_000,
            poll_interval_minutes=5,
        ),
        login_delay_s=300,
    )
    await store.accounts.add(account)
    assert await store.accounts.get("default", account.id) == account
    assert await store.accounts.get_any(account.id) == account
    assert await store.accounts.get("other", account.id) is None  # tenants are apart
    assert await store.accounts.list_polled() == [account]


async def test_same_id_twice_is_a_duplicate(store: Store) -> None:
    account = make_account()
    await store.accounts.add(account)
    with pytest.raises(DuplicateError):
        await store.accounts.add(account)


async def test_pages_in_id_order_with_a_cursor(store: Store) -> None:
    accounts = [make_account() for _ in range(5)]
    for account in reversed(accounts):
        await store.accounts.add(account)
    await store.accounts.add(make_account(tenant="other"))
    first = await store.accounts.page("default", after=None, limit=2)
    assert [a.id for a in first.items] == [a.id for a in accounts[:2]]
    assert first.next_after == accounts[1].id
    second = await store.accounts.page("default", after=first.next_after, limit=2)
    third = await store.accounts.page("default", after=second.next_after, limit=2)
    assert [a.id for a in second.items + third.items] == [a.id for a in accounts[2:]]
    assert third.next_after is None


async def test_delete_cascades_to_all_its_mail(store: Store) -> None:
    account = make_account()
    await store.accounts.add(account)
    message = new_outgoing(account.id)
    await store.outbox.accept(message)
    assert not await store.accounts.delete("other", account.id)  # not that tenant's
    assert await store.accounts.delete("default", account.id)
    assert not await store.accounts.delete("default", account.id)
    assert await store.outbox.get(account.id, message.id) is None
    assert await store.outbox.raw(account.id, message.id) is None
    assert await store.stats.outbox_by_status() == {}


async def test_pause_only_for_the_settings_it_was_found_with(store: Store) -> None:
    account = make_account()
    await store.accounts.add(account)
    pause = SMTPPause(code="auth_failed", detail="refused", since=T0 + timedelta(seconds=1))
    assert not await store.accounts.pause_smtp(
        account.id, pause, settings_of=T0 - timedelta(seconds=1)
    )
    assert await store.accounts.pause_smtp(account.id, pause, settings_of=T0)
    paused = await store.accounts.get_any(account.id)
    assert paused is not None and paused.smtp_pause == pause
    # A PATCH of anything else keeps the pause; new outgoing settings end it.
    await store.accounts.replace(msgspec.structs.replace(account, name="Renamed"))
    kept = await store.accounts.get_any(account.id)
    assert kept is not None and kept.name == "Renamed" and kept.smtp_pause == pause
    assert await store.accounts.clear_smtp_pauses(["tls_failed"]) == 0
    assert await store.accounts.clear_smtp_pauses(["auth_failed", "tls_failed"]) == 1
    cleared = await store.accounts.get_any(account.id)
    assert cleared is not None and cleared.smtp_pause is None


async def test_new_outgoing_settings_make_waiting_mail_due(store: Store) -> None:
    account = make_account()
    await store.accounts.add(account)
    message = new_outgoing(account.id)
    await store.outbox.accept(message)
    [claimed] = await store.outbox.claim(
        account.id, T0, 10, owner="rep_a", lease_until=T0 + timedelta(minutes=1)
    )
    later = T0 + timedelta(hours=1)
    await store.outbox.release([claimed.id], later)
    now = T0 + timedelta(minutes=5)
    changed = msgspec.structs.replace(account, updated_at=now)
    await store.accounts.replace(changed, outgoing_changed=True, at=now)
    got = await store.outbox.get(account.id, message.id)
    assert got is not None and got.status == OutgoingStatus.QUEUED and got.next_attempt_at == now
    await store.accounts.set_login_delay(account.id, 120)
    stored = await store.accounts.get_any(account.id)
    assert stored is not None and stored.login_delay_s == 120


async def test_api_keys_in_order_and_unique(store: Store) -> None:
    await store.api_keys.add("default", "hash-1")
    await store.api_keys.add("other", "hash-2")
    assert await store.api_keys.all() == [("default", "hash-1"), ("other", "hash-2")]
    with pytest.raises(DuplicateError):
        await store.api_keys.add("default", "hash-1")
