"""MIME composition: structure, encodings, envelope, and CRLF-only output."""

from __future__ import annotations

import dataclasses
import email
import email.utils
import re
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.mail import (
    Attachment,
    ComposedMessage,
    Draft,
    MailErrorCode,
    MailInputError,
    compose,
    make_message_id,
)
from service.mail.compose import MAX_LINE_OCTETS

MESSAGE_ID = "<0f1e2d3c4b5a69788796a5b4c3d2e1f0@example.com>"
DATE = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def draft(**changes: Any) -> Draft:
    base = Draft(
        from_address="sender@example.com",
        to=["rcpt@example.org"],
        subject="Hello",
        message_id=MESSAGE_ID,
        date=DATE,
        text="Hi there.\n",
    )
    return dataclasses.replace(base, **changes)


def parsed(message: ComposedMessage) -> EmailMessage:
    # Read it as a mail client stores it (LF line ends); CRLF-ness is asserted separately.
    local = message.data.replace(b"\r\n", b"\n")
    return email.message_from_bytes(local, policy=policy.default)


def decoded_display_name(composed: ComposedMessage, header: str) -> tuple[str, str]:
    """(display name, address) of a one-mailbox header, decoded the RFC 2047 way.

    The address structure is read first, then the phrase's encoded words are decoded
    (they are atoms: specials inside them stay part of the name). CPython's own address
    parser would also do this, but keeps the folding space between two adjacent encoded
    words, which RFC 2047 section 6.2 says to drop.
    """
    raw = str(email.message_from_bytes(composed.data, policy=policy.compat32)[header])
    raw = re.sub(r"\r?\n[ \t]", " ", raw).strip()  # unfold
    if not raw.endswith(">"):
        return "", raw
    phrase, _, angle_addr = raw.rpartition("<")
    address = angle_addr.removesuffix(">")
    if not phrase.strip():
        return "", address
    if phrase.startswith('"'):
        return email.utils.parseaddr(raw)
    return str(make_header(decode_header(phrase.rstrip(" ")))), address


def lf_text(value: str) -> str:
    """Body text with CRLF as LF: base64 text parts carry canonical CRLF (RFC 2045)."""
    return value.replace("\r\n", "\n")


def assert_crlf_only(data: bytes) -> None:
    assert BARE_CR_OR_LF.search(data) is None
    assert max(len(line) for line in data.split(b"\r\n")) <= MAX_LINE_OCTETS


# -- structure ---------------------------------------------------------------------------


def test_text_only_is_text_plain_with_the_given_headers() -> None:
    composed = compose(draft(from_name="Sender Name", reply_to="replies@example.com"))
    message = parsed(composed)
    assert message.get_content_type() == "text/plain"
    assert message.get_content() == "Hi there.\n"
    assert message["Message-ID"] == MESSAGE_ID
    assert message["Date"] == "Tue, 02 Jan 2024 03:04:05 +0000"
    assert message["From"] == "Sender Name <sender@example.com>"
    assert message["Reply-To"] == "replies@example.com"
    assert message["To"] == "rcpt@example.org"
    assert message["Subject"] == "Hello"
    assert message["MIME-Version"] == "1.0"
    assert composed.message_id == MESSAGE_ID
    assert composed.mail_from == "sender@example.com"
    assert composed.recipients == ("rcpt@example.org",)
    assert composed.size == len(composed.data)
    assert_crlf_only(composed.data)


def test_html_only_is_text_html() -> None:
    message = parsed(compose(draft(text=None, html="<p>Hi</p>")))
    assert message.get_content_type() == "text/html"
    assert message.get_content() == "<p>Hi</p>\n"


def test_text_and_html_are_alternatives_plain_first() -> None:
    message = parsed(compose(draft(text="plain", html="<b>rich</b>")))
    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert cast(EmailMessage, parts[0]).get_content() == "plain\n"
    assert cast(EmailMessage, parts[1]).get_content() == "<b>rich</b>\n"


