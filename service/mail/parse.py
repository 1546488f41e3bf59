"""Reading retrieved messages: a fast summary at ingest, the full MIME view on demand.

Entry points (pure functions over the raw bytes as stored, no I/O):

- :func:`summarize` reads only the header section: From, To, Cc, Subject, Date,
  Message-ID, In-Reply-To, References and a header-only ``has_attachments`` hint. It is
  what ingest pays per message, so it never builds a MIME tree.
- :func:`parse` walks the whole MIME tree with the stdlib ``email`` package (``compat32``
  policy, which tolerates malformed input and keeps raw 8-bit bytes recoverable) and
  returns the headers, the text and HTML bodies decoded to Unicode, the attachment list
  and the defects found.
- :func:`attachment` returns one attachment's decoded bytes, numbered exactly as in
  :func:`parse`.
- :func:`safe_content_disposition` builds a ``Content-Disposition`` value for serving an
  attachment whose filename came from a stranger.

Nothing here raises on malformed mail: problems become ``None``/empty summary fields and,
in the parsed view, ``defects``: strings ``"<where>: <DefectName>[: detail]"`` where
``where`` is ``message`` or an IMAP-style part number (``part 1.2``) and the name is the
``email`` package's defect class or one of ours (``UnknownCharsetDefect``,
``CharsetMismatchDefect``, ``UndeclaredCharsetDefect``, ``MalformedHeaderLineDefect``...).

Reading rules, shared by all entry points:

- Header section: lines up to the first empty line. A line that is neither a field
  (``name:``), a continuation (leading space or tab) nor an mbox ``From `` line ends the
  section, as in the ``email`` package, unless a field was already seen and the next line
  is a field again: then it is a broken header line, skipped and reported, so that one
  bad line does not turn the rest of the headers (Subject, MIME structure) into body.
- Bodies: the first ``text/plain`` and the first ``text/html`` leaf, in document order
  (so through ``multipart/alternative``, ``related`` and nested multiparts), whose
  ``Content-Disposition`` is not ``attachment`` and which carry no filename. A multipart
  part whose boundary is missing is shown as its raw text. Text is decoded with its
  declared charset (or a common superset: windows-1252 for iso-8859-1, gb18030 for
  gb2312...); an unknown charset or bytes invalid in it fall back to UTF-8, then
  windows-1252, and say so in ``defects``. Line endings are normalised to ``\\n``.
- Attachments: every other leaf part, numbered from 0 in document order, including
  inline images of an HTML body (they carry a ``content_id``) and embedded messages
  (``message/*``, whose bytes are regenerated from the parsed message, so header folding
  may differ from the original). Parts inside an embedded message are not listed.

Exceptions::

    KeyError
    └── AttachmentNotFound      no attachment with that index; ``index``, ``count``
"""

from __future__ import annotations

import binascii
import codecs
import io
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from functools import lru_cache
from typing import Final, Literal
from urllib.parse import quote

import msgspec

from service.domain.threads import trimmed

MAX_HEADER_BYTES: Final = 256 * 1024
"""How far :func:`summarize` looks for the end of the header section."""

MAX_HEADERS: Final = 500
"""Header fields read per message (summary) or listed (parsed view)."""

MAX_REFERENCES: Final = 100
"""Msg-ids of References kept in a summary: the first (the thread's root) and the newest."""

MAX_MSG_ID_CHARS: Final = 998
"""Longest msg-id kept from In-Reply-To and References (a header line's limit)."""

MAX_PARTS: Final = 1000
"""MIME parts (containers and leaves) walked per message; the rest are not listed."""

MAX_DEFECTS: Final = 100
"""Defects listed per message; a count of the ones left out follows them."""

MAX_DEFECT_DETAIL_CHARS: Final = 100
"""Longest detail (e.g. an offending header line) quoted in a defect."""

MAX_PARAM_HEADER_CHARS: Final = 16 * 1024
"""Longest Content-Type/Content-Disposition value whose parameters are parsed."""

HTML_CHARSET_SNIFF_BYTES: Final = 2048
"""How far into an HTML body without a charset parameter to look for ``<meta charset>``."""

MAX_FILENAME_BYTES: Final = 255
"""Longest filename (UTF-8 bytes) offered by :func:`safe_content_disposition`."""

# No charset name is longer; a longer label is not looked up (nor cached).
_MAX_CHARSET_CHARS: Final = 64
# Extensions longer than this are not worth keeping when a long filename is shortened.
_MAX_KEPT_EXTENSION_CHARS: Final = 16

# Top-level multipart types that carry attachments by construction: "mixed" is what
# senders use for "body + attached files"; "report" (bounces) and "digest" carry messages.
_ATTACHMENT_MULTIPARTS: Final = frozenset(
    {"multipart/mixed", "multipart/report", "multipart/digest", "multipart/parallel"}
)
_BODY_TYPES: Final = frozenset({"text/plain", "text/html"})
_ADDRESS_HEADERS: Final = frozenset(
    {"from", "sender", "reply-to", "to", "cc", "bcc"}
    | {"resent-from", "resent-sender", "resent-to", "resent-cc", "resent-bcc"}
)

# Declared charset (codec name) -> codec tried first: what mail software really meant.
_CHARSET_SUPERSETS: Final = {
    "iso8859-1": "cp1252",  # Outlook and friends label windows-1252 text as latin-1
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "euc_kr": "cp949",
    "shift_jis": "cp932",
    "utf-8": "utf-8-sig",  # drops a leading byte-order mark
}
# Python codecs that decode bytes to text but are not mail charsets.
_NOT_MAIL_CHARSETS: Final = frozenset(
    {"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined"}
)

