"""Forwarding a stored message (``service.mail.forward`` through ``sending.prepare``): the
bytes as a mail client reads them back, no I/O."""

from __future__ import annotations

import base64
import email
import email.policy
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import msgspec
import pytest

from service.domain.outbox import ForwardAs, SendRequest
from service.domain.threads import MAX_ANSWER_REFERENCES
from service.errors import Invalid, TooLarge
from service.mail import forward
from service.services.sending import (
    SendLimits,
    forward_request,
    prepare,
    request_hash,
)
from service.smtp import prepare_data
from tests.outbox.test_validation import ACCOUNT, LIMITS, NOW

PDF = b"%PDF-1.4 fake\x00\xff" * 20
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
HTML = (
    "<html><head><style>p {color: red}</style></head><body><p>Gr\u00fc\u00dfe, see"
    ' <img src="cid:logo@shop.example"></p></body></html>'
)


def original(*, references: str = "<root@example.org> <mid@example.org>") -> bytes:
    """A message as senders build it: text + html with an inline image, a PDF named in
    UTF-8, an 8-bit text body, a display name that needs escaping in html."""
    return (
        'From: "Bob <the boss> M\u00fcller" <bob@example.org>\r\n'
        "To: Alice <alice@example.com>\r\n"
        "Cc: dave@example.org\r\n"
        "Subject: Bestellung M\u00fcller\r\n"
        "Message-ID: <orig@example.org>\r\n"
        f"References: {references}\r\n"
        "Date: Thu, 01 Jan 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="outer"\r\n'
        "\r\n"
        "--outer\r\n"
        'Content-Type: multipart/alternative; boundary="alt"\r\n'
        "\r\n"
        "--alt\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Gr\u00fc\u00dfe, see the logo.\r\n"
        ".a line with a leading dot\r\n"
        "--alt\r\n"
        'Content-Type: multipart/related; boundary="rel"\r\n'
        "\r\n"
        "--rel\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"{HTML}\r\n"
        "--rel\r\n"
        "Content-Type: image/png\r\n"
        "Content-ID: <logo@shop.example>\r\n"
        "Content-Disposition: inline; filename=logo.png\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
        f"{base64.encodebytes(PNG).decode().replace(chr(10), chr(13) + chr(10))}"
        "--rel--\r\n"
        "--alt--\r\n"
        "--outer\r\n"
        "Content-Type: application/pdf\r\n"
        "Content-Disposition: attachment; filename*=utf-8''Rechnung%20M%C3%BCller.pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
        f"{base64.encodebytes(PDF).decode().replace(chr(10), chr(13) + chr(10))}"
        "--outer--\r\n"
    ).encode()


def forwarded(raw: bytes, limits: SendLimits = LIMITS, **fields: Any) -> bytes:
    values: dict[str, Any] = {"to": ["carol@example.org"], "forward_message": "msg_x"}
    values.update(fields)
    request = forward_request(msgspec.convert(values, SendRequest), raw)
    return prepare(ACCOUNT, request, limits=limits, now=NOW, original=raw).raw


