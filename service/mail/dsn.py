"""Delivery status notifications (RFC 3464): what a bounce says, read from its bytes.

A DSN is a ``multipart/report; report-type=delivery-status`` message whose
``message/delivery-status`` part holds one block of per-message fields
(``Reporting-MTA``, ``Original-Envelope-Id``, ...) and one block per recipient
(``Final-Recipient``, ``Original-Recipient``, ``Action``, ``Status``, ``Remote-MTA``,
``Diagnostic-Code``), followed by the returned message or its headers
(``text/rfc822-headers``, ``message/rfc822``, or their RFC 6533 ``global`` forms).

:func:`parse_dsn` never raises: mail is hostile input, and a message that is not a DSN, or
a DSN too broken to read, is ``None``. Fields are taken as written (unfolded, trimmed);
an address field keeps only the address after its type (``rfc822;``).
"""

from __future__ import annotations

import base64
import email
import email.message
import email.parser
import email.policy
import quopri
import re
from collections.abc import Iterable

import msgspec

# A DSN's top-level Content-Type is multipart/report: a message whose header has none of
# these (the casings MTAs write) is no DSN. Checked for every stored message, so only the
# header is searched, without copying it.
REPORT_MARKERS = (b"/report", b"/Report", b"/REPORT")
# Where the header ends at the latest, for this test (a longer header is searched this far).
MAX_HEADER_BYTES = 256 * 1024
# Bounds on what is kept from a hostile report.
MAX_RECIPIENTS = 1000
MAX_FIELD_CHARS = 2000
MAX_REFERENCES = 50
_GLOBAL_DELIVERY_STATUS = "message/global-delivery-status"
_DELIVERY_STATUS_TYPES = ("message/delivery-status", _GLOBAL_DELIVERY_STATUS)
_HEADER_TYPES = ("text/rfc822-headers", "message/rfc822-headers", "message/global-headers")
_MESSAGE_TYPES = ("message/rfc822", "message/global")
_FOLD = re.compile(r"\r?\n[ \t]+")
_NEWLINES = re.compile(r"\r\n|\r|\n")
_MSG_ID = re.compile(r"<[^<>\s]+>")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_XTEXT = re.compile(r"\+([0-9A-Fa-f]{2})")


class DsnRecipient(msgspec.Struct, frozen=True, kw_only=True):
    """One per-recipient block: who, what happened, and what the remote server said."""

    final_recipient: str | None
    original_recipient: str | None
    action: str | None  # lower case: failed, delayed, delivered, relayed, expanded
    status: str | None  # the enhanced status code, such as 5.1.1
    diagnostic_code: str | None  # as written, with its type: "smtp; 550 5.1.1 ..."
    remote_mta: str | None  # the name after its type: "dns; mx.example.org" -> mx.example.org

    @property
    def failed(self) -> bool:
        """Whether this recipient bounced (``Action: failed``)."""
        return self.action == "failed"

    def addresses(self) -> list[str]:
        """The addresses this block names (original first), for matching a recipient."""
        return [a for a in (self.original_recipient, self.final_recipient) if a]


