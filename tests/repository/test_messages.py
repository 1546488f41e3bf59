"""The message store: the same behaviour on both stores."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest

from service.domain.accounts import Account
from service.domain.enums import RetrievalStatus, RetrievalTrigger, ServerMessageState
from service.domain.ids import new_id
from service.domain.retrievals import MessageFilter, MessageSummary, Retrieval, RetrievalProgress
from service.repository.errors import DuplicateError
from service.repository.messages import SCAN_WINDOW
from service.repository.store import Store
from tests.repository.conftest import T0, make_account, new_message

NO_PROGRESS = RetrievalProgress(
    messages_on_server=None,
    messages_downloaded=0,
    bytes_downloaded=0,
    messages_deleted=0,
    messages_skipped=0,
)


async def running(store: Store, account: Account) -> Retrieval:
    retrieval = Retrieval(
        id=new_id("ret"),
        account_id=account.id,
        trigger=RetrievalTrigger.API,
        status=RetrievalStatus.QUEUED,
        created_at=T0,
    )
    assert await store.retrievals.add(
        retrieval, owner="rep_a", lease_until=T0 + timedelta(minutes=1)
    )
    return retrieval


async def test_batch_stores_summaries_bytes_uidls_and_progress(
    store: Store, account: Account
) -> None:
    retrieval = await running(store, account)
    batch = [new_message(account.id, n) for n in range(3)]
    progress = RetrievalProgress(
        messages_on_server=3,
        messages_downloaded=3,
        bytes_downloaded=303,
        messages_deleted=0,
        messages_skipped=0,
    )
    await store.messages.store_batch(account.id, batch, retrieval.id, progress)
    for message in batch:
        assert await store.messages.get(account.id, message.summary.id) == message.summary
        assert await store.messages.raw(account.id, message.summary.id) == message.raw
    assert await store.messages.count(account.id) == 3
    known = await store.messages.known(account.id)
    assert {u: k.state for u, k in known.items()} == {
        f"uidl-{n}": ServerMessageState.STORED for n in range(3)
    }
    assert known["uidl-1"].seen_at == batch[1].summary.retrieved_at
    stored = await store.retrievals.get(account.id, retrieval.id)
    assert stored is not None and (stored.messages_on_server, stored.bytes_downloaded) == (3, 303)


async def test_a_uidl_twice_rolls_back_the_whole_batch(store: Store, account: Account) -> None:
    retrieval = await running(store, account)
    await store.messages.store_batch(
        account.id, [new_message(account.id, 1)], retrieval.id, NO_PROGRESS
    )
    again = [new_message(account.id, 2), new_message(account.id, 1)]
    with pytest.raises(DuplicateError):
        await store.messages.store_batch(account.id, again, retrieval.id, NO_PROGRESS)
    assert await store.messages.count(account.id) == 1
    assert set(await store.messages.known(account.id)) == {"uidl-1"}


async def test_newest_first_pages_and_filters(store: Store, account: Account) -> None:
    retrieval = await running(store, account)
    batch = [new_message(account.id, n) for n in range(5)]
    await store.messages.store_batch(account.id, batch, retrieval.id, NO_PROGRESS)
    ids = [m.summary.id for m in reversed(batch)]
    first = await store.messages.page(account.id, MessageFilter(), after=None, limit=3)
    assert [m.id for m in first.items] == ids[:3] and first.next_after == ids[2]
    rest = await store.messages.page(account.id, MessageFilter(), after=first.next_after, limit=3)
    assert [m.id for m in rest.items] == ids[3:] and rest.next_after is None

    async def matching(flt: MessageFilter) -> list[str]:
        page = await store.messages.page(account.id, flt, after=None, limit=50)
        return [m.uidl for m in page.items]

    assert await matching(MessageFilter(since=T0 + timedelta(minutes=3))) == ["uidl-4", "uidl-3"]
    assert await matching(MessageFilter(from_contains="S3@EXAMPLE")) == ["uidl-3"]
    assert await matching(MessageFilter(subject_contains="subject 2")) == ["uidl-2"]
    assert await matching(MessageFilter(has_attachments=True)) == ["uidl-4", "uidl-2", "uidl-0"]
    # A filter character that means something in LIKE patterns is taken literally.
    assert await matching(MessageFilter(subject_contains="%")) == []


async def test_local_delete_keeps_the_uidl_known(store: Store, account: Account) -> None:
    retrieval = await running(store, account)
    message = new_message(account.id, 1)
    await store.messages.store_batch(account.id, [message], retrieval.id, NO_PROGRESS)
    assert await store.messages.delete(account.id, message.summary.id)
    assert not await store.messages.delete(account.id, message.summary.id)
    assert await store.messages.get(account.id, message.summary.id) is None
    assert "uidl-1" in await store.messages.known(account.id)


async def test_skipped_and_forgotten_uidls(store: Store, account: Account) -> None:
    retrieval = await running(store, account)
    await store.messages.store_batch(
        account.id, [new_message(account.id, 1)], retrieval.id, NO_PROGRESS
    )
    # Recording a skip never downgrades a stored UIDL.
    await store.messages.record_skipped(account.id, [("uidl-1", 5), ("big", 9_000_000_000)], T0)
    known = await store.messages.known(account.id)
    assert known["uidl-1"].state == ServerMessageState.STORED
    assert known["big"].state == ServerMessageState.SKIPPED
    await store.messages.forget(account.id, ["big", "never-seen"])
    assert set(await store.messages.known(account.id)) == {"uidl-1"}
    assert await store.messages.count(account.id) == 1  # forgetting keeps stored mail


async def test_every_filter_through_its_index_gives_the_scan_s_answer(
    store: Store, account: Account
) -> None:
    """Enough rows that the newest-first window misses the rare matches, so the trigram
    and retrieved_at indexes answer; each answer is checked against a plain Python scan."""
    other = make_account(tenant="other")
    await store.accounts.add(other)
    retrieval = await running(store, account)
    total = SCAN_WINDOW + 300
    rare = {5, 17, 250}  # old rows: outside the newest window
    batch = []
    for n in range(total):
        subject = f'Needle_%x "Ünïcode" {n}' if n in rare else f"Weekly report {n}"
        to = [f"Rare Person <rare{n}@example.org>"] if n in rare else ["bob@example.com"]
        if n == 250:  # quoted: its JSON text reads \"Rare Person\"
            to = ['"Rare Person" <rare250@example.org>']
        batch.append(new_message(account.id, n, subject=subject, to=to))
    for start in range(0, total, 500):
        await store.messages.store_batch(
            account.id, batch[start : start + 500], retrieval.id, NO_PROGRESS
        )
    # The other account's matches never show.
    theirs = await running(store, other)
    await store.messages.store_batch(
        other.id, [new_message(other.id, 5, subject="Needle_%x thëirs")], theirs.id, NO_PROGRESS
    )
    summaries = [m.summary for m in reversed(batch)]

    async def listed(flt: MessageFilter, limit: int = 50) -> list[str]:
        pages, after = [], None
        while True:
            page = await store.messages.page(account.id, flt, after=after, limit=limit)
            pages.extend(m.uidl for m in page.items)
            if page.next_after is None:
                return pages
            after = page.next_after

    def expected(keep: Callable[[MessageSummary], bool]) -> list[str]:
        return [s.uidl for s in summaries if keep(s)]

    def has(value: str | None, needle: str) -> bool:
        return value is not None and needle.lower() in value.lower()

    rare_uidls = [f"uidl-{n}" for n in sorted(rare, reverse=True)]
    cases: list[tuple[MessageFilter, Callable[[MessageSummary], bool]]] = [
        (MessageFilter(subject_contains="NEEDLE_%X"), lambda s: has(s.subject, "needle_%x")),
        (MessageFilter(subject_contains='"Ünï'), lambda s: has(s.subject, '"Ünï')),
        (MessageFilter(to_contains="RARE5@"), lambda s: any(has(t, "rare5@") for t in s.to)),
        (MessageFilter(to_contains='", "'), lambda s: False),  # never across two addresses
        # A quote is escaped in the stored JSON text: found all the same (not by the index).
        (
            MessageFilter(to_contains='"RARE PERSON" <'),
            lambda s: any(has(t, '"rare person" <') for t in s.to),
        ),
        (MessageFilter(text_contains='"rare person"'), lambda s: s.uidl == "uidl-250"),
        (MessageFilter(text_contains="rare person"), lambda s: s.uidl in rare_uidls),
        (MessageFilter(text_contains="S17@EXAMPLE"), lambda s: has(s.from_, "s17@example")),
        (MessageFilter(text_contains="report 12"), lambda s: has(s.subject, "report 12")),
        (
            MessageFilter(subject_contains="needle", from_contains="S250"),
            lambda s: has(s.subject, "needle") and has(s.from_, "s250"),
        ),
        (MessageFilter(subject_contains="rt"), lambda s: has(s.subject, "rt")),  # too short
        (
            MessageFilter(since=T0 + timedelta(minutes=total - 3)),
            lambda s: s.retrieved_at >= T0 + timedelta(minutes=total - 3),
        ),
        (
            MessageFilter(since=T0 + timedelta(minutes=100), subject_contains="needle"),
            lambda s: s.uidl == "uidl-250",
        ),
        (MessageFilter(since=T0 + timedelta(days=3650)), lambda s: False),
        # The window then reads only rows with (or without) attachments.
        (
            MessageFilter(subject_contains="needle", has_attachments=True),
            lambda s: has(s.subject, "needle") and s.has_attachments,
        ),
        (
            MessageFilter(to_contains="rare", has_attachments=False),
            lambda s: any(has(t, "rare") for t in s.to) and not s.has_attachments,
        ),
        (
            MessageFilter(text_contains="report 1", has_attachments=True),
            lambda s: (
                (has(s.subject, "report 1") or has(s.from_, "report 1")) and s.has_attachments
            ),
        ),
        # Two common filters that rarely match together (one index lookup for both).
        (
            MessageFilter(subject_contains="REPORT", from_contains="s25"),
            lambda s: has(s.subject, "report") and has(s.from_, "s25"),
        ),
        # Two one-column filters and a q: their index sets intersected.
        (
            MessageFilter(subject_contains="needle", to_contains="rare", text_contains="E.ORG"),
            lambda s: (
                has(s.subject, "needle")
                and any(has(t, "rare") for t in s.to)
                and any(has(v, "e.org") for v in (s.subject, s.from_, *s.to))
            ),
        ),
        # Only ASCII case is ignored: Ü and ü differ (both stores, both plans).
        (MessageFilter(subject_contains='"üNÏ'), lambda s: False),
        (MessageFilter(subject_contains='"ÜNï'), lambda s: s.uidl in rare_uidls),
    ]
    for flt, keep in cases:
        assert await listed(flt) == expected(keep), flt
    assert await listed(MessageFilter(subject_contains="needle"), limit=2) == rare_uidls
    assert len(await listed(MessageFilter(text_contains="report"), limit=500)) == total - 3

    # A small account (its window holds all its rows) is answered exactly from the window.
    theirs_page = await store.messages.page(
        other.id, MessageFilter(subject_contains="needle"), after=None, limit=50
    )
    assert [m.uidl for m in theirs_page.items] == ["uidl-5"]
    # Read from the window: ASCII case ignored, not Ë against ë.
    for needle, uidls in (("THëIRS", ["uidl-5"]), ("THËIRS", [])):
        theirs_page = await store.messages.page(
            other.id, MessageFilter(subject_contains=needle), after=None, limit=50
        )
        assert [m.uidl for m in theirs_page.items] == uidls, needle

    # Kept in step with deletes (the local delete and the account's).
    await store.messages.delete(account.id, batch[17].summary.id)
    assert await listed(MessageFilter(subject_contains="needle")) == ["uidl-250", "uidl-5"]
    assert await store.accounts.delete("other", other.id)
    mine = await store.messages.page(
        account.id, MessageFilter(subject_contains="needle"), after=None, limit=50
    )
    assert [m.uidl for m in mine.items] == ["uidl-250", "uidl-5"]