def test_attachments_make_multipart_mixed_with_exact_bytes() -> None:
    blob = bytes(range(256)) * 10
    composed = compose(
        draft(
            text="see attached",
            html="<p>see attached</p>",
            attachments=[
                Attachment("report.pdf", "Application/PDF", blob),
                Attachment("notes.txt", "text/plain", b"line1\r\nline2\n"),
            ],
        )
    )
    message = parsed(composed)
    assert message.get_content_type() == "multipart/mixed"
    body, pdf, notes = message.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert pdf.get_content_type() == "application/pdf"
    assert pdf.get_filename() == "report.pdf"
    assert pdf.get_content_disposition() == "attachment"
    assert pdf.get_payload(decode=True) == blob
    assert notes.get_payload(decode=True) == b"line1\r\nline2\n"  # base64 keeps bytes exact
    # MIME-Version belongs on the top level only.
    assert [part["MIME-Version"] for part in message.walk()] == ["1.0"] + [None] * 5
    assert_crlf_only(composed.data)


def test_attachments_without_body() -> None:
    message = parsed(
        compose(
            draft(
                text=None,
                attachments=[Attachment("a.bin", "application/octet-stream", b"\x00\xff")],
            )
        )
    )
    assert message.get_content_type() == "multipart/mixed"
    assert message["MIME-Version"] == "1.0"
    (only,) = message.iter_parts()
    assert only.get_payload(decode=True) == b"\x00\xff"


def test_no_body_at_all_is_an_empty_text_part() -> None:
    message = parsed(compose(draft(text=None)))
    assert message.get_content_type() == "text/plain"
    assert message.get_content().strip() == ""


# -- envelope and Bcc ----------------------------------------------------------------------


def test_bcc_is_in_the_envelope_and_nowhere_in_the_message() -> None:
    composed = compose(
        draft(to=["a@example.org"], cc=["b@example.org"], bcc=["secret-rcpt@hidden.example"])
    )
    assert composed.recipients == ("a@example.org", "b@example.org", "secret-rcpt@hidden.example")
    assert b"secret-rcpt" not in composed.data
    assert b"hidden.example" not in composed.data
    assert re.search(rb"(?im)^bcc:", composed.data) is None
    assert parsed(composed)["Cc"] == "b@example.org"


def test_envelope_recipients_are_normalized_and_deduplicated_in_order() -> None:
    composed = compose(
        draft(
            to=["a@Example.org", "b@example.org"],
            cc=["a@example.org"],
            bcc=["b@EXAMPLE.ORG", "c@bücher.example"],
        )
    )
    assert composed.recipients == ("a@example.org", "b@example.org", "c@xn--bcher-kva.example")
    assert composed.to == ("a@example.org", "b@example.org")
    assert composed.cc == ("a@example.org",)
    assert composed.bcc == ("b@example.org", "c@xn--bcher-kva.example")


def test_only_bcc_recipients_is_fine() -> None:
    composed = compose(draft(to=[], bcc=["hidden@example.org"]))
    assert composed.recipients == ("hidden@example.org",)
    assert parsed(composed)["To"] is None


def test_no_recipient_at_all_is_refused() -> None:
    with pytest.raises(MailInputError) as caught:
        compose(draft(to=[], cc=[], bcc=[]))
    assert caught.value.code is MailErrorCode.NO_RECIPIENTS


# -- encodings -----------------------------------------------------------------------------


def test_non_ascii_subject_and_name_use_rfc2047_and_keep_the_message_ascii() -> None:
    composed = compose(draft(subject="Grüße aus Köln — 👋", from_name="Zoë Ünïcode"))
    assert composed.data.isascii()
    assert not composed.smtputf8
    assert b"=?utf-8?" in composed.data
    message = parsed(composed)
    assert message["Subject"] == "Grüße aus Köln — 👋"
    assert message["From"].addresses[0].display_name == "Zoë Ünïcode"


def test_a_display_name_full_of_specials_stays_one_quoted_name() -> None:
    name = 'Eve "Boss" <eve@evil.example>, Mallory'
    composed = compose(draft(from_name=name))
    (address,) = parsed(composed)["From"].addresses
    assert address.display_name == name
    assert address.addr_spec == "sender@example.com"
    assert decoded_display_name(composed, "From") == (name, "sender@example.com")


