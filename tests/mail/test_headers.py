"""Extra headers and subjects: refused on any line break or control, never stripped."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.mail import (
    PROTECTED_HEADERS,
    MailErrorCode,
    MailInputError,
    is_protected_header,
    validate_extra_headers,
    validate_header_name,
    validate_header_value,
    validate_subject,
)
from service.mail.headers import MAX_EXTRA_HEADERS, MAX_HEADER_NAME_CHARS, MAX_HEADER_VALUE_CHARS

INJECTIONS = [
    "x\r\nBcc: victim@example.net",
    "x\nBcc: victim@example.net",
    "x\rBcc: victim@example.net",
    "x\r\n\r\nbody takeover",
    "x\x00y",
    "x\u2028Bcc: victim@example.net",
    "x\u2029y",
    "x\u0085y",
    "x\ty",
    "x\x1by",
    "x\x7fy",
    "x\x9by",  # C1 CSI
    "x\ud800y",  # lone surrogate
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_header_values_with_line_breaks_or_controls_are_refused(value: str) -> None:
    with pytest.raises(MailInputError) as caught:
        validate_header_value(value, field="headers.X-Tag")
    assert caught.value.code is MailErrorCode.HEADER_INJECTION
    assert caught.value.field == "headers.X-Tag"


@pytest.mark.parametrize("value", INJECTIONS)
def test_subjects_with_line_breaks_or_controls_are_refused(value: str) -> None:
    with pytest.raises(MailInputError) as caught:
        validate_subject(value)
    assert caught.value.code is MailErrorCode.HEADER_INJECTION
    assert caught.value.field == "subject"


@pytest.mark.parametrize(
    "value", ["", "plain", "Grüße 👋 — «ok»", "=?utf-8?q?already?=", "a" * 998]
)
def test_acceptable_values_come_back_unchanged(value: str) -> None:
    assert validate_header_value(value, field="headers.X") == value
    assert validate_subject(value) == value


def test_value_length_is_limited() -> None:
    with pytest.raises(MailInputError) as caught:
        validate_subject("a" * (MAX_HEADER_VALUE_CHARS + 1))
    assert caught.value.code is MailErrorCode.TOO_LONG


@pytest.mark.parametrize(
    "name", ["X-Campaign", "List-Unsubscribe", "In-Reply-To", "References", "x!#$%&'*+-.^_`|~"]
)
def test_valid_header_names(name: str) -> None:
    assert validate_header_name(name, field="headers") == name


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("", MailErrorCode.INVALID_HEADER_NAME),
        ("X Tag", MailErrorCode.INVALID_HEADER_NAME),
        ("X:Tag", MailErrorCode.INVALID_HEADER_NAME),
        ("X-Tag\r\nBcc", MailErrorCode.INVALID_HEADER_NAME),
        ("X-Tág", MailErrorCode.INVALID_HEADER_NAME),
        ("X-\x00", MailErrorCode.INVALID_HEADER_NAME),
        ("X" * (MAX_HEADER_NAME_CHARS + 1), MailErrorCode.TOO_LONG),
    ],
)
def test_invalid_header_names(name: str, code: MailErrorCode) -> None:
    with pytest.raises(MailInputError) as caught:
        validate_header_name(name, field="headers")
    assert caught.value.code is code


@pytest.mark.parametrize(
    "name",
    [
        *sorted(PROTECTED_HEADERS),
        "BCC",
        "Bcc",
        "Received",
        "Content-Transfer-Encoding",
        "MIME-Version",
        "Content-Type",
        "Content-Disposition",
        "Content-Anything",
        "Message-ID",
        "Resent-From",
        "resent-bcc",
        "ARC-Seal",
        "DKIM-Signature",
        "Return-Path",
        "Sender",
    ],
)
def test_protected_headers_cannot_be_set(name: str) -> None:
    assert is_protected_header(name)
    with pytest.raises(MailInputError) as caught:
        validate_extra_headers({name: "x"})
    assert caught.value.code is MailErrorCode.PROTECTED_HEADER
    assert caught.value.field == f"headers.{name}"


def test_extra_headers_keep_order_and_values() -> None:
    given_headers = {"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>"}
    assert validate_extra_headers(given_headers) == tuple(given_headers.items())


def test_duplicate_names_ignoring_case_are_refused() -> None:
    with pytest.raises(MailInputError) as caught:
        validate_extra_headers({"X-Tag": "1", "x-tag": "2"})
    assert caught.value.code is MailErrorCode.DUPLICATE_HEADER
    assert caught.value.field == "headers.x-tag"


def test_too_many_headers_are_refused() -> None:
    headers = {f"X-H{i}": "v" for i in range(MAX_EXTRA_HEADERS + 1)}
    with pytest.raises(MailInputError) as caught:
        validate_extra_headers(headers)
    assert caught.value.code is MailErrorCode.TOO_MANY
    assert validate_extra_headers(dict(list(headers.items())[:MAX_EXTRA_HEADERS]))


def test_an_unprintable_name_is_not_echoed_in_the_field_path() -> None:
    with pytest.raises(MailInputError) as caught:
        validate_extra_headers({"X-Ok": "1", "X-Bad\r\nBcc": "x"})
    assert caught.value.field == "headers[1]"
    assert caught.value.code is MailErrorCode.INVALID_HEADER_NAME


def test_injection_in_an_extra_header_value_is_refused_with_its_path() -> None:
    with pytest.raises(MailInputError) as caught:
        validate_extra_headers({"X-Tag": "ok\r\nBcc: victim@example.net"})
    assert caught.value.code is MailErrorCode.HEADER_INJECTION
    assert caught.value.field == "headers.X-Tag"


_BREAKERS = st.sampled_from(["\r", "\n", "\x00", "\u2028", "\u2029", "\u0085", "\x0b", "\x0c"])


@given(prefix=st.text(max_size=40), bad=_BREAKERS, suffix=st.text(max_size=40))
def test_any_value_containing_a_line_breaker_is_refused(prefix: str, bad: str, suffix: str) -> None:
    with pytest.raises(MailInputError) as caught:
        validate_header_value(prefix + bad + suffix, field="headers.X")
    assert caught.value.code is MailErrorCode.HEADER_INJECTION


@given(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")),
        max_size=MAX_HEADER_VALUE_CHARS,
    )
)
def test_any_value_without_controls_or_separators_is_accepted_unchanged(value: str) -> None:
    assert validate_header_value(value, field="headers.X") == value
