"""Forwarding a stored message, as a mail client does: attached whole, or inline.

- **Attached** (``message/rfc822``): the caller's own message (body and attachments, as
  :func:`service.mail.compose` builds it) becomes the first part of a ``multipart/mixed``
  whose last part is the original, byte for byte. RFC 2046 (section 5.2.1) allows only
  ``7bit``, ``8bit`` and ``binary`` for such a part, so it is never re-encoded: it is
  declared ``8bit`` when the original has 8-bit bytes (the SMTP session then asks for
  ``BODY=8BITMIME`` and fails the delivery with ``extension_not_supported`` where the
  server lacks it, rather than send it damaged). What SMTP cannot carry unencoded at all,
  a NUL byte (``invalid_body``) or a line over 998 octets (``too_long``), is refused: the
  inline form, which re-encodes the bodies, can forward such a message. Line breaks
  become CRLF (what the SMTP session would send anyway). The boundary is checked against
  the original's bytes.
- **Inline**: the caller's text and html, then a "Forwarded message" block (From, Date,
  Subject, To, Cc of the original) and the original's bodies, html escaped where it is
  header text; the original's attachments are attached again, its inline images with
  their Content-ID when its html is included.

Both set ``References`` to the original's References and its Message-ID, so that the
forward joins the original's thread; a forward is not a reply and has no ``In-Reply-To``.
"""

from __future__ import annotations

import html as html_lib
import mimetypes
import re
from collections.abc import Collection
from dataclasses import dataclass, replace
from email import policy as email_policy
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from html.parser import HTMLParser

from service.domain.ids import random_hex
from service.domain.threads import answer_references
from service.mail import parse as mail_parse
from service.mail.compose import (
    _CONTENT_ID,
    _CONTENT_TYPE,
    MAX_CONTENT_ID_CHARS,
    MAX_FILENAME_CHARS,
    MAX_LINE_OCTETS,
    Attachment,
    ComposedMessage,
)
from service.mail.errors import MailErrorCode, MailInputError
from service.mail.headers import first_forbidden_char

FORWARD_FIELD = "forward_message"
SEPARATOR = "---------- Forwarded message ---------"
MAX_ID_CHARS = 250
DEFAULT_NAME = "forwarded message"
# The header fields of the original shown in the inline block, in this order.
BLOCK_FIELDS = ("From", "Date", "Subject", "To", "Cc")

_FORWARD_PREFIX = re.compile(r"fwd?\s*:", re.IGNORECASE)
_THREAD_ID = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_BODY_CONTENT = re.compile(r"<body[^>]*>(.*?)(?:</body\s*>|\Z)", re.IGNORECASE | re.DOTALL)
_PART_POLICY = email_policy.SMTP.clone(cte_type="7bit")


@dataclass(frozen=True, slots=True)
class ForwardHeaders:
    """What the original says about the forward: its subject, its References, and the
    filename it is attached under."""

    subject: str
    references: str | None
    filename: str


@dataclass(frozen=True, slots=True)
class InlineForward:
    """The bodies and attachments of an inline forward, ready for the composer."""

    text: str
    html: str | None
    attachments: list[Attachment]


def forward_headers(original: bytes) -> ForwardHeaders:
    """The ``Fwd:`` subject and the ``References`` (None: nothing to thread with).

    References: the original's own (or its In-Reply-To), then its Message-ID, trimmed as
    a reply's (:func:`service.domain.threads.answer_references`).
    """
    head = _head(original)
    original_subject = _one_line(str(head.get("Subject") or ""))
    subject = original_subject
    if not _FORWARD_PREFIX.match(subject):
        subject = f"Fwd: {subject}".rstrip()
    ids = answer_references(
        _valid_ids(head.get("References")),
        next(iter(_valid_ids(head.get("In-Reply-To"))), None),
        next(iter(_valid_ids(head.get("Message-ID"))), None),
    )
    return ForwardHeaders(
        subject=subject,
        references=" ".join(ids) or None,
        filename=attachment_name(original_subject),
    )


def attachment_name(subject: str) -> str:
    """The filename of the attached original: its subject (what a saved ``.eml`` is
    called by mail clients), made safe as a filename."""
    name = _safe_name(_one_line(subject)) or DEFAULT_NAME
    return name[: MAX_FILENAME_CHARS - len(".eml")] + ".eml"