def test_non_ascii_body_is_sent_7bit() -> None:
    text = "Ça va? Ünïcode ✓\n" * 3
    composed = compose(draft(text=text, html="<p>Ça va ✓</p>"))
    assert composed.data.isascii()
    plain, html = parsed(composed).iter_parts()
    assert plain["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert lf_text(cast(EmailMessage, plain).get_content()) == text
    assert lf_text(cast(EmailMessage, html).get_content()) == "<p>Ça va ✓</p>\n"


def test_non_ascii_filename_uses_rfc2231() -> None:
    composed = compose(
        draft(attachments=[Attachment("rapport été.pdf", "application/pdf", b"%PDF")])
    )
    assert b"filename*=utf-8''rapport%20%C3%A9t%C3%A9.pdf" in composed.data
    _, attachment = parsed(composed).iter_parts()
    assert attachment.get_filename() == "rapport été.pdf"


def test_idn_domains_are_a_labels_and_need_no_smtputf8() -> None:
    composed = compose(draft(to=["user@bücher.example"]))
    assert not composed.smtputf8
    assert composed.data.isascii()
    assert parsed(composed)["To"] == "user@xn--bcher-kva.example"


def test_a_non_ascii_local_part_needs_smtputf8_and_utf8_headers() -> None:
    composed = compose(draft(to=["josé@example.org"], subject="Olá"))
    assert composed.smtputf8
    assert "To: josé@example.org\r\n".encode() in composed.data
    assert "Subject: Olá\r\n".encode() in composed.data  # RFC 6532: raw UTF-8 headers
    assert composed.recipients == ("josé@example.org",)


def test_a_non_ascii_bcc_needs_smtputf8_but_leaves_headers_ascii() -> None:
    composed = compose(draft(bcc=["josé@example.org"], subject="Olá"))
    assert composed.smtputf8
    assert composed.data.isascii()


def test_extra_headers_are_written_once_and_encoded() -> None:
    composed = compose(draft(headers={"X-Campaign": "spring", "X-Note": "naïve"}))
    message = parsed(composed)
    assert message.get_all("X-Campaign") == ["spring"]
    assert message["X-Note"] == "naïve"
    assert composed.data.isascii()


def test_date_is_written_in_utc() -> None:
    paris = timezone(timedelta(hours=2))
    message = parsed(compose(draft(date=datetime(2024, 6, 1, 12, 0, tzinfo=paris))))
    assert message["Date"] == "Sat, 01 Jun 2024 10:00:00 +0000"


# -- line ends: the SMTP smuggling defence ----------------------------------------------------

SMUGGLING_TEXT = (
    "start\n.\nafter a lone dot with bare LFs\r\n.\r\nMAIL FROM:<evil@attacker.example>\r\n"
    "RCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled\r\n.\r\n"
    "bare CR\r.\rthen LF-dot-CRLF\n.\r\nthen CRLF-dot-LF\r\n.\nend"
)


def test_bare_cr_and_lf_in_bodies_become_crlf_line_breaks() -> None:
    composed = compose(draft(text=SMUGGLING_TEXT, html="<p>a\rb\nc</p>"))
    assert_crlf_only(composed.data)
    plain, html = parsed(composed).iter_parts()
    # Every line break, whatever its spelling, is a line break; the text is otherwise intact.
    expected = re.sub(r"\r\n|\r|\n", "\n", SMUGGLING_TEXT) + "\n"
    assert cast(EmailMessage, plain).get_content() == expected
    assert cast(EmailMessage, html).get_content() == "<p>a\nb\nc</p>\n"


def test_long_lines_are_folded_or_encoded() -> None:
    composed = compose(draft(subject="s" * 998, text="x" * 5000, headers={"X-Long": "y" * 998}))
    assert_crlf_only(composed.data)
    message = parsed(composed)
    assert message["Subject"] == "s" * 998
    assert message.get_content() == "x" * 5000 + "\n"


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field", "code"),
    [
        ({"from_address": "Sender <sender@example.com>"}, "from", MailErrorCode.INVALID_ADDRESS),
        ({"cc": ["ok@example.org", "bad@@example.org"]}, "cc[1]", MailErrorCode.INVALID_ADDRESS),
        (
            {"bcc": ["x@example.org\r\nRCPT TO:<v@example.net>"]},
            "bcc[0]",
            MailErrorCode.INVALID_ADDRESS,
        ),
        ({"to": "rcpt@example.org"}, "to", MailErrorCode.INVALID_ADDRESS),
        ({"reply_to": "a@example.org, b@example.org"}, "reply_to", MailErrorCode.INVALID_ADDRESS),
        ({"from_name": "Eve\r\nBcc: v@example.net"}, "from_name", MailErrorCode.HEADER_INJECTION),
        ({"subject": "hi\r\nBcc: v@example.net"}, "subject", MailErrorCode.HEADER_INJECTION),
        ({"subject": "hi\u2028there"}, "subject", MailErrorCode.HEADER_INJECTION),
        ({"headers": {"Bcc": "v@example.net"}}, "headers.Bcc", MailErrorCode.PROTECTED_HEADER),
        (
            {"headers": {"Content-Type": "text/html"}},
            "headers.Content-Type",
            MailErrorCode.PROTECTED_HEADER,
        ),
        ({"headers": {"X-A": "1\n2"}}, "headers.X-A", MailErrorCode.HEADER_INJECTION),
        ({"text": "nul\x00here"}, "text", MailErrorCode.INVALID_BODY),
        ({"html": "surrogate \ud800"}, "html", MailErrorCode.INVALID_BODY),
        ({"message_id": "no-brackets@example.com"}, "message_id", MailErrorCode.INVALID_MESSAGE_ID),
        ({"message_id": "<a b@example.com>"}, "message_id", MailErrorCode.INVALID_MESSAGE_ID),
        (
            {"message_id": "<x@example.com>\r\nBcc: v"},
            "message_id",
            MailErrorCode.INVALID_MESSAGE_ID,
        ),
        (
            {"message_id": "<" + "a" * 240 + "@example.com>"},
            "message_id",
            MailErrorCode.INVALID_MESSAGE_ID,
        ),
        ({"date": datetime(2024, 1, 1)}, "date", MailErrorCode.INVALID_DATE),
    ],
)
def test_invalid_drafts_are_refused_with_field_and_code(
    changes: dict[str, Any], field: str, code: MailErrorCode
) -> None:
    with pytest.raises(MailInputError) as caught:
        compose(draft(**changes))
    assert (caught.value.field, caught.value.code) == (field, code)


