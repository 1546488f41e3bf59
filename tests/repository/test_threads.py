"""Threads in the store: the same rules and the same thread lists on both stores.

A thread is named after its root; a message whose root the account has joins the root's
thread, and messages that arrived before a message that joined another thread move with
it. So the order in which the messages of a conversation arrive never changes where they
end up. The thread list merges stored messages and sent copies, oldest first.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from service.domain.accounts import Account
from service.domain.enums import RetrievalStatus
from service.domain.retrievals import MessageFilter, MessageSummary, NewMessage, RetrievalProgress
from service.domain.threads import ThreadPosition, thread_id_of
from service.repository import messages as messages_module
from service.repository.migrations import V13_THREADS
from service.repository.postgres.migrations import V13_THREADS as PG_V13_THREADS
from service.repository.store import Store
from tests.repository.conftest import T0, new_message, new_outgoing
from tests.repository.test_messages import running

NO_PROGRESS = RetrievalProgress(
    messages_on_server=None,
    messages_downloaded=0,
    bytes_downloaded=0,
    messages_deleted=0,
    messages_skipped=0,
)
A, B, C, D, E = (f"<{name}@example.org>" for name in "abcde")


def conversation(account_id: str) -> dict[str, NewMessage]:
    """A root, two replies with References, one that names only its parent (In-Reply-To,
    as some clients send), and an answer to that one carrying References from it."""
    headers: dict[str, dict[str, Any]] = {
        A: {},
        B: {"in_reply_to": A, "references": [A]},
        C: {"in_reply_to": B, "references": [A, B]},
        D: {"in_reply_to": C},
        E: {"in_reply_to": D, "references": [C, D]},
    }
    return {
        message_id: new_message(
            account_id,
            n,
            message_id=message_id,
            date=T0 + timedelta(minutes=n),
            **fields,
        )
        for n, (message_id, fields) in enumerate(headers.items())
    }


async def store_in_batches(store: Store, account: Account, batches: list[list[NewMessage]]) -> None:
    for batch in batches:
        retrieval = await running(store, account)
        await store.messages.store_batch(account.id, batch, retrieval.id, NO_PROGRESS)
        await store.retrievals.finish(
            retrieval.id, RetrievalStatus.SUCCEEDED, T0, NO_PROGRESS, None
        )


async def threads_of(store: Store, account: Account, messages: dict[str, NewMessage]) -> set[str]:
    found = set()
    for message in messages.values():
        got = await store.messages.get(account.id, message.summary.id)
        assert got is not None
        assert got.thread_id is not None
        found.add(got.thread_id)
    return found


@pytest.mark.parametrize(
    "order",
    [
        pytest.param([[A], [B], [C], [D], [E]], id="in-order"),
        pytest.param([[E], [D], [C], [B], [A]], id="reversed"),
        pytest.param([[E, D, C, B, A]], id="reversed-in-one-batch"),
        pytest.param([[D, B], [E], [A, C]], id="mixed"),
    ],
)
async def test_a_conversation_is_one_thread_whatever_the_arrival_order(
    store: Store, account: Account, order: list[list[str]]
) -> None:
    messages = conversation(account.id)
    await store_in_batches(store, account, [[messages[m] for m in batch] for batch in order])
    assert await threads_of(store, account, messages) == {thread_id_of(A)}
    got = await store.messages.get(account.id, messages[C].summary.id)
    assert got is not None
    assert (got.in_reply_to, got.references) == (B, [A, B])
    only_parent = await store.messages.get(account.id, messages[D].summary.id)
    assert only_parent is not None
    assert (only_parent.in_reply_to, only_parent.references) == (C, [])


async def test_without_the_root_a_parent_only_reply_waits_then_joins(
    store: Store, account: Account
) -> None:
    """D names only C; with C not stored yet it is filed under C, and C's arrival (in A's
    thread) moves it, and a sent answer filed under C too, into A's thread."""
    messages = conversation(account.id)
    await store_in_batches(store, account, [[messages[D]]])
    waiting = await store.messages.get(account.id, messages[D].summary.id)
    assert waiting is not None and waiting.thread_id == thread_id_of(C)
    sent = new_outgoing(account.id, thread_id=thread_id_of(C))
    assert await store.outbox.accept(sent) is None
    await store_in_batches(store, account, [[messages[C]]])
    moved = await store.messages.get(account.id, messages[D].summary.id)
    assert moved is not None and moved.thread_id == thread_id_of(A)
    outgoing = await store.outbox.get(account.id, sent.id)
    assert outgoing is not None and outgoing.thread_id == thread_id_of(A)


