"""Threading headers: what the summary keeps of them, how a thread is named, and what a
reply keeps of a long References chain."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from service.domain.outbox import SendRequest
from service.domain.threads import MAX_ANSWER_REFERENCES as REPLY_REFERENCES
from service.domain.threads import (
    THREAD_ID_RE,
    ThreadPosition,
    root_to_look_up,
    thread_id_for,
    thread_id_of,
    thread_root,
)
from service.mail.parse import MAX_REFERENCES, summarize
from service.services.sending import reply_request


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode()


def test_summary_reads_in_reply_to_and_references_as_sent() -> None:
    summary = summarize(
        head(
            "Message-ID: <c@example.org>",
            "In-Reply-To: <b@example.org> (Bob's message of Monday) <x@example.org>",
            "References: <a@example.org>",
            "\t<b@example.org> (comment) junk <>",
        )
    )
    assert summary.message_id == "<c@example.org>"
    assert summary.in_reply_to == "<b@example.org>"
    assert summary.references == ("<a@example.org>", "<b@example.org>")


def test_summary_without_threading_headers() -> None:
    summary = summarize(head("Message-ID: <a@example.org>", "Subject: hi"))
    assert (summary.in_reply_to, summary.references) == (None, ())
    # No angle brackets: nothing that names a message.
    assert summarize(head("In-Reply-To: your message of Monday")).in_reply_to is None


def test_summary_of_a_malformed_header_section_still_reads_them() -> None:
    """The slow path (a broken line between fields) reads the same fields."""
    summary = summarize(
        b"Subject: hi\r\nthis line is broken\r\nReferences: <a@x> <b@x>\r\n"
        b"In-Reply-To: <b@x>\r\n\r\nbody\r\n"
    )
    assert (summary.in_reply_to, summary.references) == ("<b@x>", ("<a@x>", "<b@x>"))


def test_a_long_references_chain_keeps_its_root_and_newest_ids() -> None:
    chain = [f"<{n}@example.org>" for n in range(MAX_REFERENCES + 50)]
    summary = summarize(head("References: " + "\r\n ".join(chain)))
    assert len(summary.references) == MAX_REFERENCES
    assert summary.references[0] == chain[0]
    assert list(summary.references[1:]) == chain[-(MAX_REFERENCES - 1) :]


def test_eight_bit_ids_are_not_kept() -> None:
    summary = summarize(b"References: <\xff@example.org> <ok@example.org>\r\n\r\n")
    assert summary.references == ("<ok@example.org>",)


def test_the_root_names_the_thread() -> None:
    assert thread_root("<c@x>", "<b@x>", ["<a@x>", "<b@x>"]) == "<a@x>"
    assert thread_root("<c@x>", "<b@x>", []) == "<b@x>"
    assert thread_root("<c@x>", None, []) == "<c@x>"
    assert thread_root(None, None, []) is None
    root = thread_id_of("<a@x>")
    assert thread_id_for("<c@x>", "<b@x>", ["<a@x>", "<b@x>"], "msg_1") == root
    assert thread_id_for("<a@x>", None, [], "msg_1") == root
    assert thread_id_for(None, None, [], "msg_1") == thread_id_of("msg_1")
    assert THREAD_ID_RE.match(root)
    assert thread_id_of("<a@x>") != thread_id_of("<A@x>")  # ids compare exactly


def test_only_a_root_other_than_itself_is_looked_up() -> None:
    assert root_to_look_up("<c@x>", "<b@x>", ["<a@x>", "<b@x>"]) == "<a@x>"
    assert root_to_look_up("<c@x>", "<b@x>", []) == "<b@x>"
    assert root_to_look_up("<a@x>", None, []) is None
    assert root_to_look_up(None, None, []) is None


@given(
    at=st.datetimes(timezones=st.just(UTC)),
    arrival=st.datetimes(timezones=st.just(UTC)),
    ident=st.from_regex(r"(msg|out)_[0-9a-z]{26}", fullmatch=True),
)
def test_thread_positions_round_trip_through_cursor_keys(
    at: datetime, arrival: datetime, ident: str
) -> None:
    position = ThreadPosition(at, arrival, ident)
    key = position.key()
    assert len(key) <= 64
    assert key.replace("_", "").isalnum() and key == key.lower()
    assert ThreadPosition.of_key(key) == position


@given(st.from_regex(r"[a-z0-9_]{1,64}", fullmatch=True))
def test_every_cursor_key_is_a_position(key: str) -> None:
    assert isinstance(ThreadPosition.of_key(key), ThreadPosition)


def test_a_reply_to_a_long_chain_keeps_the_root_first() -> None:
    chain = [f"<{n}@example.org>" for n in range(40)]
    original = head(
        "From: bob@example.org",
        "Subject: long",
        "Message-ID: <last@example.org>",
        "References: " + " ".join(chain),
    )
    reply = reply_request(
        SendRequest(reply_to_message="msg_x", text="ok"), original, "alice@example.com"
    )
    references = reply.headers["References"].split()
    assert len(references) == REPLY_REFERENCES
    assert references[0] == chain[0]
    assert references[-1] == "<last@example.org>"
    assert references[1:-1] == chain[-(REPLY_REFERENCES - 2) :]
    # The reply names the same root as the original: the same thread.
    assert thread_root(None, None, references) == thread_root(None, None, chain)