def read(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def content(part: EmailMessage) -> Any:
    """A part's content as a reader shows it (line ends of unencoded text as LF)."""
    value = part.get_content()
    return value.replace("\r\n", "\n") if isinstance(value, str) else value


def rfc822_bytes(data: bytes) -> bytes:
    """The bytes of the top-level message/rfc822 part, cut at its boundary as a reader does."""
    boundary = read(data).get_boundary()
    assert boundary is not None
    delimiter = b"\r\n--" + boundary.encode()
    part = data.split(delimiter)[-2]  # the last part before the closing delimiter
    return part.split(b"\r\n\r\n", 1)[1]


def wire_lines(data: bytes) -> Iterator[bytes]:
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    yield from data.split(b"\r\n")


def test_attached_the_original_is_the_last_part_byte_for_byte() -> None:
    raw = original()
    data = forwarded(raw, text="FYI, see below.\n")
    message = read(data)
    assert message["Subject"] == "Fwd: Bestellung M\u00fcller"
    assert message["References"] == "<root@example.org> <mid@example.org> <orig@example.org>"
    assert message["In-Reply-To"] is None
    assert message.get_content_type() == "multipart/mixed"
    assert message["Content-Transfer-Encoding"] == "8bit"
    body, attached = message.iter_parts()
    assert body.get_content_type() == "text/plain"
    assert content(body) == "FYI, see below.\n"
    assert attached.get_content_type() == "message/rfc822"
    assert attached.get_filename() == "Bestellung M\u00fcller.eml"
    assert attached["Content-Transfer-Encoding"] == "8bit"
    assert rfc822_bytes(data) == raw
    inner = content(attached)
    assert inner["Message-ID"] == "<orig@example.org>"
    pdf = [p for p in inner.walk() if p.get_content_type() == "application/pdf"]
    assert content(pdf[0]) == PDF and pdf[0].get_filename() == "Rechnung M\u00fcller.pdf"
    assert max(map(len, wire_lines(data))) <= 998
    # What the SMTP session sends (dot-stuffed) reads back to the same bytes.
    payload, _ = prepare_data(data)
    assert b"\r\n..a line with a leading dot" in payload


def test_attached_with_own_attachments_and_both_bodies_is_one_flat_mixed() -> None:
    raw = original()
    data = forwarded(
        raw,
        text="Plain",
        html="<p>Rich</p>",
        attachments=[
            {
                "filename": "n\u00f6te.txt",
                "content_type": "text/plain",
                "content_base64": base64.b64encode(b"note").decode(),
            }
        ],
    )
    message = read(data)
    kinds = [p.get_content_type() for p in message.iter_parts()]
    assert kinds == ["multipart/alternative", "text/plain", "message/rfc822"]
    note = next(iter(message.iter_attachments()))
    assert note.get_filename() == "n\u00f6te.txt" and content(note) == "note"
    assert rfc822_bytes(data) == raw
    html = read(data).get_body(preferencelist=("html",))
    assert html is not None and content(html) == "<p>Rich</p>\n"


def test_attached_without_a_body_and_with_an_ascii_original() -> None:
    raw = b"From: bob@example.org\r\nSubject: Fwd: plain\r\nMessage-ID: <a@b.example>\r\n\r\nhi\r\n"
    data = forwarded(raw)
    message = read(data)
    assert message["Subject"] == "Fwd: plain"
    assert message["References"] == "<a@b.example>"
    assert message["Content-Transfer-Encoding"] is None
    body, attached = message.iter_parts()
    assert content(body).strip() == ""
    assert attached["Content-Transfer-Encoding"] == "7bit"
    assert attached.get_filename() == "Fwd: plain.eml"
    assert rfc822_bytes(data) == raw


def test_the_boundary_never_occurs_in_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = "0" * 32
    raw = f"From: bob@example.org\r\nSubject: x\r\n\r\n--=_fwd_{taken}\r\n".encode()
    values = iter([taken, "1" * 32])
    monkeypatch.setattr(forward, "random_hex", lambda _: next(values))
    data = forwarded(raw, text="x")
    assert read(data).get_boundary() == "=_fwd_" + "1" * 32
    assert rfc822_bytes(data) == raw


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Order", "Fwd: Order"),
        ("Fwd: Order", "Fwd: Order"),
        ("FW: Order", "FW: Order"),
        ("fwd:Order", "fwd:Order"),
        ("", "Fwd:"),
        ("=?utf-8?q?line=0Abreak?=", "Fwd: line break"),
    ],
)
def test_subject(subject: str, expected: str) -> None:
    raw = f"From: bob@example.org\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()
    assert read(forwarded(raw))["Subject"] == expected


def test_given_subject_and_references_win() -> None:
    data = forwarded(original(), subject="Mine", headers={"References": "<own@example.com>"})
    message = read(data)
    assert message["Subject"] == "Mine"
    assert message["References"] == "<own@example.com>"


def test_references_keep_the_root_when_trimmed() -> None:
    ids = [f"<r{i}@example.org>" for i in range(30)]
    message = read(forwarded(original(references=" ".join(ids))))
    kept = message["References"].split()
    assert len(kept) == MAX_ANSWER_REFERENCES
    assert kept[0] == "<r0@example.org>"
    assert kept[-1] == "<orig@example.org>"
    assert kept[1:-1] == ids[-(MAX_ANSWER_REFERENCES - 2) :]


def test_inline_quotes_the_original_and_attaches_its_attachments() -> None:
    data = forwarded(original(), forward_as="inline", text="See below.")
    message = read(data)
    assert message["References"].endswith("<orig@example.org>")
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    plain = content(text)
    assert plain.startswith("See below.\n\n---------- Forwarded message ---------\n")
    assert 'From: "Bob <the boss> M\u00fcller" <bob@example.org>\n' in plain
    assert "Date: Thu, 01 Jan 2026 10:00:00 +0000\n" in plain
    assert "Subject: Bestellung M\u00fcller\n" in plain
    assert "To: Alice <alice@example.com>\nCc: dave@example.org\n" in plain
    assert plain.endswith("Gr\u00fc\u00dfe, see the logo.\n.a line with a leading dot\n")
    markup = content(html)
    assert '<div style="white-space: pre-wrap">See below.</div>' in markup
    assert "From: &quot;Bob &lt;the boss&gt; M\u00fcller&quot; &lt;bob@example.org&gt;" in markup
    assert '<img src="cid:logo@shop.example">' in markup
    assert "<html>" not in markup and "<style>" not in markup
    # The image travels with the html in multipart/related, under its Content-ID.
    [image] = [p for p in message.walk() if p.get_content_type() == "image/png"]
    assert image["Content-ID"] == "<logo@shop.example>" and content(image) == PNG
    [pdf] = [p for p in message.iter_attachments() if p.get_content_type() == "application/pdf"]
    assert pdf.get_filename() == "Rechnung M\u00fcller.pdf" and content(pdf) == PDF
    # All re-encoded: 7-bit on the wire.
    assert data.isascii()