async def test_a_message_without_ids_is_a_thread_of_its_own(store: Store, account: Account) -> None:
    lonely = [new_message(account.id, n, message_id=None) for n in range(2)]
    await store_in_batches(store, account, [lonely])
    threads = await threads_of(store, account, {m.summary.id: m for m in lonely})
    assert threads == {thread_id_of(m.summary.id) for m in lonely}
    assert len(threads) == 2


async def test_threads_are_per_account(store: Store, account: Account) -> None:
    from tests.repository.conftest import make_account

    other = make_account()
    await store.accounts.add(other)
    await store_in_batches(store, other, [[new_message(other.id, 0, message_id=C)]])
    # The other account's C is not this account's: D stays filed under C here.
    messages = conversation(account.id)
    await store_in_batches(store, account, [[messages[D]]])
    got = await store.messages.get(account.id, messages[D].summary.id)
    assert got is not None and got.thread_id == thread_id_of(C)
    assert await store.outbox.thread_of(account.id, C) is None
    assert await store.outbox.thread_of(other.id, C) == thread_id_of(C)


def sent_raw(message_id: str, references: str, subject: str) -> bytes:
    return (
        f"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
        f"Bcc: hidden@example.org\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n"
        f"In-Reply-To: {references.split()[-1]}\r\nReferences: {references}\r\n"
        "Date: Thu, 01 Jan 2026 10:00:00 +0000\r\n\r\nbody\r\n"
    ).encode()


async def thread_pages(
    store: Store, account: Account, thread_id: str, limit: int
) -> list[list[MessageSummary]]:
    pages = []
    after = None
    while True:
        page = await store.messages.page(
            account.id, MessageFilter(thread_id=thread_id), after=after, limit=limit
        )
        pages.append(page.items)
        if page.next_after is None:
            return pages
        after = page.next_after


async def test_the_thread_list_merges_sent_copies_oldest_first_page_by_page(
    store: Store, account: Account
) -> None:
    messages = conversation(account.id)
    await store_in_batches(store, account, [[messages[m] for m in (E, A, C)], [messages[B]]])
    unrelated = new_message(account.id, 9, message_id="<other@example.org>")
    await store_in_batches(store, account, [[unrelated]])
    # Sent between B (T0+1min) and C (T0+2min), and after everything; one cancelled.
    first = new_outgoing(
        account.id,
        created_at=T0 + timedelta(minutes=1, seconds=30),
        raw=sent_raw("<s1@example.com>", f"{A} {B}", "Re: first"),
        message_id="<s1@example.com>",
        thread_id=thread_id_of(A),
    )
    last = new_outgoing(
        account.id,
        created_at=T0 + timedelta(hours=1),
        raw=sent_raw("<s2@example.com>", f"{A} {C}", "Re: last"),
        message_id="<s2@example.com>",
        thread_id=thread_id_of(A),
    )
    cancelled = new_outgoing(
        account.id,
        created_at=T0 + timedelta(minutes=3),
        send_at=T0 + timedelta(days=1),
        thread_id=thread_id_of(A),
    )
    for outgoing in (first, last, cancelled):
        assert await store.outbox.accept(outgoing) is None
    assert await store.outbox.cancel(account.id, cancelled.id, T0 + timedelta(minutes=4))

    expected = [
        messages[A].summary.id,
        messages[B].summary.id,
        first.id,
        messages[C].summary.id,
        messages[E].summary.id,  # dated T0+4min: after C whatever its arrival
        last.id,
    ]
    for limit in (1, 2, 4, 10):
        pages = await thread_pages(store, account, thread_id_of(A), limit)
        assert all(len(page) <= limit for page in pages)
        assert [m.id for page in pages for m in page] == expected
    [items] = await thread_pages(store, account, thread_id_of(A), 10)
    assert [m.direction for m in items] == [
        "received",
        "received",
        "sent",
        "received",
        "received",
        "sent",
    ]
    copy = items[2]
    assert copy.uidl is None
    assert copy.message_id == "<s1@example.com>"
    assert copy.from_ == "Alice <alice@example.com>"
    assert (copy.to, copy.cc) == (["Bob <bob@example.org>"], [])
    assert copy.subject == "Re: first"
    assert (copy.in_reply_to, copy.references) == (B, [A, B])
    assert copy.retrieved_at == first.created_at
    assert copy.thread_id == thread_id_of(A)
    assert copy.size == len(first.raw)