class DeliveryReport(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed DSN: the per-message fields, the recipients, and which message it is about."""

    reporting_mta: str | None
    original_envelope_id: str | None
    recipients: tuple[DsnRecipient, ...]
    # The Message-ID of the returned message (its headers part), when there is one.
    original_message_id: str | None
    # Message-IDs the DSN itself refers to (In-Reply-To, References), newest first: a
    # fallback for reports that return no headers.
    referenced_message_ids: tuple[str, ...]

    def candidate_message_ids(self) -> list[str]:
        """The Message-IDs this report may be about, the best evidence first."""
        found: list[str] = []
        for mid in (self.original_message_id, *self.referenced_message_ids):
            if mid and mid not in found:
                found.append(mid)
        return found

    @property
    def failed(self) -> tuple[DsnRecipient, ...]:
        return tuple(r for r in self.recipients if r.failed)


def may_be_dsn(raw: bytes) -> bool:
    """A cheap test that rules out almost every message (no ``multipart/report`` in its
    header): only the others can be DSNs. Microseconds per message."""
    # The blank line in the first line's line ends (CRLF as retrieved over POP3): one short
    # search, where looking for either kind would scan whole messages of the other.
    first = raw.find(b"\n", 0, MAX_HEADER_BYTES)
    blank = b"\r\n\r\n" if first > 0 and raw[first - 1] == 0x0D else b"\n\n"
    end = raw.find(blank, 0, MAX_HEADER_BYTES)
    if end < 0:
        end = MAX_HEADER_BYTES
    lower, title, upper = REPORT_MARKERS  # unrolled: this runs for every stored message
    return (
        raw.find(lower, 0, end) >= 0 or raw.find(title, 0, end) >= 0 or raw.find(upper, 0, end) >= 0
    )


def parse_dsn(raw: bytes) -> DeliveryReport | None:
    """The report ``raw`` carries, or None when it is no (readable) DSN. Never raises."""
    try:
        if not may_be_dsn(raw):
            return None
        return _parse(raw)
    except Exception:  # hostile input: whatever the parser trips on, it is no DSN for us
        return None


def _parse(raw: bytes) -> DeliveryReport | None:
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    if message.get_content_type() != "multipart/report":
        return None
    report_type = message.get_param("report-type") or ""
    if not isinstance(report_type, str) or report_type.strip().lower() != "delivery-status":
        return None
    status_part: email.message.Message | None = None
    original_id: str | None = None
    for part in _parts(message):
        content_type = part.get_content_type()
        if content_type in _DELIVERY_STATUS_TYPES and status_part is None:
            status_part = part
        elif original_id is None and content_type in _HEADER_TYPES + _MESSAGE_TYPES:
            original_id = _returned_message_id(part)
    if status_part is None:
        return None
    blocks = _status_blocks(status_part)
    if not blocks:
        return None
    per_message, per_recipient = blocks[0], blocks[1:]
    # A report without a per-message block starts with a recipient's fields.
    if _has_recipient(per_message):
        per_message, per_recipient = {}, blocks
    recipients = tuple(
        _recipient(block) for block in per_recipient[:MAX_RECIPIENTS] if _has_recipient(block)
    )
    envid = per_message.get("original-envelope-id")
    return DeliveryReport(
        reporting_mta=_typed_value(per_message.get("reporting-mta")),
        original_envelope_id=_xtext_decode(envid) if envid else None,
        recipients=recipients,
        original_message_id=original_id or _message_id(per_message.get("x-original-message-id")),
        referenced_message_ids=_references(message),
    )


def _parts(message: email.message.Message) -> Iterable[email.message.Message]:
    """The report's direct parts (a DSN is flat; nested reports are not looked into)."""
    payload = message.get_payload()
    if not isinstance(payload, list):
        return []
    return [p for p in payload if isinstance(p, email.message.Message)]


def _status_blocks(part: email.message.Message) -> list[dict[str, str]]:
    """The field blocks of the delivery-status part, each a dict of lower-case names."""
    payload = part.get_payload()
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if isinstance(payload, list):
        # The email package parsed message/delivery-status into one header-only message
        # per block, and other message/* types (the global form) into one message whose
        # body holds the blocks after the first: back to text, read as one.
        text = "\n\n".join(
            _block_text(block) for block in payload if isinstance(block, email.message.Message)
        )
        if cte in ("base64", "quoted-printable"):
            text = _transfer_decode(text, cte)
    else:
        data = part.get_payload(decode=True)
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(payload)
    return [b for b in (_block(_fields(chunk)) for chunk in _chunks(text)) if b]


def _unescape(value: str) -> str:
    """A header value of parsed bytes: its 8-bit bytes (kept as surrogates) as UTF-8."""
    try:
        return value.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return value


def _block_text(block: email.message.Message) -> str:
    lines = [f"{name}:{_unescape(str(value))}" for name, value in block.items()]
    # As bytes: a str payload would have its 8-bit characters replaced (no charset).
    body = block.get_payload(decode=True) if not block.is_multipart() else None
    if isinstance(body, bytes) and body.strip():
        lines += ["", body.decode("utf-8", "replace")]
    return "\n".join(lines)


def _transfer_decode(text: str, cte: str) -> str:
    if cte == "base64":
        data = base64.b64decode("".join(text.split()) + "===", validate=False)
    else:
        data = quopri.decodestring(text.encode("ascii", "replace"))
    return data.decode("utf-8", "replace")


def _chunks(text: str) -> list[str]:
    lines = _NEWLINES.split(text)
    chunks: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            chunks[-1].append(line)
        elif chunks[-1]:
            chunks.append([])
    return ["\n".join(c) for c in chunks if c]


def _fields(chunk: str) -> Iterable[tuple[str, str]]:
    name: str | None = None
    value: list[str] = []
    for line in chunk.split("\n"):
        if line[:1] in (" ", "\t") and name is not None:
            value.append(line)
            continue
        if name is not None:
            yield name, " ".join(value)
        head, sep, rest = line.partition(":")
        if sep and head and " " not in head.strip():
            name, value = head.strip(), [rest]
        else:
            name, value = None, []
    if name is not None:
        yield name, " ".join(value)


def _block(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    block: dict[str, str] = {}
    for name, value in items:
        key = name.strip().lower()
        # The first of a repeated field counts, as for headers.
        if key and key not in block:
            block[key] = _clean(value)
    return block


def _clean(value: str) -> str:
    text = _FOLD.sub(" ", value)
    text = " ".join(text.split())
    return text[:MAX_FIELD_CHARS]


def _has_recipient(block: dict[str, str]) -> bool:
    return "final-recipient" in block or "original-recipient" in block


def _recipient(block: dict[str, str]) -> DsnRecipient:
    action = block.get("action")
    status = block.get("status")
    if status is not None:
        # "5.1.1 (user unknown)": keep the code, RFC 3464 allows a comment after it.
        status = status.split(" ", 1)[0].split("(", 1)[0].strip() or None
        if status is not None and not _STATUS.match(status):
            status = None
    return DsnRecipient(
        final_recipient=_address(block.get("final-recipient")),
        original_recipient=_address(block.get("original-recipient")),
        action=action.split(" ", 1)[0].strip().lower() if action else None,
        status=status,
        diagnostic_code=block.get("diagnostic-code") or None,
        remote_mta=_host(block.get("remote-mta")),
    )


def _host(value: str | None) -> str | None:
    """``dns; mx.example.org. (a comment)`` -> ``mx.example.org``."""
    text = _typed_value(value)
    if text is None:
        return None
    return text.split()[0].rstrip(".") or None


def _typed_value(value: str | None) -> str | None:
    """``dns; mx.example.org`` -> ``mx.example.org`` (a value without a type as it is)."""
    if not value:
        return None
    kind, sep, rest = value.partition(";")
    text = (rest if sep else kind).strip()
    return text or None


def _address(value: str | None) -> str | None:
    """``rfc822; <bob@example.org>`` -> ``bob@example.org``."""
    text = _typed_value(value)
    if text is None:
        return None
    kind = value.partition(";")[0].strip().lower() if value and ";" in value else "rfc822"
    if kind == "utf-8" or kind == "rfc822":
        text = _xtext_decode(text) if kind == "utf-8" else text
    text = text.strip().strip("<>").strip()
    if "@" not in text or any(c.isspace() for c in text):
        return None
    return text


def _xtext_decode(text: str) -> str:
    """RFC 3461 xtext (``+2B`` for ``+``); also unwraps RFC 6533's ``\\x{...}``."""
    decoded = _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), text.strip())
    return re.sub(r"\\x\{([0-9A-Fa-f]{1,6})\}", lambda m: chr(int(m.group(1), 16)), decoded)


def _returned_message_id(part: email.message.Message) -> str | None:
    """The Message-ID of the returned message (a headers part or a whole message)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        returned = next((p for p in payload if isinstance(p, email.message.Message)), None)
        if returned is None:
            return None
        return _message_id(returned.get("message-id"))
    data = part.get_payload(decode=True)
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(payload)
    headers = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(text.lstrip())
    return _message_id(headers.get("message-id"))


def _message_id(value: object) -> str | None:
    if value is None:
        return None
    match = _MSG_ID.search(_FOLD.sub(" ", str(value)))
    return match.group(0) if match else None


def _references(message: email.message.Message) -> tuple[str, ...]:
    found: list[str] = []
    for name in ("in-reply-to", "references"):
        value = message.get(name)
        if value is None:
            continue
        ids = _MSG_ID.findall(_FOLD.sub(" ", str(value)))
        # References lists oldest first: the message replied to is the last one.
        for mid in ids if name == "in-reply-to" else reversed(ids):
            if mid not in found:
                found.append(mid)
    return tuple(found[:MAX_REFERENCES])