# Mirrors email.feedparser.headerRE for field lines: a name (printable ASCII but ':'), ':'.
_FIELD_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]*:")
# One whole field: name, value with its continuation lines, line break (none at the end).
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+):([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)(?:\r?\n|\Z)")
_BLANK_LINES: Final = frozenset({b"\n", b"\r\n", b"\r"})
_FOLDING_WHITESPACE: Final = (0x20, 0x09)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # TAB is harmless in a value
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]")  # raw 8-bit bytes under surrogateescape
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")  # unencodable in JSON/UTF-8
_COMMENT = re.compile(r"\([^()]*\)")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_MESSAGE_ID = re.compile(r"<[^<>\s]*>")
_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_BOUNDARY_PARAM = re.compile(r";\s*boundary(?:\*\d*)?\*?\s*=", re.IGNORECASE)
_NAME_PARAM = re.compile(r";\s*(?:file)?name(?:\*\d*)?\*?\s*=", re.IGNORECASE)
_ADDRESS_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')
_NOT_SIMPLE_ADDRESSES = re.compile(r"[()\\:;\[\]]")  # comments, groups, escapes, literals
_ADDR_SPEC = r'[^\s"<>,@]+@[^\s"<>,@]+'
_SIMPLE_ADDRESS = re.compile(
    rf'[ \t]*(?:"(?P<quoted>[^"]*)"|(?P<phrase>[^"<>,@]*?))[ \t]*<[ \t]*(?P<angle>{_ADDR_SPEC})'
    rf"[ \t]*>[ \t]*(?:,|\Z)|[ \t]*(?P<bare>{_ADDR_SPEC})[ \t]*(?:,|\Z)"
)
_EMPTY_ADDRESS = re.compile(r"[ \t]*(?:,|\Z)")
_BASE64_SEGMENT = re.compile(rb"([^=]*)(=*)")
_BASE64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")
_WHITESPACE_BYTES = re.compile(rb"\s+")
_META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.I)
_UUENCODINGS: Final = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})
_IDENTITY_ENCODINGS: Final = frozenset({"", "7bit", "8bit", "binary"})

_FILENAME_DROPPED = re.compile(
    # C0/C1 controls, soft hyphen, zero-width and bidi controls (the "gpj.exe" trick),
    # line/paragraph separators, BOM, lone surrogates.
    "[\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069"
    "\ufeff\ud800-\udfff]"
)
_PATH_SEPARATORS = re.compile(r"[/\\]")
_FILENAME_RESERVED = re.compile(r'[<>:"|?*]')  # not allowed in Windows file names
_ASCII_FALLBACK_REPLACED: Final = frozenset('"\\%;/<>:|?*')
_RFC5987_SAFE: Final = "!#$&+-.^_`|~"  # attr-char beyond ALPHA/DIGIT (RFC 5987)
_DISPOSITIONS: Final = frozenset({"attachment", "inline"})

_PARSER = BytesParser(policy=email_policy.compat32)
_GENERATOR_POLICIES: Final = {
    "\r\n": email_policy.compat32.clone(linesep="\r\n"),
    "\n": email_policy.compat32.clone(linesep="\n"),
}


# --- Public types -------------------------------------------------------------------


class MessageSummary(msgspec.Struct, frozen=True, kw_only=True):
    """The header fields stored with each message at ingest.

    Addresses are decoded display strings (``Jörg Müller <joerg@example.de>``), the
    subject is RFC 2047 decoded, ``date`` is an aware UTC datetime (a date without a
    zone is taken as UTC), ``message_id`` keeps its angle brackets, as do ``in_reply_to``
    (the first msg-id of In-Reply-To) and ``references`` (the msg-ids of References in
    order, at most :data:`MAX_REFERENCES`: the first and the newest). Absent or
    unreadable fields are ``None`` or empty.
    """

    from_: str | None = msgspec.field(default=None, name="from")
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    subject: str | None = None
    date: datetime | None = None
    message_id: str | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    has_attachments: bool = False


class Body(msgspec.Struct, frozen=True, kw_only=True):
    """A text or HTML body decoded to Unicode, with the charset actually used."""

    content: str
    charset: str


class AttachmentInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One attachment as listed by :func:`parse`; ``size`` is in decoded bytes.

    ``content_id`` has no angle brackets (it matches ``cid:`` URLs in the HTML body);
    ``disposition`` is the lower-cased Content-Disposition type, ``None`` when absent.
    """

    index: int
    filename: str | None
    content_type: str
    size: int
    content_id: str | None
    disposition: str | None


class ParsedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """The full view of a message: headers in order, bodies, attachments, defects."""

    headers: tuple[tuple[str, str], ...]
    text: Body | None
    html: Body | None
    attachments: tuple[AttachmentInfo, ...]
    defects: tuple[str, ...]


class Attachment(msgspec.Struct, frozen=True, kw_only=True):
    """One attachment's decoded bytes and what is known about them."""

    index: int
    filename: str | None
    content_type: str
    content_id: str | None
    disposition: str | None
    data: bytes

    @property
    def size(self) -> int:
        """Length of the decoded bytes."""
        return len(self.data)