async def test_any_cursor_key_is_a_position(store: Store, account: Account) -> None:
    messages = conversation(account.id)
    await store_in_batches(store, account, [list(messages.values())])
    flt = MessageFilter(thread_id=thread_id_of(A))
    everything = await store.messages.page(account.id, flt, after=None, limit=10)
    assert len(everything.items) == 5
    # A key of another list (a message id) or any junk of the cursor's form: no error.
    for key in (messages[A].summary.id, "zz", "0_0_", "a_b", "z" * 64):
        page = await store.messages.page(account.id, flt, after=key, limit=10)
        assert len(page.items) <= 5
    position = ThreadPosition(T0 + timedelta(minutes=2), T0, "")
    after_c = await store.messages.page(account.id, flt, after=position.key(), limit=10)
    assert [m.message_id for m in after_c.items] == [C, D, E]


async def test_the_migration_names_old_rows_threads_as_the_service_does(
    store: Store, account: Account
) -> None:
    """The backfill statements of migration 13, run over rows whose thread is unknown,
    give the digest of service.domain.threads (PostgreSQL computes it in SQL)."""
    ids = ["<plain@example.org>", "<Ünïcödé.1@exämple.org>"]
    stored = [new_message(account.id, n, message_id=m) for n, m in enumerate(ids)]
    stored.append(new_message(account.id, 5, message_id=None))
    await store_in_batches(store, account, [stored])
    sent = new_outgoing(account.id)
    assert await store.outbox.accept(sent) is None
    script = PG_V13_THREADS if store.kind == "postgres" else V13_THREADS
    statements = (
        "\n".join(line for line in part.splitlines() if not line.startswith("--")).strip()
        for part in script.split(";\n")
    )
    backfill = [s for s in statements if s.startswith(("UPDATE messages", "UPDATE outbox"))]
    assert len(backfill) == 2
    db: Any = store.db  # type: ignore[attr-defined]
    async with db.transaction() as conn:
        await conn.execute("UPDATE messages SET thread_id = NULL")
        await conn.execute("UPDATE outbox SET thread_id = NULL")
        for statement in backfill:
            await conn.execute(statement)
    for message in stored:
        got = await store.messages.get(account.id, message.summary.id)
        assert got is not None
        assert got.thread_id == thread_id_of(message.summary.message_id or message.summary.id)
    outgoing = await store.outbox.get(account.id, sent.id)
    assert outgoing is not None and outgoing.thread_id == thread_id_of(sent.message_id)


async def test_other_filters_apply_within_the_thread(
    store: Store, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small rounds: a filtered page is gathered over several reads of each kind.
    monkeypatch.setattr(messages_module, "THREAD_ROUND", 2)
    messages = conversation(account.id)
    await store_in_batches(store, account, [list(messages.values())])
    sent = [
        new_outgoing(
            account.id,
            created_at=T0 + timedelta(minutes=n, seconds=30),
            raw=sent_raw(f"<s{n}@example.com>", f"{A} <{n}@x>", f"Re: answer {n}"),
            message_id=f"<s{n}@example.com>",
            thread_id=thread_id_of(A),
        )
        for n in range(5)
    ]
    for outgoing in sent:
        assert await store.outbox.accept(outgoing) is None
    thread = thread_id_of(A)

    async def listed(limit: int, **filters: Any) -> list[str]:
        flt = MessageFilter(thread_id=thread, **filters)
        ids: list[str] = []
        after = None
        while True:
            page = await store.messages.page(account.id, flt, after=after, limit=limit)
            assert len(page.items) <= limit
            ids += [m.id for m in page.items]
            if page.next_after is None:
                return ids
            after = page.next_after

    for limit in (1, 2, 50):
        # Only the sent copies are from Alice (ASCII case ignored, as in the plain list).
        assert await listed(limit, from_contains="ALICE@") == [m.id for m in sent]
        assert await listed(limit, subject_contains="answer 3") == [sent[3].id]
        assert await listed(limit, text_contains="subject 4") == [messages[E].summary.id]
        assert await listed(limit, to_contains="bob@example.org") == [m.id for m in sent]
        assert await listed(limit, message_id=C) == [messages[C].summary.id]
        with_files = [m.summary.id for m in messages.values() if m.summary.has_attachments]
        assert await listed(limit, has_attachments=True) == with_files
    # since: the retrieval time of a stored message, the acceptance time of a sent copy.
    since = T0 + timedelta(minutes=3)
    got = await listed(2, since=since)
    assert got == [messages[D].summary.id, sent[3].id, messages[E].summary.id, sent[4].id]