@pytest.mark.parametrize(
    ("attachment", "field", "code"),
    [
        (
            Attachment("", "text/plain", b""),
            "attachments[0].filename",
            MailErrorCode.INVALID_ATTACHMENT,
        ),
        (
            Attachment("..", "text/plain", b""),
            "attachments[0].filename",
            MailErrorCode.INVALID_ATTACHMENT,
        ),
        (
            Attachment("../etc/passwd", "text/plain", b""),
            "attachments[0].filename",
            MailErrorCode.INVALID_ATTACHMENT,
        ),
        (
            Attachment("a\\b.txt", "text/plain", b""),
            "attachments[0].filename",
            MailErrorCode.INVALID_ATTACHMENT,
        ),
        (
            Attachment("a\r\nContent-Type: text/html", "text/plain", b""),
            "attachments[0].filename",
            MailErrorCode.HEADER_INJECTION,
        ),
        (
            Attachment("a" * 256, "text/plain", b""),
            "attachments[0].filename",
            MailErrorCode.TOO_LONG,
        ),
        (
            Attachment("a.txt", "text/plain; charset=utf-8", b""),
            "attachments[0].content_type",
            MailErrorCode.INVALID_ATTACHMENT,
        ),
        (
            Attachment("a.txt", "text", b""),
            "attachments[0].content_type",
            MailErrorCode.INVALID_ATTACHMENT,
        ),
        (
            Attachment("a.txt", "text/plain\r\nX: y", b""),
            "attachments[0].content_type",
            MailErrorCode.INVALID_ATTACHMENT,
        ),
        (
            Attachment("a.eml", "message/rfc822", b""),
            "attachments[0].content_type",
            MailErrorCode.INVALID_ATTACHMENT,
        ),
        (
            Attachment("a.mime", "multipart/mixed", b""),
            "attachments[0].content_type",
            MailErrorCode.INVALID_ATTACHMENT,
        ),
    ],
)
def test_invalid_attachments_are_refused(
    attachment: Attachment, field: str, code: MailErrorCode
) -> None:
    with pytest.raises(MailInputError) as caught:
        compose(draft(attachments=[attachment]))
    assert (caught.value.field, caught.value.code) == (field, code)