class AttachmentNotFound(KeyError):
    """The message has no attachment with this index (``count`` attachments exist)."""

    def __init__(self, index: int, count: int) -> None:
        super().__init__(index)
        self.index = index
        self.count = count

    def __str__(self) -> str:  # KeyError would repr() the argument
        return f"no attachment {self.index}: the message has {self.count}"


# --- Public functions ---------------------------------------------------------------


def summarize(raw: bytes) -> MessageSummary:
    """Read the summary fields from the header section of ``raw`` (body not parsed).

    ``has_attachments`` is a header-only hint, true when the top-level part is:

    - ``multipart/mixed`` (or ``report``, ``digest``, ``parallel``) with a boundary;
    - any non-multipart part with ``Content-Disposition: attachment``;
    - a single part that is not ``text/plain``/``text/html`` (a PDF, an image, a
      forwarded ``message/rfc822``), or is one but names a file.

    It agrees with :func:`parse` for mail as senders build it; it cannot see attachments
    nested under a top-level ``multipart/alternative``/``related``/``signed``, and it
    says yes for a ``multipart/mixed`` whose extra parts are only inline text.

    Never raises: malformed input gives ``None``/empty fields.
    """
    try:
        return _summarize(raw)
    except Exception:  # last resort: ingest must store the message whatever it holds
        return MessageSummary()


def parse(raw: bytes) -> ParsedMessage:
    """Parse ``raw`` fully: headers, text and HTML bodies, attachment list, defects.

    See the module documentation for which parts are bodies and how attachments are
    numbered. Never raises: malformed MIME is reported in ``defects``.
    """
    try:
        return _parse(raw)
    except Exception as exc:  # last resort; the raw bytes remain available to callers
        return ParsedMessage(
            headers=(),
            text=None,
            html=None,
            attachments=(),
            defects=(f"message: InternalError: {type(exc).__name__}",),
        )


def attachment(raw: bytes, index: int) -> Attachment:
    """Return attachment ``index`` of ``raw`` (numbered as in :func:`parse`), decoded.

    Raises :class:`AttachmentNotFound` if there is no such attachment (negative
    indexes included).
    """
    try:
        loaded = _load(raw)
        leaves = [leaf for leaf in _leaves(loaded, _Defects()) if leaf.role == "attachment"]
        if not 0 <= index < len(leaves):
            raise AttachmentNotFound(index, len(leaves))
        leaf = leaves[index]
        data = _payload_bytes(leaf, loaded.linesep, _Defects())
    except AttachmentNotFound:
        raise
    except Exception as exc:  # parse() degrades to no attachments in this case
        raise AttachmentNotFound(index, 0) from exc
    return Attachment(
        index=index,
        filename=leaf.filename,
        content_type=leaf.content_type,
        content_id=leaf.content_id,
        disposition=leaf.disposition,
        data=data,
    )


def safe_content_disposition(filename: str | None, disposition: str = "attachment") -> str:
    """Build a ``Content-Disposition`` header value for serving an untrusted filename.

    The filename loses path components (``/`` and ``\\``), control, zero-width and bidi
    characters, characters Windows forbids (``<>:"|?*``, replaced by ``_``), leading
    and trailing dots and spaces, and is cut to :data:`MAX_FILENAME_BYTES` (keeping the
    extension). The value carries an ASCII ``filename="..."`` fallback and the exact
    name as RFC 5987 ``filename*=UTF-8''...``; it is pure printable ASCII, so it can
    neither inject a header nor break the quoting. With no usable filename, the value
    is the bare disposition. ``disposition`` must be ``attachment`` or ``inline``.
    """
    if disposition not in _DISPOSITIONS:
        raise ValueError(f"disposition must be 'attachment' or 'inline', not {disposition!r}")
    name = _safe_filename(filename) if filename else ""
    if not name:
        return disposition
    fallback = _ascii_filename(name)
    encoded = quote(name, safe=_RFC5987_SAFE, encoding="utf-8")
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


# --- Header section -----------------------------------------------------------------


@dataclass(slots=True)
class _HeaderSection:
    """The header section as split by :func:`_header_section`."""

    fields: list[tuple[bytes, list[bytes]]] = field(default_factory=list)  # name, lines
    kept_lines: list[bytes] = field(default_factory=list)
    skipped_lines: list[bytes] = field(default_factory=list)
    body_offset: int = 0  # where the empty line or the first body line starts
    complete: bool = False  # the end of the section was found


def _header_section(raw: bytes) -> _HeaderSection:
    """Split the header section off ``raw`` (see the module docstring for the rule)."""
    limit = min(len(raw), MAX_HEADER_BYTES)
    # Find the empty line cheaply, so that only header lines get split: look for the
    # line ending the first line uses (searching the wrong one would scan the whole
    # message). Any empty line found bounds the section from above; the walk below stays
    # authoritative and stops at the first empty line, whatever the line endings.
    first_break = raw.find(b"\n", 0, limit)
    crlf = first_break > 0 and raw[first_break - 1] == 0x0D
    end = raw.find(b"\r\n\r\n" if crlf else b"\n\n", 0, limit)
    scan_end = min(end + 4, limit) if end >= 0 else limit
    lines = raw[:scan_end].splitlines(keepends=True)

    section = _HeaderSection()
    collecting = False  # whether continuation lines belong to a field we kept
    offset = 0
    for number, line in enumerate(lines):
        if line in _BLANK_LINES:
            section.body_offset = offset
            section.complete = True
            return section
        if line[0] in _FOLDING_WHITESPACE:
            if collecting:
                section.fields[-1][1].append(line)
        elif line.startswith(b"From "):  # mbox envelope line; the email package drops it
            collecting = False
        elif _FIELD_LINE.match(line):
            colon = line.index(b":")
            collecting = 0 < colon and len(section.fields) < MAX_HEADERS
            if collecting:
                section.fields.append((line[:colon], [line[colon + 1 :]]))
        else:
            following = lines[number + 1] if number + 1 < len(lines) else b""
            if not (section.fields and _FIELD_LINE.match(following)):
                section.body_offset = offset
                section.complete = True
                return section
            section.skipped_lines.append(line)
            collecting = False
            offset += len(line)
            continue
        section.kept_lines.append(line)
        offset += len(line)
    section.body_offset = offset
    section.complete = scan_end == len(raw)
    return section