def attachable(original: bytes) -> bytes:
    """The original with CRLF line ends, if it can travel unencoded as an rfc822 part.

    :raises MailInputError: ``invalid_body`` (a NUL byte), ``too_long`` (a line over
        998 octets); the inline form can forward such a message.
    """
    if b"\x00" in original:
        raise MailInputError(
            FORWARD_FIELD,
            "the message has NUL bytes and cannot be attached unencoded (message/rfc822);"
            ' forward it with "forward_as": "inline"',
            MailErrorCode.INVALID_BODY,
        )
    data = _LINE_BREAK.sub(b"\r\n", original)
    if max(map(len, data.split(b"\r\n"))) > MAX_LINE_OCTETS:
        raise MailInputError(
            FORWARD_FIELD,
            f"the message has a line over {MAX_LINE_OCTETS} octets, which SMTP cannot carry"
            ' in an attached message (message/rfc822); forward it with "forward_as": "inline"',
            MailErrorCode.TOO_LONG,
        )
    return data


def attach_original(composed: ComposedMessage, original: bytes, filename: str) -> ComposedMessage:
    """``composed`` as ``multipart/mixed`` with ``original`` (from :func:`attachable`) as
    its last part, a ``message/rfc822`` attachment named ``filename``."""
    head, body = composed.data.split(b"\r\n\r\n", 1)
    lines = _fields(head)
    mime = [f for f in lines if f.split(b":", 1)[0].lower().startswith(b"content-")]
    others = [f for f in lines if f not in mime and not f.lower().startswith(b"mime-version:")]
    content = BytesHeaderParser(policy=email_policy.default).parsebytes(b"\r\n".join(mime))
    boundary = _boundary(composed.data, original)
    delimiter = b"--" + boundary
    eight_bit = not original.isascii()
    if content.get_content_type() == "multipart/mixed":
        # Its parts become the outer message's first parts: only the boundary changes
        # (the composer's is random and appears nowhere but in its delimiters).
        old = str(content.get_param("boundary")).encode("ascii")
        end = body.rindex(b"--" + old + b"--")
        parts = body[:end].replace(b"--" + old, delimiter)
    else:
        parts = delimiter + b"\r\n" + b"\r\n".join(mime) + b"\r\n\r\n" + body + b"\r\n"
    outer = [
        *others,
        b"MIME-Version: 1.0",
        b'Content-Type: multipart/mixed;\r\n boundary="' + boundary + b'"',
    ]
    if eight_bit:
        # RFC 2045 section 6.4: a multipart holding 8-bit data is labelled 8bit itself.
        outer.append(b"Content-Transfer-Encoding: 8bit")
    data = (
        b"\r\n".join(outer)
        + b"\r\n\r\n"
        + parts
        + delimiter
        + b"\r\n"
        + _rfc822_headers(filename, eight_bit)
        + b"\r\n"
        + original
        + b"\r\n"
        + delimiter
        + b"--\r\n"
    )
    return replace(composed, data=data)


def inline_forward(
    original: bytes,
    text: str | None,
    html: str | None,
    taken_content_ids: Collection[str] = (),
) -> InlineForward:
    """The caller's ``text``/``html`` followed by the forwarded block and the original's
    bodies, with the original's attachments (read with :mod:`service.mail.parse`);
    ``taken_content_ids``: the caller's own inline parts, which keep theirs."""
    parsed = mail_parse.parse(original)
    block = _block_fields(parsed.headers)
    original_text = parsed.text.content if parsed.text is not None else None
    original_html = parsed.html.content if parsed.html is not None else None
    if original_text is None and original_html is not None:
        original_text = html_to_text(original_html)
    own_text = text if text is not None else (html_to_text(html) if html is not None else "")
    text_block = "".join(f"{name}: {value}\n" for name, value in block)
    new_text = _joined(own_text, f"{SEPARATOR}\n{text_block}\n{original_text or ''}")
    new_html: str | None = None
    if html is not None or original_html is not None:
        own_html = html if html is not None else (_text_as_html(text) if text else "")
        html_block = "".join(f"{name}: {html_lib.escape(value)}<br>\n" for name, value in block)
        shown = (
            _body_content(original_html)
            if original_html is not None
            else _text_as_html(original_text or "")
        )
        forwarded = f'<div class="forwarded">{SEPARATOR}<br>\n{html_block}</div>\n<br>\n{shown}'
        new_html = f"{own_html}\n<br>\n{forwarded}\n" if own_html else f"{forwarded}\n"
    attachments = _attachments(
        original, parsed.attachments, inline=original_html is not None, taken=taken_content_ids
    )
    return InlineForward(text=new_text, html=new_html, attachments=attachments)