# -- Message-ID ----------------------------------------------------------------------------


def test_make_message_id_is_unique_and_usable() -> None:
    ids = {make_message_id("Bücher.example") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"<[0-9a-f]{32}@xn--bcher-kva\.example>", i) for i in ids)
    for message_id in list(ids)[:10]:
        assert compose(draft(message_id=message_id)).message_id == message_id


def test_make_message_id_refuses_a_bad_domain() -> None:
    with pytest.raises(MailInputError) as caught:
        make_message_id("example.com>\r\nBcc: v@example.net")
    assert caught.value.code is MailErrorCode.INVALID_ADDRESS


# -- properties ------------------------------------------------------------------------------

_BODY = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=300
)


@settings(max_examples=150, deadline=None)
@given(text=_BODY, html=st.none() | _BODY)
def test_any_body_gives_crlf_only_output_that_decodes_back(text: str, html: str | None) -> None:
    composed = compose(draft(text=text, html=html))
    assert_crlf_only(composed.data)
    assert composed.data.isascii()
    message = parsed(composed)
    plain = message if html is None else next(iter(message.iter_parts()))
    decoded = lf_text(cast(EmailMessage, plain).get_content())
    normalized = re.sub(r"\r\n|\r|\n", "\n", text)
    # The email package ends a body with a newline; otherwise the text is unchanged.
    assert decoded in (normalized, normalized + "\n")


@settings(max_examples=150, deadline=None)
@given(
    subject=st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs")),
        max_size=200,
    ),
    name=st.text(
        alphabet=st.characters(
            blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs"),
            blacklist_characters="\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
        ),
        max_size=60,
    ),
)
def test_any_subject_and_name_round_trip(subject: str, name: str) -> None:
    composed = compose(draft(subject=subject, from_name=name))
    assert_crlf_only(composed.data)
    assert parsed(composed)["Subject"] == subject
    assert decoded_display_name(composed, "From") == (name, "sender@example.com")


@settings(max_examples=300, deadline=None)
@given(
    name=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    subject=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120),
    to=st.lists(
        st.from_regex(r"[a-z0-9.+_-]{1,12}@[a-z]{1,8}\.example", fullmatch=True),
        min_size=1,
        max_size=12,
    ),
)
def test_ascii_headers_round_trip(name: str, subject: str, to: list[str]) -> None:
    # Printable ASCII takes the fast path (no header parsing) unless quoting is needed.
    # Leading whitespace of a field body, and whitespace around an unquoted phrase, is
    # folding whitespace to mail parsers (a first word too long for the first line is
    # also folded onto the next), so it is compared without it.
    to = [a for a in to if ".." not in a and not a.startswith(".") and ".@" not in a] or [
        "r@x.example"
    ]
    composed = compose(draft(from_name=name, subject=subject, to=to))
    assert_crlf_only(composed.data)
    message = parsed(composed)
    assert message["Subject"].lstrip() == subject.lstrip()
    assert [a.addr_spec for a in message["To"].addresses] == to
    decoded_name, address = decoded_display_name(composed, "From")
    assert (decoded_name.strip(), address) == (name.strip(), "sender@example.com")