# --- Summary ------------------------------------------------------------------------

_SUMMARY_FIELDS: Final = frozenset(
    {b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"content-type"}
    | {b"content-disposition", b"in-reply-to", b"references"}
)


def _summary_values(raw: bytes) -> dict[bytes, list[bytes]]:
    """The raw (folded) values of the summary fields, by lower-cased field name."""
    values = _clean_summary_values(raw)
    if values is not None:
        return values
    values = {}
    for name, lines in _header_section(raw).fields:
        key = name.lower()
        if key in _SUMMARY_FIELDS:
            values.setdefault(key, []).append(b"".join(lines))
    return values


def _clean_summary_values(raw: bytes) -> dict[bytes, list[bytes]] | None:
    """The summary fields of a plainly well-formed header section, else ``None``.

    Well formed: the section ends with an empty line in the line ending of the first
    line, holds fewer than :data:`MAX_HEADERS` lines, and is a run of fields (with
    their continuation lines) from its first byte to its last, with no lone CR. Ingest
    takes this path for nearly every message: one regular expression pass per field
    instead of Python work per line. Anything else gets the full walk of
    :func:`_header_section`, which reads the same fields from such a section.
    """
    limit = min(len(raw), MAX_HEADER_BYTES)
    first_break = raw.find(b"\n", 0, limit)
    if first_break <= 0:
        return None
    crlf = raw[first_break - 1] == 0x0D
    # Searching for the other line ending would scan the whole message.
    end = raw.find(b"\r\n\r\n" if crlf else b"\n\n", 0, limit)
    if end < 0 or raw.count(b"\n", 0, end) >= MAX_HEADERS:
        return None
    values: dict[bytes, list[bytes]] = {}
    position = 0
    for match in _FIELD.finditer(raw, 0, end):
        if match.start() != position:
            return None  # something between two fields: not plain
        position = match.end()
        key = match[1].lower()
        if key in _SUMMARY_FIELDS:
            values.setdefault(key, []).append(match[2])
    return values if position == end else None


def _summarize(raw: bytes) -> MessageSummary:
    values = {
        key: [value.decode("ascii", "surrogateescape") for value in found]
        for key, found in _summary_values(raw).items()
    }

    def first(key: bytes) -> str | None:
        found = values.get(key)
        return found[0] if found else None

    subject = first(b"subject")
    senders = _addresses(first(b"from"))
    return MessageSummary(
        from_=", ".join(senders) or None,
        to=tuple(address for value in values.get(b"to", ()) for address in _addresses(value)),
        cc=tuple(address for value in values.get(b"cc", ()) for address in _addresses(value)),
        subject=None if subject is None else _decode_header_value(subject),
        date=_date(first(b"date")),
        message_id=_message_id(first(b"message-id")),
        in_reply_to=next(iter(msg_ids(first(b"in-reply-to"))), None),
        references=references_of(first(b"references")),
        has_attachments=_has_attachments_hint(
            first(b"content-type"), first(b"content-disposition")
        ),
    )


def _main_value(value: str | None) -> str:
    """The lower-cased value before any parameters, comments removed."""
    if value is None:
        return ""
    head = _unfold(value).split(";", 1)[0]
    return _COMMENT.sub("", head).strip().lower()


def _has_attachments_hint(content_type: str | None, disposition: str | None) -> bool:
    media_type = _main_value(content_type) or "text/plain"
    if media_type.count("/") != 1:
        media_type = "text/plain"  # what the email package assumes for a broken type
    if media_type.startswith("multipart/"):
        if content_type is not None and _BOUNDARY_PARAM.search(_unfold(content_type)):
            return media_type in _ATTACHMENT_MULTIPARTS
        return False  # without a boundary the parts cannot be told apart: shown as text
    if _main_value(disposition) == "attachment":
        return True
    if media_type not in _BODY_TYPES:
        return True
    return any(
        value is not None and _NAME_PARAM.search(_unfold(value))
        for value in (content_type, disposition)
    )


def _addresses(value: str | None, defects: _Defects | None = None, name: str = "") -> list[str]:
    """Decoded ``Name <addr>`` strings from an address header value."""
    if value is None:
        return []
    try:
        pairs = _address_pairs(_unfold(value))
    except (ValueError, TypeError, IndexError, AttributeError):
        return []
    found = []
    for raw_name, raw_address in pairs:
        display = _decode_header_value(raw_name, defects, "message", name)
        address = _without_controls(_eight_bit(raw_address, defects, "message", name)).strip()
        if display and address:
            found.append(f"{_quote_display_name(display)} <{address}>")
        elif address or display:
            found.append(address or display)
    return found


