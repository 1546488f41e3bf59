"""Validation of header-bound text: extra header names and values, subjects.

Rules, all refusals (never repairs):

- A header *name* is 1 to :data:`MAX_HEADER_NAME_CHARS` characters of RFC 5322 ``ftext``
  (printable US-ASCII except the colon).
- A header *value* (and a subject, and a display name) may not contain CR, LF, NUL, any
  other C0/C1 control character (TAB and DEL included; U+0085 NEL is a C1 control), the
  Unicode line and paragraph separators U+2028/U+2029, or lone surrogates. Mail software
  and the parsers of the next hop turn each of these into a line break or a truncation,
  which is how a header (or a whole message) is injected.
- Callers cannot set the headers Mailroom writes itself, trace headers a receiving
  system adds, MIME structure headers, or authentication results: see
  :data:`PROTECTED_HEADERS` and :data:`PROTECTED_HEADER_PREFIXES`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping

from service.mail.errors import MailErrorCode, MailInputError

MAX_HEADER_NAME_CHARS = 76
"""A field name plus ``": "`` must fit a 78-character line (RFC 5322 section 2.1.1)."""

MAX_HEADER_VALUE_CHARS = 998
"""Longest extra header value or subject, in characters (one unfolded RFC 5322 line)."""

MAX_EXTRA_HEADERS = 50
"""Most extra headers one message may carry."""

PROTECTED_HEADERS: frozenset[str] = frozenset(
    {
        # Written by Mailroom from the request's own fields; a second copy would let a
        # caller contradict the envelope or the fields shown to the recipient.
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "orig-date",
        "message-id",
        # MIME structure is generated; a caller's copy could re-frame the body.
        "mime-version",
        # Trace and delivery headers belong to the systems that handle the message.
        "received",
        "return-path",
        "delivered-to",
        "x-original-to",
        "apparently-to",
        "envelope-to",
        "received-spf",
        "authentication-results",
        # Signatures are made over the final message by the submission server.
        "dkim-signature",
        "domainkey-signature",
    }
)
"""Header names (lowercase) a caller may never set."""

PROTECTED_HEADER_PREFIXES: tuple[str, ...] = (
    "content-",  # Content-Type, Content-Transfer-Encoding, Content-Disposition, ...
    "resent-",  # Resent-* blocks change which headers define sender and recipients
    "arc-",  # ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results
)
"""Lowercase prefixes of header names a caller may never set."""

_LINE_SEPARATOR_CATEGORIES = frozenset({"Zl", "Zp"})  # U+2028, U+2029
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs"}) | _LINE_SEPARATOR_CATEGORIES


def first_forbidden_char(text: str) -> int | None:
    """Index of the first character not allowed in header-bound text, or ``None``.

    Forbidden: control characters (C0, DEL, C1 including U+0085), lone surrogates and the
    Unicode line/paragraph separators.
    """
    # Fast path: printable ASCII is the common case and needs no per-character lookup.
    if text.isascii():
        if text.isprintable():
            return None
        return next(i for i, ch in enumerate(text) if not ch.isprintable())
    for index, char in enumerate(text):
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            return index
    return None


def describe_char(char: str) -> str:
    """A readable name for a character in an error message (``U+000A LINE FEED``)."""
    name = unicodedata.name(char, "")
    if not name and char in "\r\n\t\x00":
        name = {"\r": "CARRIAGE RETURN", "\n": "LINE FEED", "\t": "TAB", "\x00": "NUL"}[char]
    return f"U+{ord(char):04X}" + (f" {name}" if name else "")


def validate_header_text(value: str, *, field: str, max_chars: int) -> str:
    """Check text that ends up in a header (value, subject, name); return it unchanged.

    :raises MailInputError: ``header_injection`` for a forbidden character, ``too_long``.
    """
    bad = first_forbidden_char(value)
    if bad is not None:
        raise MailInputError(
            field,
            f"{describe_char(value[bad])} at position {bad} is not allowed in a header",
            MailErrorCode.HEADER_INJECTION,
        )
    if len(value) > max_chars:
        raise MailInputError(field, f"longer than {max_chars} characters", MailErrorCode.TOO_LONG)
    return value


def validate_header_value(value: str, *, field: str) -> str:
    """Validate an extra header's value; return it unchanged.

    :raises MailInputError: ``header_injection`` or ``too_long``.
    """
    return validate_header_text(value, field=field, max_chars=MAX_HEADER_VALUE_CHARS)


def validate_subject(value: str, *, field: str = "subject") -> str:
    """Validate a subject line; return it unchanged. Same rules as a header value."""
    return validate_header_text(value, field=field, max_chars=MAX_HEADER_VALUE_CHARS)


def is_protected_header(name: str) -> bool:
    """Whether callers are forbidden to set the header ``name`` (case-insensitive)."""
    lowered = name.lower()
    return lowered in PROTECTED_HEADERS or lowered.startswith(PROTECTED_HEADER_PREFIXES)


def validate_header_name(name: str, *, field: str) -> str:
    """Validate an extra header's name (RFC 5322 ``ftext``, not protected); return it.

    :raises MailInputError: ``invalid_header_name``, ``too_long`` or ``protected_header``.
    """
    if not name:
        raise MailInputError(field, "header name is empty", MailErrorCode.INVALID_HEADER_NAME)
    if len(name) > MAX_HEADER_NAME_CHARS:
        raise MailInputError(
            field,
            f"header name longer than {MAX_HEADER_NAME_CHARS} characters",
            MailErrorCode.TOO_LONG,
        )
    for index, char in enumerate(name):
        # ftext = %d33-57 / %d59-126: printable ASCII except ":" (no space either).
        if not ("!" <= char <= "~") or char == ":":
            raise MailInputError(
                field,
                f"{describe_char(char)} at position {index} is not allowed in a header name",
                MailErrorCode.INVALID_HEADER_NAME,
            )
    if is_protected_header(name):
        raise MailInputError(
            field, f"the {name} header cannot be set by callers", MailErrorCode.PROTECTED_HEADER
        )
    return name


def validate_extra_headers(
    headers: Mapping[str, str], *, field: str = "headers"
) -> tuple[tuple[str, str], ...]:
    """Validate a caller's extra headers; return ``(name, value)`` pairs in order.

    :raises MailInputError: for the first offending header; ``field`` is ``headers.NAME``.
    """
    if len(headers) > MAX_EXTRA_HEADERS:
        raise MailInputError(
            field, f"more than {MAX_EXTRA_HEADERS} extra headers", MailErrorCode.TOO_MANY
        )
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for index, (name, value) in enumerate(headers.items()):
        # Echo the name in the field path only when it is harmless to print.
        printable = name.isascii() and name.isprintable() and len(name) <= MAX_HEADER_NAME_CHARS
        item_field = f"{field}.{name}" if printable else f"{field}[{index}]"
        validate_header_name(name, field=item_field)
        lowered = name.lower()
        if lowered in seen:
            raise MailInputError(
                item_field,
                f"the {name} header is given twice (names are case-insensitive)",
                MailErrorCode.DUPLICATE_HEADER,
            )
        seen.add(lowered)
        validate_header_value(value, field=item_field)
        pairs.append((name, value))
    return tuple(pairs)
