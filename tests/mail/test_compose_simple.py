"""The fast paths (7bit bodies, short headers, LF-only bodies) write what the email package
writes."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.mail.compose import (
    _LINE_BREAK,
    _POLICY_ASCII,
    SIMPLE_LINE_CHARS,
    Draft,
    _body,
    _compose,
    _known_head,
    _simple_body,
)
from service.mail.errors import MailInputError

BOUNDARY = re.compile(rb"=_[0-9a-f]{32}|={15}[0-9]+==")
LINE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=SIMPLE_LINE_CHARS
)
BODY = st.lists(LINE, max_size=20).map("\n".join) | st.lists(LINE, max_size=5).map(
    lambda lines: "\n".join(lines) + "\n"
)


def draft(text: str | None, html: str | None) -> Draft:
    return Draft(
        from_address="sender@example.com",
        from_name="Sender Name",
        to=["a@example.com", "b@example.org"],
        cc=["c@example.net"],
        bcc=["hidden@example.com"],
        subject="A subject",
        message_id="<id-1@example.com>",
        date=datetime(2026, 11, 26, 8, 0, tzinfo=UTC),
        text=text,
        html=html,
        headers={"X-Order": "1234"},
    )


@settings(max_examples=200, deadline=None)
@given(text=st.none() | BODY, html=st.none() | BODY)
def test_same_bytes_as_the_email_package(text: str | None, html: str | None) -> None:
    if text is None and html is None:
        return
    fast = _compose(draft(text, html), allow_simple=True)
    slow = _compose(draft(text, html), allow_simple=False)
    assert BOUNDARY.sub(b"B", fast.data) == BOUNDARY.sub(b"B", slow.data)
    assert fast.recipients == slow.recipients
    assert b"hidden@example.com" not in fast.data


def test_non_ascii_or_long_lines_take_the_email_package() -> None:
    assert _simple_body("caf\u00e9", None) is None
    assert _simple_body("x" * (SIMPLE_LINE_CHARS + 1), None) is None
    assert _simple_body("ok", "caf\u00e9") is None
    assert _simple_body("ok", None) is not None


HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("éü€ "),
    max_size=120,
)
ATOM = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    subject=HEADER_TEXT,
    from_name=st.none() | HEADER_TEXT.map(str.strip).filter(bool),
    order=HEADER_TEXT,
    recipients=st.lists(ATOM.map(lambda local: f"{local}@example.com"), min_size=1, max_size=8),
)
def test_headers_written_without_the_generator_are_its_bytes(
    subject: str, from_name: str | None, order: str, recipients: list[str]
) -> None:
    """Short printable headers are written directly; others (long, non-ASCII, quoted names)
    go through the generator: both give the bytes the generator alone gives."""
    message = Draft(
        from_address="sender@example.com",
        from_name=from_name,
        to=recipients,
        subject=subject.strip(),
        message_id="<id-2@example.com>",
        date=datetime(2026, 11, 26, 8, 0, tzinfo=UTC),
        text="Hello\n",
        headers={"X-Order": order.strip()} if order.strip() else {},
    )
    try:
        fast = _compose(message, allow_simple=True)
    except MailInputError as exc:
        with pytest.raises(MailInputError) as slow_error:
            _compose(message, allow_simple=False)
        assert slow_error.value.code == exc.code
        return
    slow = _compose(message, allow_simple=False)
    assert fast.data == slow.data


def test_short_ascii_headers_skip_the_generator() -> None:
    """The direct path is really taken for an ordinary message (not only the fallback)."""
    composed = EmailMessage(policy=_POLICY_ASCII)
    composed.set_raw("Subject", "A subject")
    composed.set_raw("To", "a@example.com")
    assert _known_head(composed, SIMPLE_LINE_CHARS) == (
        b"Subject: A subject\r\nTo: a@example.com\r\n"
    )
    composed.set_raw("X-Long", "y" * SIMPLE_LINE_CHARS)
    assert _known_head(composed, SIMPLE_LINE_CHARS) is None  # to refold: the generator's job


BREAKS = st.text(alphabet=st.sampled_from("ab\r\n\u2028\x85 "), max_size=60)


@settings(max_examples=500, deadline=None)
@given(value=BREAKS)
def test_line_break_fast_path_is_the_substitution(value: str) -> None:
    """Bodies without CR skip the regex: the result is the same text."""
    assert _body(value, "text") == _LINE_BREAK.sub("\n", value)
    assert "\r" not in (_body(value, "text") or "")