def _address_pairs(text: str) -> list[tuple[str, str]]:
    """``(display name, address)`` pairs, as ``email.utils.getaddresses`` gives them.

    Plain lists (``Name <a@b>``, ``"Quoted" <a@b>``, ``a@b``, no comments, groups or
    escapes) are split by regular expression; ``getaddresses`` reads a character at a
    time, which was most of the cost of a summary.
    """
    if _NOT_SIMPLE_ADDRESSES.search(text) is None:
        pairs: list[tuple[str, str]] = []
        position, length = 0, len(text)
        while position < length:
            match = _SIMPLE_ADDRESS.match(text, position)
            if match is None:
                match = _EMPTY_ADDRESS.match(text, position)
                if match is None or match.end() == position:
                    break  # not plain after all
            elif match["bare"] is not None:
                pairs.append(("", match["bare"]))
            else:
                quoted = match["quoted"]
                name = quoted if quoted is not None else " ".join(match["phrase"].split())
                pairs.append((name, match["angle"]))
            position = match.end()
        else:
            return pairs
    return getaddresses([text])


def _quote_display_name(name: str) -> str:
    if not _ADDRESS_SPECIALS.search(name):
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _date(value: str | None) -> datetime | None:
    if value is None:
        return None
    text = _eight_bit(_unfold(value)).strip()
    if not text:
        return None
    try:
        parsed = parsedate_to_datetime(text)
        if parsed.tzinfo is None:  # "-0000": zone unknown, RFC 5322 says treat as UTC
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _message_id(value: str | None) -> str | None:
    if value is None:
        return None
    text = _without_controls(_eight_bit(_unfold(value))).strip()
    found = _MESSAGE_ID.search(text)
    return (found[0] if found else text) or None


def msg_ids(value: str | None) -> list[str]:
    """The ``<...>`` msg-ids of a threading header, in order (comments and junk between
    them dropped, as mail clients do)."""
    if not value:
        return []
    return [
        found
        for found in _MESSAGE_ID.findall(_unfold(value))
        if 2 < len(found) <= MAX_MSG_ID_CHARS and found.isprintable() and found.isascii()
    ]


def references_of(value: str | None) -> tuple[str, ...]:
    """The msg-ids of a References value as a summary keeps them."""
    return tuple(trimmed(msg_ids(value), MAX_REFERENCES))


# --- Header value decoding ----------------------------------------------------------


def _unfold(value: str) -> str:
    if "\n" in value or "\r" in value:
        return _LINE_BREAK.sub("", value)
    return value


def _without_controls(text: str) -> str:
    return text if text.isprintable() else _CONTROL_CHARS.sub("", text)


def _eight_bit(
    value: str, defects: _Defects | None = None, where: str = "message", name: str = ""
) -> str:
    """Turn raw 8-bit bytes (held as surrogate escapes) into text: UTF-8, else cp1252."""
    if value.isascii() or not _ESCAPED_BYTES.search(value):  # isascii() is O(1)
        return value
    data = value.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if defects is not None:
            defects.add(where, "NonUtf8HeaderDefect", f"{name}: 8-bit bytes read as windows-1252")
        return _without_surrogates(data.decode("cp1252", "replace"))


def _decode_header_value(
    value: str, defects: _Defects | None = None, where: str = "message", name: str = ""
) -> str:
    """Unfold, read raw 8-bit bytes, decode RFC 2047 words, blank out control chars."""
    text = _eight_bit(_unfold(value), defects, where, name)
    if "=?" in text:
        text = _decode_encoded_words(text, defects, where, name)
    if not text.isprintable():
        text = _CONTROL_CHARS.sub(" ", text)
    return text.strip()


def _decode_encoded_words(text: str, defects: _Defects | None, where: str, name: str) -> str:
    """Decode RFC 2047 encoded words leniently.

    Adjacent words of one charset are joined before decoding (senders split multibyte
    characters across words), whitespace between encoded words is dropped (RFC 2047
    section 6.2), and a word that cannot be decoded is kept as written.
    """
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""

    def flush() -> None:
        if pending:
            decoded, _, problem = _decode_text(bytes(pending), pending_charset)
            if problem is not None and defects is not None:
                defects.add(where, problem[0], f"{name}: {problem[1]}")
            out.append(decoded)
            pending.clear()

    position = 0
    after_word = False
    for match in _ENCODED_WORD.finditer(text):
        gap = text[position : match.start()]
        data = _decode_word_payload(match[2], match[3])
        if gap and not (after_word and gap.strip(" \t") == ""):
            flush()
            out.append(gap)
        if data is None:
            flush()
            out.append(match[0])
            after_word = False
        else:
            charset = match[1].split("*", 1)[0].lower()  # RFC 2231 adds "*language"
            if charset != pending_charset:
                flush()
                pending_charset = charset
            pending.extend(data)
            after_word = True
        position = match.end()
    flush()
    out.append(text[position:])
    return "".join(out)


def _decode_word_payload(encoding: str, payload: str) -> bytes | None:
    data = payload.encode("utf-8", "surrogateescape")
    if encoding in "qQ":
        return binascii.a2b_qp(data, header=True)
    decoded, problems = _decode_base64(data)
    return None if "InvalidBase64LengthDefect" in problems else decoded


