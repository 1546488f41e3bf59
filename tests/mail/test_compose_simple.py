"""The fast path for 7bit text/html bodies writes what the email package writes."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from service.mail.compose import SIMPLE_LINE_CHARS, Draft, _compose, _simple_body

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
