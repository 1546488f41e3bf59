"""Tests of service.mail.parse: summaries, full parses and attachments of real-shaped mail.

The corpus in tests/data/messages (described in its README) is checked value by value;
hypothesis then feeds arbitrary and mutated messages to prove nothing raises and that
parse() and attachment() always agree.
"""

from __future__ import annotations

import base64
import email.message
import email.utils
import re
import struct
import unicodedata
import urllib.parse
import zlib
from datetime import UTC, datetime, timedelta
from email.header import Header
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.mail import parse as parse_module
from service.mail.parse import (
    MAX_DEFECTS,
    MAX_FILENAME_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_PARTS,
    Attachment,
    AttachmentInfo,
    AttachmentNotFound,
    Body,
    MessageSummary,
    ParsedMessage,
    attachment,
    parse,
    safe_content_disposition,
    summarize,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "messages"
CORPUS = sorted(path.name for path in DATA.glob("*.eml"))


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def png_1x1() -> bytes:
    """The image in the corpus (same construction as when the corpus was written)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


PNG = png_1x1()
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


def utc(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def msg(*lines: str, body: str = "", newline: str = "\n") -> bytes:
    """A message from header lines and a body (UTF-8), with the given line ending."""
    text = newline.join(lines) + newline + newline + body.replace("\n", newline)
    return text.encode("utf-8")


# --- The corpus, value by value -----------------------------------------------------

EXPECTED_SUMMARIES = {
    "alternative.eml": MessageSummary(
        from_="Alice Example <alice@example.com>",
        to=("Bob <bob@example.org>", "carol@example.net"),
        cc=('"Dave, the Reviewer" <dave@example.com>',),
        subject="Quarterly report",
        date=utc(2025, 10, 14, 7, 30),
        message_id="<alt-1@example.com>",
        has_attachments=False,
    ),
    "nested-related.eml": MessageSummary(
        from_="Newsletter <news@example.com>",
        to=("reader@example.org",),
        subject="Nested multiparts with an inline logo",
        date=utc(2025, 10, 15, 12, 0),
        message_id="<nested-1@example.com>",
        has_attachments=True,
    ),
    "attachments.eml": MessageSummary(
        from_="Sender <sender@example.com>",
        to=("receiver@example.com",),
        subject="Two attachments",
        date=utc(2025, 10, 16, 10, 0),
        message_id="<attach-1@example.com>",
        has_attachments=True,
    ),
    "latin1.eml": MessageSummary(
        from_="Jörg <joerg@example.de>",
        to=("team@example.de",),
        subject="Grüße aus Köln",
        date=utc(2025, 10, 17, 16, 45),
        message_id="<latin1-1@example.de>",
    ),
    "windows-1252.eml": MessageSummary(
        from_="Office <office@example.com>",
        to=("someone@example.com",),
        subject="\u201cQuoted\u201d prices",
        date=utc(2025, 10, 18, 6, 0),
        message_id="<cp1252-1@example.com>",
    ),
    "koi8-r.eml": MessageSummary(
        from_="Ivan <ivan@example.ru>",
        to=("olga@example.ru",),
        subject="Привет",
        date=utc(2025, 10, 19, 9, 0),
        message_id="<koi8-1@example.ru>",
    ),
    "iso-2022-jp.eml": MessageSummary(
        from_="Taro <taro@example.jp>",
        to=("hanako@example.jp",),
        subject="会議のお知らせ",
        date=utc(2025, 10, 20, 0, 0),
        message_id="<jis-1@example.jp>",
    ),
    "rfc2047-2231.eml": MessageSummary(
        from_="Jörg Müller <joerg@example.de>",
        to=("Élodie <elodie@example.fr>", '"Smith, John" <john@example.com>'),
        cc=("山田 <yamada@example.jp>",),
        subject="Café menü und € 5 Preis",
        date=utc(2025, 10, 21, 12, 15),
        message_id="<i18n-1@example.de>",
        has_attachments=True,
    ),
    "malformed-no-close-boundary.eml": MessageSummary(
        from_="Broken Mailer <broken@example.com>",
        to=("victim@example.com",),
        subject="Missing closing boundary",
        date=utc(2025, 10, 22, 11, 0),
        message_id="<noclose-1@example.com>",
        has_attachments=True,
    ),
    "malformed-bad-base64.eml": MessageSummary(
        from_="Sender <sender@example.com>",
        to=("receiver@example.com",),
        subject="Bad base64",
        date=utc(2025, 10, 23, 16, 20),
        message_id="<badb64-1@example.com>",
        has_attachments=True,
    ),
    "malformed-bogus-charset.eml": MessageSummary(
        from_="Sender <sender@example.com>",
        to=("receiver@example.com",),
        subject="café menu",
        date=utc(2025, 10, 24, 13, 0),
        message_id="<bogus-1@example.com>",
    ),
    "malformed-header-no-colon.eml": MessageSummary(
        from_="Eve <eve@example.com>",
        to=("frank@example.com",),
        subject="Still parsed",
        date=utc(2025, 10, 25, 12, 0),
        message_id="<nocolon-1@example.com>",
    ),
    "malformed-date.eml": MessageSummary(
        from_="Sender <sender@example.com>",
        to=("receiver@example.com",),
        subject="Unparseable date",
        date=None,
        message_id="bare-id-without-brackets@example.com",
    ),
    "malformed-no-boundary-param.eml": MessageSummary(
        from_="Sender <sender@example.com>",
        to=("receiver@example.com",),
        subject="Multipart without a boundary",
        date=utc(2025, 10, 26, 10, 0),
        message_id="<noboundary-1@example.com>",
        has_attachments=False,
    ),
    "empty-body.eml": MessageSummary(
        from_="Sender <sender@example.com>",
        to=("receiver@example.com",),
        subject="Nothing inside",
        date=utc(2025, 10, 27, 10, 0),
        message_id="<empty-1@example.com>",
    ),
    "dot-lines.eml": MessageSummary(
        from_="Sender <sender@example.com>",
        to=("receiver@example.com",),
        subject="Lines starting with a dot",
        date=utc(2025, 10, 28, 10, 0),
        message_id="<dots-1@example.com>",
    ),
    "eight-bit-no-mime.eml": MessageSummary(
        from_="Zoë <zoe@example.com>",
        to=("receiver@example.com",),
        subject="Grüße ohne MIME",
        date=utc(2025, 10, 29, 10, 0),
        message_id="<eightbit-1@example.com>",
    ),
    "no-headers.eml": MessageSummary(),
    "plain-lf.eml": MessageSummary(
        from_="Plain Sender <plain@example.com>",
        to=("receiver@example.com",),
        subject="A folded subject line that is long enough to be continued on a second line",
        date=utc(2025, 10, 30, 10, 0),
        message_id="<plain-1@example.com>",
    ),
    "plain-crlf.eml": MessageSummary(
        from_="Plain Sender <plain@example.com>",
        to=("receiver@example.com",),
        subject="A folded subject line that is long enough to be continued on a second line",
        date=utc(2025, 10, 30, 10, 0),
        message_id="<plain-1@example.com>",
    ),
    "single-part-pdf.eml": MessageSummary(
        from_="Billing <billing@example.com>",
        to=("customer@example.com",),
        subject="Your invoice",
        date=utc(2025, 10, 31, 10, 0),
        message_id="<invoice-1@example.com>",
        has_attachments=True,
    ),
    "text-attachment-only.eml": MessageSummary(
        from_="Sender <sender@example.com>",
        to=("receiver@example.com",),
        subject="Just a text file",
        date=utc(2025, 11, 1, 10, 0),
        message_id="<textatt-1@example.com>",
        has_attachments=True,
    ),
    "forwarded.eml": MessageSummary(
        from_="Forwarder <fwd@example.com>",
        to=("receiver@example.com",),
        subject="Fwd: Original",
        date=utc(2025, 11, 2, 10, 0),
        message_id="<fwd-1@example.com>",
        has_attachments=True,
    ),
    "related-inline-image.eml": MessageSummary(
        from_="Designer <designer@example.com>",
        to=("receiver@example.com",),
        subject="HTML with an inline image",
        date=utc(2025, 11, 3, 10, 0),
        message_id="<related-1@example.com>",
        has_attachments=False,
    ),
}


def test_every_corpus_file_has_expectations() -> None:
    assert sorted(EXPECTED_SUMMARIES) == CORPUS


@pytest.mark.parametrize("name", CORPUS)
def test_summary_of_corpus_message(name: str) -> None:
    assert summarize(load(name)) == EXPECTED_SUMMARIES[name]


def user_visible_attachments(parsed: ParsedMessage) -> bool:
    """Ground truth for has_attachments: a part that is neither a body nor an inline
    resource of the HTML body (one with a Content-ID that is not marked attachment)."""
    return any(
        info.content_id is None or info.disposition == "attachment" for info in parsed.attachments
    )


@pytest.mark.parametrize("name", CORPUS)
def test_has_attachments_hint_agrees_with_full_parse(name: str) -> None:
    raw = load(name)
    assert summarize(raw).has_attachments == user_visible_attachments(parse(raw))


@pytest.mark.parametrize("name", CORPUS)
def test_summary_and_parsed_headers_agree(name: str) -> None:
    raw = load(name)
    summary = summarize(raw)
    headers = dict(parse(raw).headers)
    assert headers.get("Subject") == summary.subject
    assert headers.get("From") == summary.from_
    assert headers.get("Message-ID") == summary.message_id


@pytest.mark.parametrize("name", CORPUS)
def test_every_listed_attachment_can_be_fetched(name: str) -> None:
    raw = load(name)
    parsed = parse(raw)
    for info in parsed.attachments:
        fetched = attachment(raw, info.index)
        assert fetched.index == info.index
        assert fetched.filename == info.filename
        assert fetched.content_type == info.content_type
        assert fetched.content_id == info.content_id
        assert fetched.disposition == info.disposition
        assert fetched.size == len(fetched.data) == info.size
    with pytest.raises(AttachmentNotFound):
        attachment(raw, len(parsed.attachments))


def test_multipart_alternative_bodies() -> None:
    parsed = parse(load("alternative.eml"))
    assert parsed.text == Body(
        content="Hello Bob,\n\nThe report is ready \u2014 see the figures below. "
        "This line is long enough to need a soft line break.",
        charset="utf-8",
    )
    assert parsed.html == Body(
        content="<html><body><p>Hello Bob,</p><p>The report is ready \u2014 see the "
        "figures below.</p></body></html>",
        charset="utf-8",
    )
    assert parsed.attachments == ()
    assert parsed.defects == ()


def test_parsed_headers_keep_order_and_decode_addresses_one_by_one() -> None:
    assert parse(load("alternative.eml")).headers == (
        ("From", "Alice Example <alice@example.com>"),
        ("To", "Bob <bob@example.org>, carol@example.net"),
        ("Cc", '"Dave, the Reviewer" <dave@example.com>'),
        ("Subject", "Quarterly report"),
        ("Date", "Tue, 14 Oct 2025 09:30:00 +0200"),
        ("Message-ID", "<alt-1@example.com>"),
        ("MIME-Version", "1.0"),
        ("Content-Type", 'multipart/alternative; boundary="alt-boundary"'),
    )
    headers = dict(parse(load("rfc2047-2231.eml")).headers)
    # The decoded comma stays inside the quoted name instead of splitting the address.
    assert headers["To"] == 'Élodie <elodie@example.fr>, "Smith, John" <john@example.com>'


def test_nested_mixed_alternative_related_with_inline_image() -> None:
    raw = load("nested-related.eml")
    assert b"\r\n" in raw  # the CRLF member of the corpus
    parsed = parse(raw)
    assert parsed.text == Body(
        content="Plain version: see the logo in the HTML version. Ciao, Zoë.", charset="utf-8"
    )
    assert parsed.html == Body(
        content='<html><body><img src="cid:logo@example.com"><p>Ciao, Zoë.</p></body></html>',
        charset="utf-8",
    )
    assert parsed.attachments == (
        AttachmentInfo(
            index=0,
            filename="logo.png",
            content_type="image/png",
            size=len(PNG),
            content_id="logo@example.com",
            disposition="inline",
        ),
        AttachmentInfo(
            index=1,
            filename="report.pdf",
            content_type="application/pdf",
            size=len(PDF),
            content_id=None,
            disposition="attachment",
        ),
    )
    assert parsed.defects == ()
    assert attachment(raw, 0).data == PNG
    assert attachment(raw, 1) == Attachment(
        index=1,
        filename="report.pdf",
        content_type="application/pdf",
        content_id=None,
        disposition="attachment",
        data=PDF,
    )


def test_binary_base64_and_text_quoted_printable_attachments() -> None:
    raw = load("attachments.eml")
    parsed = parse(raw)
    assert parsed.text == Body(content="See the attached files.\n", charset="us-ascii")
    assert [(a.filename, a.content_type, a.disposition) for a in parsed.attachments] == [
        ("blob.bin", "application/octet-stream", "attachment"),
        ("notes.txt", "text/plain", "attachment"),
    ]
    assert attachment(raw, 0).data == bytes(range(256))
    assert (
        attachment(raw, 1).data
        == (
            "Prix: 10 € = dix euros\nTrailing space here \nA very long line that goes on and on "
            "and on well past the seventy-six character limit of quoted-printable."
        ).encode()
    )  # the last line break belongs to the boundary (RFC 2046)


@pytest.mark.parametrize(
    ("name", "content", "charset"),
    [
        ("latin1.eml", "Grüße aus Köln, ça va? Voilà.\n", "iso-8859-1"),
        (
            "windows-1252.eml",
            "\u201cSmart quotes\u201d \u2013 and \u20ac 5 each.\n",
            "windows-1252",
        ),
        ("koi8-r.eml", "Привет, мир!\nКак дела?\n", "koi8-r"),  # noqa: RUF001 (Cyrillic)
        ("iso-2022-jp.eml", "こんにちは、世界。\n明日の会議は十時からです。\n", "iso-2022-jp"),
    ],
)
def test_non_utf8_charsets(name: str, content: str, charset: str) -> None:
    parsed = parse(load(name))
    assert parsed.text == Body(content=content, charset=charset)
    assert parsed.defects == ()


def test_rfc2231_and_rfc2047_filenames() -> None:
    raw = load("rfc2047-2231.eml")
    parsed = parse(raw)
    assert parsed.text == Body(content="Anhänge mit internationalen Namen.", charset="utf-8")
    assert [(a.filename, a.content_type, a.disposition) for a in parsed.attachments] == [
        ("€ rapport détaillé.pdf", "application/pdf", "attachment"),  # filename*=UTF-8''
        ("東京の地図.png", "image/png", "attachment"),  # filename*0*= / filename*1*=
        ("日本語.txt", "text/plain", "attachment"),  # RFC 2047 inside filename="..."
        ("résumé.doc", "application/msword", None),  # only Content-Type name=
    ]
    assert attachment(raw, 0).data == PDF
    assert attachment(raw, 1).data == PNG
    assert attachment(raw, 2).data == "日本語のテキスト".encode()
    assert attachment(raw, 3).data == b"resume"
    assert parsed.defects == ()


def test_missing_closing_boundary_keeps_the_parts() -> None:
    raw = load("malformed-no-close-boundary.eml")
    parsed = parse(raw)
    assert parsed.text == Body(
        content="The closing delimiter of this message is missing.", charset="utf-8"
    )
    assert attachment(raw, 0).data == b"hello, attachment"
    assert attachment(raw, 0).filename == "hello.txt"
    assert parsed.defects == ("message: CloseBoundaryNotFoundDefect",)


def test_bad_base64_is_decoded_leniently_and_reported() -> None:
    raw = load("malformed-bad-base64.eml")
    parsed = parse(raw)
    assert attachment(raw, 0).data == b"Hello, world!"
    assert parsed.defects == (
        "part 2: InvalidBase64CharactersDefect",
        "part 2: InvalidBase64PaddingDefect",
    )


def test_bogus_charsets_fall_back_and_say_so() -> None:
    parsed = parse(load("malformed-bogus-charset.eml"))
    assert parsed.text == Body(content="naïve café", charset="utf-8")
    assert parsed.html == Body(content="<p>café crème</p>", charset="windows-1252")
    assert dict(parsed.headers)["Subject"] == "café menu"
    assert parsed.defects == (
        "message: UnknownCharsetDefect: Subject: unknown charset 'x-no-such-charset', "
        "decoded as utf-8",
        "part 1: UnknownCharsetDefect: unknown charset 'x-no-such-charset', decoded as utf-8",
        "part 2: CharsetMismatchDefect: bytes invalid in charset 'utf-8', decoded as windows-1252",
    )


def test_header_line_without_colon_is_skipped_not_fatal() -> None:
    parsed = parse(load("malformed-header-no-colon.eml"))
    assert parsed.headers == (
        ("From", "Eve <eve@example.com>"),
        ("To", "frank@example.com"),
        ("Subject", "Still parsed"),
        ("Date", "Sat, 25 Oct 2025 12:00:00 +0000"),
        ("Message-ID", "<nocolon-1@example.com>"),
    )
    assert parsed.text == Body(content="Body after a broken header line.\n", charset="us-ascii")
    assert parsed.defects == (
        "message: MalformedHeaderLineDefect: skipped 'This line has no colon\\n'",
    )


def test_multipart_without_boundary_is_shown_as_text() -> None:
    parsed = parse(load("malformed-no-boundary-param.eml"))
    assert parsed.text == Body(
        content="--lost\nContent-Type: text/plain\n\nParts that cannot be split.\n--lost--\n",
        charset="us-ascii",
    )
    assert parsed.attachments == ()
    assert parsed.defects == (
        "message: NoBoundaryInMultipartDefect",
        "message: MultipartInvariantViolationDefect",
    )


def test_empty_body() -> None:
    parsed = parse(load("empty-body.eml"))
    assert parsed.text == Body(content="", charset="utf-8")
    assert parsed.html is None
    assert parsed.attachments == ()
    assert parsed.defects == ()


def test_lines_starting_with_a_dot_are_kept() -> None:
    parsed = parse(load("dot-lines.eml"))
    assert parsed.text == Body(
        content=".\n..\n.hidden file\n...three dots\nNormal line\n.\n", charset="us-ascii"
    )


def test_eight_bit_message_without_mime_headers() -> None:
    parsed = parse(load("eight-bit-no-mime.eml"))
    assert parsed.text == Body(content="Übermäßig schön, ohne MIME-Kopfzeilen.\n", charset="utf-8")
    assert dict(parsed.headers)["Subject"] == "Grüße ohne MIME"
    assert parsed.defects == (
        "message: UndeclaredCharsetDefect: 8-bit text without a charset, decoded as utf-8",
    )


def test_message_without_headers() -> None:
    parsed = parse(load("no-headers.eml"))
    assert parsed.headers == ()
    assert parsed.text == Body(
        content="Just a line of text, no headers at all.\nAnd a second line.\n",
        charset="us-ascii",
    )
    assert parsed.defects == ("message: MissingHeaderBodySeparatorDefect",)


def test_crlf_and_lf_line_endings_read_the_same() -> None:
    lf, crlf = load("plain-lf.eml"), load("plain-crlf.eml")
    assert crlf == lf.replace(b"\n", b"\r\n")
    assert summarize(crlf) == summarize(lf)
    assert parse(crlf) == parse(lf)
    assert parse(lf).text == Body(
        content="First line.\nSecond line.\n\nLast line after an empty one.\n",
        charset="us-ascii",
    )


def test_whole_message_as_one_attachment() -> None:
    raw = load("single-part-pdf.eml")
    parsed = parse(raw)
    assert parsed.text is None
    assert parsed.html is None
    assert attachment(raw, 0).data == PDF
    assert attachment(raw, 0).filename == "invoice.pdf"

    raw = load("text-attachment-only.eml")
    parsed = parse(raw)
    assert parsed.text is None  # a text part marked attachment is not the body
    assert attachment(raw, 0).data == b"Read me.\n"
    assert attachment(raw, 0).filename == "readme.txt"


def test_forwarded_message_is_an_attachment_not_the_body() -> None:
    raw = load("forwarded.eml")
    parsed = parse(raw)
    assert parsed.text == Body(content="See the forwarded message.", charset="us-ascii")
    assert [a.content_type for a in parsed.attachments] == ["message/rfc822"]
    forwarded = attachment(raw, 0).data
    assert forwarded == (
        b"From: Original Author <author@example.com>\nTo: fwd@example.com\n"
        b"Subject: Original\nMessage-ID: <orig-1@example.com>\n\nThis is the original body."
    )
    assert summarize(forwarded).subject == "Original"


def test_inline_image_of_html_body_carries_its_content_id() -> None:
    raw = load("related-inline-image.eml")
    parsed = parse(raw)
    assert parsed.text is None
    assert parsed.html == Body(content='<p>Logo: <img src="cid:pixel"></p>', charset="us-ascii")
    assert parsed.attachments == (
        AttachmentInfo(
            index=0,
            filename=None,
            content_type="image/png",
            size=len(PNG),
            content_id="pixel",
            disposition=None,
        ),
    )


# --- Summary details ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Tue, 14 Oct 2025 09:30:00 +0200", utc(2025, 10, 14, 7, 30)),
        ("14 Oct 2025 09:30:00 +0530", utc(2025, 10, 14, 4, 0)),
        ("Tue, 14 Oct 2025 09:30:00 -0000", utc(2025, 10, 14, 9, 30)),  # zone unknown
        ("Tue, 14 Oct 25 09:30:00 GMT", utc(2025, 10, 14, 9, 30)),  # obsolete 2-digit year
        ("Tue, 14 Oct 2025 09:30:00 EST", utc(2025, 10, 14, 14, 30)),
        ("Tue, 14 Oct 2025\r\n 09:30:00 +0000", utc(2025, 10, 14, 9, 30)),  # folded
        ("", None),
        ("yesterday", None),
        ("Tue, 14 Oct 2025 09:30:00 +9999", None),  # offset out of range
        ("Fri, 31 Dec 9999 23:30:00 -0100", None),  # after year 9999 in UTC
        ("Tue, 99 Foo 2025 99:99:99 +0000", None),
    ],
)
def test_dates(value: str, expected: datetime | None) -> None:
    summary = summarize(msg(f"Date: {value}"))
    assert summary.date == expected
    if summary.date is not None:
        assert summary.date.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # space between encoded words dropped
        ("=?utf-8?q?a?=\r\n =?utf-8?q?b?=", "ab"),  # so is folding
        ("=?utf-8?q?a?= plain =?utf-8?q?b?=", "a plain b"),
        ("=?utf-8?q?caf=C3?= =?utf-8?q?=A9?=", "café"),  # a character split across words
        ("=?utf-8?q?a_b?=", "a b"),  # Q encoding: underscore is a space
        ("=?UTF-8*en?Q?hello?=", "hello"),  # RFC 2231 language suffix
        ("=?utf-8?b?w6k?=", "é"),  # missing base64 padding is repaired
        ("=?utf-8?b?QUJDR?= x", "=?utf-8?b?QUJDR?= x"),  # undecodable: kept as written
        ("=?iso-8859-1?q?a=E9?= =?utf-8?q?=C3=A9?=", "aéé"),  # charsets change mid-value
        ("=?utf-8?q?line=0D=0Abreak?=", "line  break"),  # no line breaks survive decoding
        ("prefix=?utf-8?q?=C3=A9?=", "prefixé"),  # not space-separated: decoded anyway
        ("  spaced  ", "spaced"),
        ("", ""),
    ],
)
def test_encoded_word_subjects(value: str, expected: str) -> None:
    assert summarize(msg(f"Subject: {value}")).subject == expected


def test_raw_eight_bit_headers_utf8_or_windows_1252() -> None:
    raw = b"Subject: caf\xc3\xa9\nFrom: Ren\xe9 <rene@example.com>\n\nbody\n"
    assert summarize(raw).subject == "café"
    assert summarize(raw).from_ == "René <rene@example.com>"
    parsed = parse(raw)
    assert parsed.headers == (("Subject", "café"), ("From", "René <rene@example.com>"))
    assert parsed.defects == (
        "message: NonUtf8HeaderDefect: From: 8-bit bytes read as windows-1252",
    )


def test_addresses() -> None:
    summary = summarize(
        msg(
            "From: a@example.com, B <b@example.com>",
            'To: "Quote \\" inside" <q@example.com>, J. Doe <jd@example.com>',
            "To: second@example.com",
            "Cc: undisclosed-recipients:;",
        )
    )
    assert summary.from_ == "a@example.com, B <b@example.com>"
    # Several To fields are all read; names that need it are quoted again.
    assert summary.to == (
        '"Quote \\" inside" <q@example.com>',
        '"J. Doe" <jd@example.com>',
        "second@example.com",
    )
    assert summary.cc == ()


def test_message_id_forms() -> None:
    assert summarize(msg("Message-ID:  <a@b> (comment)")).message_id == "<a@b>"
    assert summarize(msg("Message-ID:\r\n <folded@b>")).message_id == "<folded@b>"
    assert summarize(msg("Message-ID: ")).message_id is None
    assert summarize(msg("Subject: none")).message_id is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["Content-Type: multipart/mixed; boundary=x"], True),
        (['Content-Type: Multipart/Mixed;\r\n boundary="x"'], True),
        (["Content-Type: multipart/mixed; boundary*0=x"], True),
        (["Content-Type: multipart/report; report-type=delivery-status; boundary=x"], True),
        (["Content-Type: multipart/mixed"], False),  # no boundary: shown as text
        (["Content-Type: multipart/alternative; boundary=x"], False),
        (["Content-Type: multipart/related; boundary=x"], False),
        (["Content-Type: multipart/signed; boundary=x"], False),
        (["Content-Type: application/pdf"], True),
        (["Content-Type: image/png", "Content-Disposition: inline"], True),
        (["Content-Type: message/rfc822"], True),
        (["Content-Type: text/calendar; method=REQUEST"], True),
        (["Content-Type: text/plain; charset=utf-8"], False),
        (["Content-Type: text/html (comment); charset=utf-8"], False),
        (['Content-Type: text/plain; name="a.txt"'], True),
        (["Content-Type: text/plain", "Content-Disposition: inline; filename=a.txt"], True),
        (["Content-Type: text/html", "Content-Disposition: attachment"], True),
        (["Content-Type: garbage"], False),  # read as text/plain, like the email package
        (["Subject: no content type"], False),
    ],
)
def test_has_attachments_hint(headers: list[str], expected: bool) -> None:
    raw = msg(*headers, body="body\n")
    assert summarize(raw).has_attachments is expected


def test_summary_reads_headers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # The MIME parser is never used at ingest: summarize works with it broken.
    class Broken:
        def parsebytes(self, data: bytes, headersonly: bool = False) -> None:
            raise AssertionError("summarize must not parse MIME")

    monkeypatch.setattr(parse_module, "_PARSER", Broken())
    raw = msg("Subject: real", body="Subject: fake\n\nmore\n")
    assert summarize(raw).subject == "real"


def test_summary_header_section_rules() -> None:
    raw = (
        b"From sender@example.com Mon Jan  1 00:00:00 2025\n"  # mbox envelope line
        b" continuation without a field\n"  # ignored, as by the email package
        b"Subject: after the envelope\n"
        b"To: a@example.com\n"
        b"this ends the headers\n"  # not followed by a field: the body starts here
        b"second body line\n"
        b"Cc: not-a-header@example.com\n"
    )
    summary = summarize(raw)
    assert summary.subject == "after the envelope"
    assert summary.to == ("a@example.com",)
    assert summary.cc == ()
    parsed = parse(raw)
    assert parsed.headers == (("Subject", "after the envelope"), ("To", "a@example.com"))
    assert parsed.text == Body(
        content="this ends the headers\nsecond body line\nCc: not-a-header@example.com\n",
        charset="us-ascii",
    )


def test_lone_cr_line_endings() -> None:
    raw = b"Subject: old mac\rTo: a@example.com\r\rline one\rline two\r"
    assert summarize(raw).subject == "old mac"
    assert summarize(raw).to == ("a@example.com",)
    assert parse(raw).text == Body(content="line one\nline two\n", charset="us-ascii")


def test_summary_limits() -> None:
    many = [f"X-Filler-{n}: {n}" for n in range(MAX_HEADERS)]
    assert summarize(msg(*many, "Subject: too late")).subject is None
    assert summarize(msg(*many[:-1], "Subject: just in time")).subject == "just in time"

    padding = "X-Pad: " + "a" * MAX_HEADER_BYTES
    assert summarize(msg(padding, "Subject: beyond the scan")).subject is None
    assert summarize(msg("Subject: before the padding", padding)).subject == ("before the padding")


def test_summary_encodes_with_from_as_the_json_key() -> None:
    summary = summarize(load("alternative.eml"))
    decoded = msgspec.json.decode(msgspec.json.encode(summary))
    assert decoded["from"] == "Alice Example <alice@example.com>"
    assert decoded["date"] == "2025-10-14T07:30:00Z"
    assert msgspec.json.decode(msgspec.json.encode(summary), type=MessageSummary) == summary


# --- Full parse details -------------------------------------------------------------


def multipart(*parts: str, subtype: str = "mixed", boundary: str = "b") -> bytes:
    body = "".join(f"--{boundary}\n{part}\n" for part in parts) + f"--{boundary}--\n"
    return msg(f"Content-Type: multipart/{subtype}; boundary={boundary}", body=body)


def test_body_selection_rules() -> None:
    raw = multipart(
        "Content-Type: text/plain\n\nfirst",
        "Content-Type: image/png\nContent-Disposition: inline\n\nimage",
        "Content-Type: text/plain\n\nsecond",  # only the first text/plain is the body
        'Content-Type: text/plain; name="named.txt"\n\nnamed',  # a filename: attachment
        "Content-Type: text/html\nContent-Disposition: attachment\n\n<p>file</p>",
        "Content-Type: text/html\n\n<p>body</p>",
    )
    parsed = parse(raw)
    assert parsed.text == Body(content="first", charset="us-ascii")
    assert parsed.html == Body(content="<p>body</p>", charset="us-ascii")
    assert [(a.index, a.content_type, a.filename) for a in parsed.attachments] == [
        (0, "image/png", None),
        (1, "text/plain", None),
        (2, "text/plain", "named.txt"),
        (3, "text/html", None),
    ]
    assert attachment(raw, 1).data == b"second"
    assert attachment(raw, 3).data == b"<p>file</p>"


def test_charset_supersets_and_mismatches() -> None:
    # Latin-1 labelled text holding windows-1252 quotes: decoded as meant, no defect.
    latin = parse(msg("Content-Type: text/plain; charset=ISO-8859-1") + b"\x93hi\x94")
    assert latin.text == Body(content="\u201chi\u201d", charset="iso-8859-1")
    assert latin.defects == ()
    # us-ascii declared but UTF-8 sent.
    ascii_ = parse(msg("Content-Type: text/plain; charset=us-ascii", body="café"))
    assert ascii_.text == Body(content="café", charset="utf-8")
    assert ascii_.defects == (
        "message: CharsetMismatchDefect: bytes invalid in charset 'us-ascii', decoded as utf-8",
    )
    # A byte-order mark is not content.
    bom = parse(msg("Content-Type: text/plain; charset=utf-8", body="\ufeffhello"))
    assert bom.text == Body(content="hello", charset="utf-8")
    # Codecs that are no mail charset are refused.
    escape = parse(msg("Content-Type: text/plain; charset=unicode_escape", body="\\u0041"))
    assert escape.text == Body(content="\\u0041", charset="utf-8")
    assert escape.defects[0].startswith("message: UnknownCharsetDefect")


def test_html_charset_from_meta_when_no_parameter() -> None:
    html = b'<html><head><meta charset="iso-8859-2"></head><body>\xb1</body></html>'
    raw = msg("Content-Type: text/html") + html
    parsed = parse(raw)
    assert parsed.html is not None
    assert parsed.html.charset == "iso-8859-2"
    assert "<body>ą</body>" in parsed.html.content


@pytest.mark.parametrize(
    ("encoding", "payload", "expected", "defects"),
    [
        ("Base64 (checked)", "QUJD", b"ABC", ()),  # case, comment and spacing tolerated
        ("base64", "QQ==QQ==", b"AA", ()),  # concatenated encodings
        ("base64", "QUJDR", b"ABC", ("part 1: InvalidBase64LengthDefect",)),
        ("base64", "QUJD=", b"ABC", ("part 1: InvalidBase64PaddingDefect",)),
        ("quoted-printable", "a=3Db=\nc=ZZ", b"a=bc=ZZ", ()),  # bad escapes kept as is
        ("x-uuencode", "begin 644 f\n#86)C\n`\nend", b"abc", ()),
        ("x-rot13", "nop", b"nop", ("part 1: UnknownTransferEncodingDefect: x-rot13",)),
    ],
)
def test_transfer_encodings(
    encoding: str, payload: str, expected: bytes, defects: tuple[str, ...]
) -> None:
    raw = multipart(
        f"Content-Type: application/octet-stream\nContent-Transfer-Encoding: {encoding}\n\n"
        f"{payload}"
    )
    assert attachment(raw, 0).data == expected
    assert parse(raw).defects == defects


def test_eight_bit_inside_quoted_printable_keeps_its_bytes() -> None:
    raw = (
        msg(
            "Content-Type: text/plain; charset=koi8-r",
            "Content-Transfer-Encoding: quoted-printable",
        )
        + b"\xf0\xd2=C9\xd7\xc5\xd4=\n!\n"
    )
    assert parse(raw).text == Body(content="Привет!\n", charset="koi8-r")


def test_unreadable_content_type_is_binary() -> None:
    raw = b"Content-Type: te\xffxt/plain\n\nbody\n"
    parsed = parse(raw)
    assert parsed.text is None
    assert [a.content_type for a in parsed.attachments] == ["application/octet-stream"]
    assert attachment(raw, 0).data == b"body\n"


def test_deep_nesting_degrades_to_text() -> None:
    depth = 3000  # beyond the email package's recursion budget
    pieces = [b"Subject: deep\nContent-Type: multipart/mixed; boundary=b0\n\n"]
    pieces += [
        b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (n, n + 1) for n in range(depth)
    ]
    pieces.append(b"--b%d\nContent-Type: text/plain\n\nleaf\n" % depth)
    raw = b"".join(pieces)
    parsed = parse(raw)
    assert dict(parsed.headers)["Subject"] == "deep"
    assert parsed.text is not None
    assert parsed.text.content.endswith("\n\nleaf\n")
    assert parsed.defects == ("message: ParserFailureDefect: RecursionError, body shown as text",)
    msgspec.json.encode(parsed)


def test_part_header_and_defect_limits() -> None:
    raw = multipart(*["Content-Type: application/octet-stream\n\nx"] * (MAX_PARTS + 50))
    parsed = parse(raw)
    assert len(parsed.attachments) == MAX_PARTS - 1  # the container counts as a part
    assert parsed.defects == (f"message: TooManyPartsDefect: only {MAX_PARTS} parts read",)

    raw = msg(*[f"X-Filler-{n}: {n}" for n in range(MAX_HEADERS + 5)])
    parsed = parse(raw)
    assert len(parsed.headers) == MAX_HEADERS
    assert parsed.defects == (f"message: TooManyHeadersDefect: only {MAX_HEADERS} listed",)

    raw = multipart(*["Content-Transfer-Encoding: base64\n\nQUJDR"] * (MAX_DEFECTS + 7))
    parsed = parse(raw)
    assert len(parsed.defects) == MAX_DEFECTS + 1
    assert parsed.defects[-1] == "message: TooManyDefects: 7 more not listed"


def test_parsed_message_encodes_to_json() -> None:
    parsed = parse(load("nested-related.eml"))
    decoded = msgspec.json.decode(msgspec.json.encode(parsed), type=ParsedMessage)
    assert decoded == parsed


def test_attachment_not_found() -> None:
    raw = load("attachments.eml")
    for index in (-1, 2, 10**6):
        with pytest.raises(AttachmentNotFound) as caught:
            attachment(raw, index)
        assert isinstance(caught.value, KeyError)
        assert caught.value.index == index
        assert caught.value.count == 2
        assert str(caught.value) == f"no attachment {index}: the message has 2"


def test_last_resort_guards(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(raw: bytes) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(parse_module, "_summarize", explode)
    monkeypatch.setattr(parse_module, "_parse", explode)
    monkeypatch.setattr(parse_module, "_load", explode)
    assert summarize(b"Subject: x\n\n") == MessageSummary()
    assert parse(b"Subject: x\n\n").defects == ("message: InternalError: RuntimeError",)
    with pytest.raises(AttachmentNotFound):
        attachment(b"Subject: x\n\n", 0)


# --- safe_content_disposition -------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("report.pdf", "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"),
        (
            "€ rapport détaillé.pdf",
            'attachment; filename="_ rapport detaille.pdf"; '
            "filename*=UTF-8''%E2%82%AC%20rapport%20d%C3%A9taill%C3%A9.pdf",
        ),
        ("../../etc/passwd", "attachment; filename=\"passwd\"; filename*=UTF-8''passwd"),
        ("..\\..\\win.ini", "attachment; filename=\"win.ini\"; filename*=UTF-8''win.ini"),
        (
            "a\r\nSet-Cookie: x=y.txt",
            'attachment; filename="aSet-Cookie_ x=y.txt"; '
            "filename*=UTF-8''aSet-Cookie_%20x%3Dy.txt",
        ),
        ('say "hi".txt', "attachment; filename=\"say _hi_.txt\"; filename*=UTF-8''say%20_hi_.txt"),
        (
            "invoice\u202egpj.exe",
            "attachment; filename=\"invoicegpj.exe\"; filename*=UTF-8''invoicegpj.exe",
        ),
        (".bashrc", "attachment; filename=\"bashrc\"; filename*=UTF-8''bashrc"),
        ("file.txt. ", "attachment; filename=\"file.txt\"; filename*=UTF-8''file.txt"),
        ("100%.txt", "attachment; filename=\"100_.txt\"; filename*=UTF-8''100%25.txt"),
        (
            "..\uff0f..\uff0fetc",  # fullwidth solidus: NFKD would make it a real "/"
            "attachment; filename=\"_.._etc\"; filename*=UTF-8''%EF%BC%8F..%EF%BC%8Fetc",
        ),
        ("\u3000\xa0x\xa0", "attachment; filename=\"x\"; filename*=UTF-8''x"),
        (None, "attachment"),
        ("", "attachment"),
        ("../", "attachment"),
        ("\x00\x01", "attachment"),
    ],
)
def test_safe_content_disposition(filename: str | None, expected: str) -> None:
    assert safe_content_disposition(filename) == expected


def test_safe_content_disposition_inline_and_invalid() -> None:
    assert safe_content_disposition("a.png", "inline") == (
        "inline; filename=\"a.png\"; filename*=UTF-8''a.png"
    )
    with pytest.raises(ValueError, match="disposition"):
        safe_content_disposition("a.png", "attachment\r\nX-Evil: 1")


def test_safe_content_disposition_shortens_keeping_the_extension() -> None:
    fallback, name = read_filenames(safe_content_disposition("é" * 300 + ".pdf"))
    assert name == "é" * ((MAX_FILENAME_BYTES - 4) // 2) + ".pdf"
    assert fallback == "e" * ((MAX_FILENAME_BYTES - 4) // 2) + ".pdf"


def read_filenames(value: str) -> tuple[str | None, str | None]:
    """The ASCII ``filename`` and the RFC 2231 ``filename*`` a standard MIME reader gets."""
    message = email.message.Message()
    message["Content-Disposition"] = value
    fallback = name = None
    for key, item in (message.get_params(header="content-disposition") or [])[1:]:
        assert key == "filename"
        if isinstance(item, tuple):
            name = email.utils.collapse_rfc2231_value(item)
        else:
            fallback = item
    return fallback, name


@given(st.text(max_size=300))
@settings(deadline=None, max_examples=300)
def test_safe_content_disposition_is_always_safe(filename: str) -> None:
    value = safe_content_disposition(filename)
    assert value.isascii()
    assert all(" " <= character <= "~" for character in value)  # no CR, LF, controls
    fallback, name = read_filenames(value)
    if name is None:
        assert value == "attachment"
        assert fallback is None
        return
    for offered in (fallback, name):
        assert offered
        assert "/" not in offered and "\\" not in offered
        assert offered[0] not in ". " and offered[-1] not in ". "
        assert len(offered.encode()) <= MAX_FILENAME_BYTES
        assert not any(unicodedata.category(character) == "Cc" for character in offered)
    # The fallback is exactly one quoted string: nothing in it ends the quotes early.
    assert value == (
        f'attachment; filename="{fallback}"; '
        f"filename*=UTF-8''{urllib.parse.quote(name, safe='!#$&+-.^_`|~')}"
    )


# --- Properties: never raise, always consistent -------------------------------------


def check_summary(summary: MessageSummary) -> None:
    assert isinstance(summary, MessageSummary)
    texts = [summary.from_, summary.subject, summary.message_id, *summary.to, *summary.cc]
    for text in texts:
        if text is not None:
            assert "\r" not in text and "\n" not in text
    if summary.date is not None:
        assert summary.date.utcoffset() == timedelta(0)
    msgspec.json.encode(summary)  # every string is valid Unicode (no lone surrogates)


def check_parsed(raw: bytes, parsed: ParsedMessage) -> None:
    msgspec.json.encode(parsed)
    assert not [defect for defect in parsed.defects if "InternalError" in defect]
    assert len(parsed.defects) <= MAX_DEFECTS + 1
    for _, value in parsed.headers:
        assert "\r" not in value and "\n" not in value
    for body in (parsed.text, parsed.html):
        if body is not None:
            assert "\r" not in body.content
    assert [info.index for info in parsed.attachments] == list(range(len(parsed.attachments)))
    for info in parsed.attachments:
        fetched = attachment(raw, info.index)
        assert (fetched.filename, fetched.content_type, fetched.size) == (
            info.filename,
            info.content_type,
            info.size,
        )
    with pytest.raises(AttachmentNotFound):
        attachment(raw, len(parsed.attachments))


PROPERTY_SETTINGS = settings(
    deadline=None,  # no timing assertions; the CI machine may be slow
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)


@given(st.binary(max_size=2048))
@PROPERTY_SETTINGS
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    check_summary(parse_module._summarize(raw))  # the unguarded function
    check_parsed(raw, parse(raw))


FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b":",
    b"--b",
    b"--b--",
    b"From ",
    b"Subject: =?utf-8?q?caf=C3=A9?=\n",
    b"=?koi8-r?b?8NLJ18XU?=",
    b"=?x-bogus?q?=FF?=",
    b"Content-Type: multipart/mixed; boundary=b\n",
    b"Content-Type: multipart/alternative; boundary=b\n",
    b"Content-Type: message/rfc822\n",
    b"Content-Type: text/plain; charset=iso-2022-jp\n",
    b"Content-Type: text/html; charset=utf-7\n",
    b"Content-Transfer-Encoding: base64\n",
    b"Content-Transfer-Encoding: quoted-printable\n",
    b"Content-Transfer-Encoding: x-uuencode\n",
    b"Content-Disposition: attachment; filename*0*=utf-8''%E2%82; filename*1*=%AC\n",
    b"Content-ID: <x@y>\n",
    b"Date: Tue, 14 Oct 2025 09:30:00 +0200\n",
    b'To: =?utf-8?b?w4k=?= <a@b>, "x, y" <c@d>\n',
    b"\xff\xfe\x00",
    b"+2D0-",
]


@st.composite
def mutated_corpus_message(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([load(name) for name in CORPUS])))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        position = draw(st.integers(min_value=0, max_value=len(data)))
        operation = draw(st.sampled_from(["flip", "delete", "insert", "fragment", "truncate"]))
        if operation == "flip" and position < len(data):
            data[position] ^= draw(st.integers(min_value=1, max_value=255))
        elif operation == "delete":
            del data[position : position + draw(st.integers(min_value=1, max_value=40))]
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=20))
        elif operation == "fragment":
            data[position:position] = draw(st.sampled_from(FRAGMENTS))
        elif operation == "truncate":
            del data[position:]
    return bytes(data)


@given(mutated_corpus_message())
@PROPERTY_SETTINGS
def test_mutated_corpus_messages_never_raise(raw: bytes) -> None:
    check_summary(parse_module._summarize(raw))
    check_parsed(raw, parse(raw))


@given(st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=8), max_size=40))
@PROPERTY_SETTINGS
def test_messages_built_from_mime_fragments_never_raise(pieces: list[bytes]) -> None:
    raw = b"".join(pieces)
    check_summary(parse_module._summarize(raw))
    check_parsed(raw, parse(raw))


SUBJECT_TEXT = (
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=200)
    .map(str.strip)
    .filter(bool)
)


@given(SUBJECT_TEXT)
@settings(deadline=None, max_examples=300)
def test_encoded_subjects_round_trip(subject: str) -> None:
    encoded = Header(subject, "utf-8").encode()  # folded RFC 2047 words, as senders write
    raw = b"Subject: " + encoded.encode("ascii") + b"\n\nbody\n"
    assert summarize(raw).subject == subject
    assert dict(parse(raw).headers)["Subject"] == subject


@given(SUBJECT_TEXT)
@settings(deadline=None, max_examples=200)
def test_raw_utf8_subjects_read_back(subject: str) -> None:
    raw = b"Subject: " + subject.encode("utf-8") + b"\n\nbody\n"
    assert summarize(raw).subject == subject


def test_base64_helper_matches_stdlib_on_valid_input() -> None:
    data = bytes(range(256)) * 3
    encoded = base64.encodebytes(data)
    assert parse_module._decode_base64(encoded) == (data, [])


# --- Fast paths agree with the general ones -----------------------------------------


def walked_summary_values(raw: bytes) -> dict[bytes, list[bytes]]:
    """Summary fields as the general header walk reads them, unfolded and stripped."""
    values: dict[bytes, list[bytes]] = {}
    for name, lines in parse_module._header_section(raw).fields:
        if name.lower() in parse_module._SUMMARY_FIELDS:
            values.setdefault(name.lower(), []).append(b"".join(lines))
    return unfolded(values)


def unfolded(values: dict[bytes, list[bytes]]) -> dict[bytes, list[bytes]]:
    return {
        key: [re.sub(rb"\r\n|\r|\n", b"", value).strip() for value in found]
        for key, found in values.items()
    }


def test_plain_header_sections_take_the_fast_path() -> None:
    for name in ("alternative.eml", "nested-related.eml", "plain-lf.eml", "plain-crlf.eml"):
        fast = parse_module._clean_summary_values(load(name))
        assert fast is not None
        assert unfolded(fast) == walked_summary_values(load(name))
    for name in ("malformed-header-no-colon.eml", "no-headers.eml"):
        assert parse_module._clean_summary_values(load(name)) is None
    mbox = b"From someone Mon Jan  1 00:00:00 2025\nSubject: x\n\nbody\n"
    assert parse_module._clean_summary_values(mbox) is None
    lone_cr = b"Subject: a\rTo: b@example.com\n\nbody\n"
    assert parse_module._clean_summary_values(lone_cr) is None
    assert summarize(lone_cr).to == ("b@example.com",)


@given(mutated_corpus_message() | st.lists(st.sampled_from(FRAGMENTS)).map(b"".join))
@PROPERTY_SETTINGS
def test_fast_header_path_agrees_with_the_walk(raw: bytes) -> None:
    fast = parse_module._clean_summary_values(raw)
    if fast is not None:
        assert unfolded(fast) == walked_summary_values(raw)


ADDRESS_TEXT = st.text(alphabet='ab .,<>"@\t=?_é-', max_size=40)
ADDRESS_ITEM = st.builds(
    lambda name, local, domain, form: {
        "angle": f"{name} <{local}@{domain}>",
        "quoted": f'"{name}" <{local}@{domain}>',
        "bare": f"{local}@{domain}",
    }[form],
    st.text(alphabet="Ab .é=?_-'", max_size=12),
    st.text(alphabet="ab.+-_", min_size=1, max_size=8),
    st.text(alphabet="ab.-", min_size=1, max_size=8),
    st.sampled_from(["angle", "quoted", "bare"]),
)


@given(ADDRESS_TEXT | st.lists(ADDRESS_ITEM, max_size=4).map(" , ".join))
@settings(deadline=None, max_examples=500)
def test_fast_address_split_agrees_with_getaddresses(text: str) -> None:
    def meaningful(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [pair for pair in pairs if pair != ("", "")]

    assert meaningful(parse_module._address_pairs(text)) == meaningful(
        email.utils.getaddresses([text])
    )