def _decode_base64(data: bytes) -> tuple[bytes, list[str]]:
    """Decode base64 leniently, naming the defects found (email package names).

    Whitespace is ignored, other junk characters are dropped, padding is repaired and
    ``=``-padded segments are decoded one by one (concatenated encodings exist).
    """
    problems: list[str] = []
    compact = _WHITESPACE_BYTES.sub(b"", data)
    decoded = bytearray()
    for match in _BASE64_SEGMENT.finditer(compact):
        chunk, padding = match[1], match[2]
        if not chunk and not padding:
            continue
        cleaned = _BASE64_JUNK.sub(b"", chunk)
        if len(cleaned) != len(chunk) and "InvalidBase64CharactersDefect" not in problems:
            problems.append("InvalidBase64CharactersDefect")
        remainder = len(cleaned) % 4
        if remainder == 1:  # one leftover character carries no whole byte
            if "InvalidBase64LengthDefect" not in problems:
                problems.append("InvalidBase64LengthDefect")
            cleaned = cleaned[:-1]
            remainder = 0
        expected_padding = (4 - remainder) % 4
        is_last = match.end() == len(compact)
        if len(padding) != expected_padding and (padding or is_last):
            if "InvalidBase64PaddingDefect" not in problems:
                problems.append("InvalidBase64PaddingDefect")
        decoded.extend(binascii.a2b_base64(cleaned + b"=" * expected_padding))
    return bytes(decoded), problems


# --- Charsets -----------------------------------------------------------------------


@lru_cache(maxsize=256)
def _codecs_for(label: str) -> tuple[str, ...] | None:
    """Codec names to try for a declared charset, best first; ``None`` if unknown."""
    try:
        name = codecs.lookup(label).name
    except (LookupError, ValueError, TypeError):
        return None
    if name in _NOT_MAIL_CHARSETS:
        return None
    superset = _CHARSET_SUPERSETS.get(name)
    return (superset, name) if superset else (name,)


def _decode_text(data: bytes, label: str | None) -> tuple[str, str, tuple[str, str] | None]:
    """Decode ``data`` declared as charset ``label``.

    Returns the text, the charset used (the declared label, lower-cased, when it
    worked) and, when it did not, a ``(defect name, detail)`` describing the fallback.
    """
    declared = (label or "").strip().strip("\"'").lower()
    if declared:
        candidates = None if len(declared) > _MAX_CHARSET_CHARS else _codecs_for(declared)
        if candidates is None:
            problem = ("UnknownCharsetDefect", f"unknown charset {declared!r}")
        else:
            for codec in candidates:
                try:
                    return _without_surrogates(data.decode(codec)), declared, None
                except (UnicodeDecodeError, LookupError):  # LookupError: not a text codec
                    continue
            problem = ("CharsetMismatchDefect", f"bytes invalid in charset {declared!r}")
    else:
        try:
            return data.decode("ascii"), "us-ascii", None
        except UnicodeDecodeError:
            problem = ("UndeclaredCharsetDefect", "8-bit text without a charset")
    try:
        text, used = data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        text, used = data.decode("cp1252", "replace"), "windows-1252"
    return _without_surrogates(text), used, (problem[0], f"{problem[1]}, decoded as {used}")


def _without_surrogates(text: str) -> str:
    # A few codecs (utf-7) can decode to lone surrogates, which no UTF-8 encoder (JSON,
    # SQLite) accepts.
    if text.isascii() or not _LONE_SURROGATES.search(text):
        return text
    return _LONE_SURROGATES.sub("\ufffd", text)


# --- Full parse ---------------------------------------------------------------------


class _Defects:
    """Collects defect strings up to :data:`MAX_DEFECTS`."""

    __slots__ = ("items", "left_out")

    def __init__(self) -> None:
        self.items: list[str] = []
        self.left_out = 0

    def add(self, where: str, name: str, detail: str = "") -> None:
        if len(self.items) >= MAX_DEFECTS:
            self.left_out += 1
            return
        detail = _clip(detail)
        self.items.append(f"{where}: {name}: {detail}" if detail else f"{where}: {name}")

    def result(self) -> tuple[str, ...]:
        if self.left_out:
            return (*self.items, f"message: TooManyDefects: {self.left_out} more not listed")
        return tuple(self.items)


def _clip(text: str) -> str:
    """Make a detail printable and short: escapes controls and raw bytes."""
    text = text.strip()
    text = _CONTROL_CHARS.sub(lambda match: f"\\x{ord(match[0]):02x}", text)
    text = _LONE_SURROGATES.sub(lambda match: f"\\x{ord(match[0]) & 0xFF:02x}", text)
    if len(text) > MAX_DEFECT_DETAIL_CHARS:
        text = text[: MAX_DEFECT_DETAIL_CHARS - 1] + "…"
    return text


@dataclass(slots=True)
class _Loaded:
    message: Message
    defects: _Defects
    linesep: str  # of the original, for regenerating embedded messages


@dataclass(slots=True)
class _Leaf:
    part: Message
    where: str
    content_type: str
    disposition: str | None
    filename: str | None
    content_id: str | None
    charset: str | None
    role: Literal["text", "html", "attachment"]
    index: int  # attachment number, -1 for a body