def test_inline_from_a_text_only_original_with_an_unnamed_attachment() -> None:
    raw = (
        b"From: bob@example.org\r\nSubject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n"
        b"\r\n--b\r\nContent-Type: text/plain\r\n\r\n<b>not html</b>\r\n--b\r\n"
        b"Content-Type: message/rfc822\r\n\r\nFrom: c@example.org\r\n\r\ninner\r\n--b--\r\n"
    )
    message = read(forwarded(raw, forward_as="inline", html="<p>Mine</p>"))
    html = message.get_body(preferencelist=("html",))
    assert html is not None
    assert "<p>Mine</p>" in content(html)
    assert "&lt;b&gt;not html&lt;/b&gt;" in content(html)
    [attached] = list(message.iter_attachments())
    assert attached.get_filename() == "attachment-1.eml"
    assert attached.get_content_type() == "application/octet-stream"


def test_what_smtp_cannot_carry_unencoded_is_refused_attached_and_sent_inline() -> None:
    long_line = b"From: bob@example.org\r\nSubject: x\r\n\r\n" + b"y" * 1200 + b"\r\n"
    with pytest.raises(Invalid) as caught:
        forwarded(long_line)
    assert caught.value.code == "too_long"
    assert caught.value.errors[0].field == "forward_message"
    with pytest.raises(Invalid) as caught:
        forwarded(b"From: bob@example.org\r\n\r\nnul\x00\r\n")
    assert caught.value.code == "invalid_body"
    inline = read(forwarded(long_line, forward_as="inline"))
    assert content(inline).endswith("y" * 1200 + "\n")


def test_bare_line_breaks_become_crlf_in_the_attached_original() -> None:
    raw = b"From: bob@example.org\nSubject: x\n\nline\rnext\n"
    data = forwarded(raw)
    assert rfc822_bytes(data) == b"From: bob@example.org\r\nSubject: x\r\n\r\nline\r\nnext\r\n"
    list(wire_lines(data))


def test_the_original_counts_towards_the_send_limit() -> None:
    raw = original()
    small = SendLimits(
        max_recipients=10,
        max_attachment_bytes=1 << 20,
        max_send_bytes=len(raw) - 1,
        max_message_age_s=3600,
    )
    for mode in ("attachment", "inline"):
        with pytest.raises(TooLarge) as caught:
            forwarded(raw, small, forward_as=mode)
        assert caught.value.code == "message_too_large"


def test_a_forward_needs_recipients() -> None:
    with pytest.raises(Invalid) as caught:
        forwarded(original(), to=[])
    assert caught.value.code == "no_recipients"


def test_the_request_hash_covers_the_forward_fields() -> None:
    plain = msgspec.convert({"to": ["a@example.org"], "subject": "s", "text": "t"}, SendRequest)
    forward_one = msgspec.structs.replace(plain, forward_message="msg_1")
    inline = msgspec.structs.replace(forward_one, forward_as=ForwardAs.INLINE)
    attached = msgspec.structs.replace(forward_one, forward_as=ForwardAs.ATTACHMENT)
    hashes = {request_hash(r) for r in (plain, forward_one, inline, attached)}
    assert len(hashes) == 4


def test_inline_the_callers_own_content_id_wins_over_the_originals() -> None:
    own = {
        "filename": "mine.png",
        "content_type": "image/png",
        "content_base64": base64.b64encode(b"mine").decode(),
        "content_id": "logo@shop.example",
    }
    message = read(
        forwarded(
            original(),
            forward_as="inline",
            html='<img src="cid:logo@shop.example">',
            attachments=[own],
        )
    )
    images = [p for p in message.walk() if p.get_content_type() == "image/png"]
    by_name = {p.get_filename(): p["Content-ID"] for p in images}
    assert by_name == {"mine.png": "<logo@shop.example>", "logo.png": None}