def html_to_text(value: str) -> str:
    """The readable text of an html body (no scripts or styles), for the plain part."""
    reader = _TextReader()
    reader.feed(value)
    reader.close()
    lines = [" ".join(line.split()) for line in "".join(reader.chunks).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


class _TextReader(HTMLParser):
    _BREAKS = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "blockquote"})
    _HIDDEN = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BREAKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BREAKS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.chunks.append(data)


def _head(original: bytes) -> Message:
    match = _HEAD_END.search(original)
    head = original[: match.end()] if match else original
    return BytesHeaderParser(policy=email_policy.default).parsebytes(head)


def _valid_ids(value: object) -> list[str]:
    """The msg-ids of a threading header that may be written again in one."""
    found = _THREAD_ID.findall(str(value or ""))
    return [i for i in found if len(i) <= MAX_ID_CHARS and i.isascii() and i.isprintable()]


def _one_line(value: str) -> str:
    """Header text as one printable line (decoded words may hold line breaks)."""
    return " ".join("".join(c if c.isprintable() else " " for c in value).split())


def _safe_name(value: str) -> str:
    name = "".join(
        "_" if c in "/\\" or first_forbidden_char(c) is not None else c for c in value
    ).strip(" .")
    return name[:MAX_FILENAME_CHARS]


def _fields(head: bytes) -> list[bytes]:
    """The header section's fields, each with its folded continuation lines."""
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def _boundary(*texts: bytes) -> bytes:
    while True:
        boundary = f"=_fwd_{random_hex(16)}".encode("ascii")
        if not any(boundary in text for text in texts):  # 128 random bits: once in practice
            return boundary


def _rfc822_headers(filename: str, eight_bit: bool) -> bytes:
    part = EmailMessage(policy=_PART_POLICY)
    part["Content-Type"] = "message/rfc822"
    part.add_header("Content-Disposition", "attachment", filename=filename)
    part["Content-Transfer-Encoding"] = "8bit" if eight_bit else "7bit"
    return b"".join(_PART_POLICY.fold_binary(name, value) for name, value in part.raw_items())


def _block_fields(headers: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for name, value in headers:
        for wanted in BLOCK_FIELDS:
            if name.lower() == wanted.lower() and wanted not in found:
                found[wanted] = _one_line(value)
    return [(name, found[name]) for name in BLOCK_FIELDS if found.get(name)]


def _joined(own: str, forwarded: str) -> str:
    if not own:
        return forwarded
    return f"{own.rstrip(chr(10))}\n\n{forwarded}"


def _text_as_html(value: str) -> str:
    return f'<div style="white-space: pre-wrap">{html_lib.escape(value)}</div>'


def _body_content(value: str) -> str:
    """The inside of an html document's ``<body>`` (all of it when there is none)."""
    match = _BODY_CONTENT.search(value)
    return match.group(1) if match else value


def _attachments(
    original: bytes,
    listed: tuple[mail_parse.AttachmentInfo, ...],
    *,
    inline: bool,
    taken: Collection[str],
) -> list[Attachment]:
    """The original's attachments, in a form the composer accepts: names made safe (or
    made up from the type), types the composer may attach (others as octet-stream), and
    Content-IDs kept for the inline images of an html that is forwarded."""
    found: list[Attachment] = []
    seen: set[str] = set(taken)
    for info in listed:
        item = mail_parse.attachment(original, info.index)
        content_type = item.content_type.lower()
        match = _CONTENT_TYPE.match(content_type)
        if match is None or match.group(1) in ("multipart", "message"):
            content_type = "application/octet-stream"
        extension = ".eml" if item.content_type.lower() == "message/rfc822" else None
        filename = _safe_name(item.filename or "") or _made_up_name(
            info.index, item.content_type, extension
        )
        content_id = item.content_id if inline else None
        if content_id is not None and (
            content_id in seen
            or len(content_id) > MAX_CONTENT_ID_CHARS
            or not _CONTENT_ID.match(content_id)
        ):
            content_id = None
        if content_id is not None:
            seen.add(content_id)
        found.append(
            Attachment(
                filename=filename,
                content_type=content_type,
                data=item.data,
                content_id=content_id,
            )
        )
    return found


def _made_up_name(index: int, content_type: str, extension: str | None) -> str:
    extension = extension or mimetypes.guess_extension(content_type.lower()) or ".bin"
    return f"attachment-{index + 1}{extension}"