def _load(raw: bytes) -> _Loaded:
    """Parse ``raw`` into a compat32 Message, repairing broken header lines first."""
    defects = _Defects()
    section = _header_section(raw)
    data = raw
    if section.skipped_lines and section.complete:
        data = b"".join(section.kept_lines) + raw[section.body_offset :]
        for line in section.skipped_lines:
            text = line.decode("ascii", "surrogateescape")
            defects.add("message", "MalformedHeaderLineDefect", f"skipped {text!r}")
    first_break = raw.find(b"\n", 0, MAX_HEADER_BYTES)
    linesep = "\r\n" if first_break > 0 and raw[first_break - 1] == 0x0D else "\n"
    try:
        message = _PARSER.parsebytes(data)
    except Exception as exc:  # e.g. RecursionError on absurdly nested multiparts
        defects.add("message", "ParserFailureDefect", f"{type(exc).__name__}, body shown as text")
        try:
            message = _PARSER.parsebytes(data, headersonly=True)
        except Exception:
            message = Message()
            message.set_payload(data.decode("ascii", "surrogateescape"))
    return _Loaded(message=message, defects=defects, linesep=linesep)


def _parse(raw: bytes) -> ParsedMessage:
    loaded = _load(raw)
    defects = loaded.defects
    headers = []
    for number, (name, value) in enumerate(loaded.message.raw_items()):
        if number >= MAX_HEADERS:
            defects.add("message", "TooManyHeadersDefect", f"only {MAX_HEADERS} listed")
            break
        headers.append((name, _display_header(name, str(value), defects)))

    text: Body | None = None
    html: Body | None = None
    attachments: list[AttachmentInfo] = []
    for leaf in _leaves(loaded, defects):
        data = _payload_bytes(leaf, loaded.linesep, defects)
        if leaf.role == "attachment":
            attachments.append(
                AttachmentInfo(
                    index=leaf.index,
                    filename=leaf.filename,
                    content_type=leaf.content_type,
                    size=len(data),
                    content_id=leaf.content_id,
                    disposition=leaf.disposition,
                )
            )
        elif leaf.role == "text":
            text = _body(leaf, data, defects)
        else:
            html = _body(leaf, data, defects)
    return ParsedMessage(
        headers=tuple(headers),
        text=text,
        html=html,
        attachments=tuple(attachments),
        defects=defects.result(),
    )


def _display_header(name: str, value: str, defects: _Defects) -> str:
    if name.lower() in _ADDRESS_HEADERS:
        # Decode per address: a decoded display name may hold a comma or a quote.
        addresses = _addresses(value, defects, name)
        if addresses:
            return ", ".join(addresses)
    return _decode_header_value(value, defects, "message", name)


def _leaves(loaded: _Loaded, defects: _Defects) -> list[_Leaf]:
    """The leaf parts in document order, each classified as a body or an attachment."""
    leaves: list[_Leaf] = []
    has_text = has_html = False
    attachment_count = 0
    visited = 0
    stack: list[tuple[Message, str]] = [(loaded.message, "message")]
    while stack:  # iterative: nesting depth must not reach the recursion limit
        part, where = stack.pop()
        visited += 1
        if visited > MAX_PARTS:
            defects.add("message", "TooManyPartsDefect", f"only {MAX_PARTS} parts read")
            break
        for defect in getattr(part, "defects", ()):
            defects.add(where, type(defect).__name__, str(defect))
        content_type = part.get_content_type()
        payload = _stored_payload(part)
        if content_type.startswith("multipart/") and isinstance(payload, list):
            prefix = "part " if where == "message" else f"{where}."
            children = [child for child in payload if isinstance(child, Message)]
            stack.extend(
                (child, f"{prefix}{number}")
                for number, child in reversed(list(enumerate(children, start=1)))
            )
            continue

        if not _MEDIA_TYPE.fullmatch(content_type):
            content_type = "application/octet-stream"  # e.g. raw 8-bit bytes in the type
        _, type_params = _params(_raw_header(part, "content-type"))
        disposition_value, disposition_params = _params(_raw_header(part, "content-disposition"))
        disposition = disposition_value or None
        filename = disposition_params.get("filename") or type_params.get("name")
        filename = _decode_header_value(filename, defects, where, "filename") if filename else None
        content_id = _content_id(_raw_header(part, "content-id"))

        role: Literal["text", "html", "attachment"] = "attachment"
        if disposition != "attachment" and not filename:
            # A multipart without a usable boundary holds its parts as raw text.
            if not has_text and (
                content_type == "text/plain" or content_type.startswith("multipart/")
            ):
                role, has_text = "text", True
            elif not has_html and content_type == "text/html":
                role, has_html = "html", True
        leaves.append(
            _Leaf(
                part=part,
                where=where,
                content_type=content_type,
                disposition=disposition,
                filename=filename or None,
                content_id=content_id,
                charset=type_params.get("charset"),
                role=role,
                index=attachment_count if role == "attachment" else -1,
            )
        )
        if role == "attachment":
            attachment_count += 1
    return leaves


def _raw_header(part: Message, name: str) -> str | None:
    for key, value in part.raw_items():
        if key.lower() == name:
            return str(value)
    return None


def _params(value: str | None) -> tuple[str, dict[str, str]]:
    """The lower-cased main value and the parameters (RFC 2231 decoded) of a header."""
    if value is None:
        return "", {}
    text = _eight_bit(_unfold(value))[:MAX_PARAM_HEADER_CHARS]
    # The email package's parameter parser (quoting, RFC 2231 continuations and
    # charsets) is only public on a Message, so a throwaway one carries the value.
    carrier = Message()
    carrier["x"] = text
    try:
        items: list[tuple[str, object]] = list(carrier.get_params(header="x") or [])
    except (ValueError, TypeError, IndexError, LookupError, UnicodeError):
        return _main_value(text), {}
    if not items:
        return "", {}
    params: dict[str, str] = {}
    for key, item in items[1:]:
        if key not in params:
            params[key] = _param_text(item)
    return _COMMENT.sub("", items[0][0]).strip().lower(), params


def _param_text(item: object) -> str:
    if isinstance(item, tuple) and len(item) == 3:  # RFC 2231: (charset, language, text)
        charset, _language, text = item
        data = str(text).encode("raw-unicode-escape")  # one char per percent-decoded byte
        decoded, _, _ = _decode_text(data, str(charset) if charset else "us-ascii")
        return decoded
    return str(item)


def _content_id(value: str | None) -> str | None:
    if value is None:
        return None
    text = _without_controls(_eight_bit(_unfold(value))).strip()
    return text.removeprefix("<").removesuffix(">").strip() or None


def _payload_bytes(leaf: _Leaf, linesep: str, defects: _Defects) -> bytes:
    """The part's content with its Content-Transfer-Encoding undone."""
    part = leaf.part
    payload = _stored_payload(part)
    if isinstance(payload, list):  # message/*: the email package parsed it into parts
        return _regenerate(part, linesep, defects, leaf.where)
    if not isinstance(payload, str):
        return b""
    data = payload.encode("utf-8", "surrogateescape")  # the parser read bytes as ASCII
    encoding = _main_value(_raw_header(part, "content-transfer-encoding"))
    if encoding in _IDENTITY_ENCODINGS:
        return data
    if encoding == "base64":
        decoded, problems = _decode_base64(data)
        for problem in problems:
            defects.add(leaf.where, problem)
        return decoded
    if encoding == "quoted-printable":
        return binascii.a2b_qp(data)
    if encoding in _UUENCODINGS:
        undone = part.get_payload(decode=True)
        return undone if isinstance(undone, bytes) else data
    defects.add(leaf.where, "UnknownTransferEncodingDefect", encoding)
    return data


def _stored_payload(part: Message) -> object:
    """The payload as the parser stored it: a list of parts, or the content as a str.

    ``get_payload()`` would decode 8-bit content with the declared charset (lossy, and
    wrong for the charset fallbacks here); the parser's own attribute keeps the bytes
    read (ASCII with surrogate escapes), as the stdlib generator itself relies on.
    """
    stored = vars(part).get("_payload")
    return stored if stored is not None else part.get_payload()


def _regenerate(part: Message, linesep: str, defects: _Defects, where: str) -> bytes:
    """Bytes of an embedded message part's content, regenerated from the parsed tree."""
    buffer = io.BytesIO()
    generator = BytesGenerator(buffer, mangle_from_=False, policy=_GENERATOR_POLICIES[linesep])
    try:
        generator.flatten(part)
    except Exception as exc:  # the tree came from malformed input
        defects.add(where, "EmbeddedMessageDefect", f"{type(exc).__name__}, content not read")
        return b""
    generated = buffer.getvalue()
    separator = linesep.encode("ascii")
    # Drop the part's own header section, which the generator wrote first.
    if generated.startswith(separator):
        return generated[len(separator) :]
    end = generated.find(separator * 2)
    return generated[end + 2 * len(separator) :] if end >= 0 else b""


def _body(leaf: _Leaf, data: bytes, defects: _Defects) -> Body:
    charset = leaf.charset
    if charset is None and leaf.role == "html":
        declared = _META_CHARSET.search(data[:HTML_CHARSET_SNIFF_BYTES])
        charset = declared[1].decode("ascii") if declared else None
    text, used, problem = _decode_text(data, charset)
    if problem is not None:
        defects.add(leaf.where, *problem)
    return Body(content=text.replace("\r\n", "\n").replace("\r", "\n"), charset=used)


# --- Filenames for serving ----------------------------------------------------------


def _safe_filename(name: str) -> str:
    name = _FILENAME_DROPPED.sub("", unicodedata.normalize("NFC", name))
    name = _PATH_SEPARATORS.split(name)[-1]
    name = _FILENAME_RESERVED.sub("_", name)
    # Leading dots hide files (and ".." climbs); Windows drops trailing dots and spaces.
    return _truncate_utf8(_strip_dots_and_spaces(name), MAX_FILENAME_BYTES)


def _strip_dots_and_spaces(text: str) -> str:
    """Strip dots and (Unicode) spaces at both ends, in linear time on any input."""
    start, end = 0, len(text)
    while start < end and (text[start] == "." or text[start].isspace()):
        start += 1
    while end > start and (text[end - 1] == "." or text[end - 1].isspace()):
        end -= 1
    return text[start:end]


def _truncate_utf8(name: str, limit: int) -> str:
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension) > _MAX_KEPT_EXTENSION_CHARS:
        stem, extension = name, ""
    suffix = f".{extension}" if extension else ""
    room = limit - len(suffix.encode("utf-8"))
    stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
    return _strip_dots_and_spaces(stem) + suffix


def _ascii_filename(name: str) -> str:
    """A printable-ASCII stand-in: accents stripped, everything else replaced by ``_``."""
    characters = []
    for character in unicodedata.normalize("NFKD", name):
        if unicodedata.combining(character):
            continue
        printable = " " <= character <= "~" and character not in _ASCII_FALLBACK_REPLACED
        characters.append(character if printable else "_")
    # NFKD can produce new dots ("\uff0e") or lengthen the name ("\ufdfa").
    fallback = _strip_dots_and_spaces("".join(characters))
    fallback = _truncate_utf8(fallback, MAX_FILENAME_BYTES)
    return fallback or "_"
