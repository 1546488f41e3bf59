"""Errors of the mail composition layer.

Hierarchy::

    ValueError
    └── MailInputError          one rejected input; ``field``, ``message``, ``code``

``code`` is a :class:`MailErrorCode` (a ``str``), stable across releases: the service layer
translates a ``MailInputError`` into ``service.errors.Invalid`` with that code and a
``FieldError(field, message)``. Nothing in this package strips or repairs input: anything
that is not exactly acceptable is refused, so what the caller sees is what is sent.
"""

from __future__ import annotations

from enum import StrEnum


class MailErrorCode(StrEnum):
    """Stable machine-readable reasons for rejecting mail input."""

    INVALID_ADDRESS = "invalid_address"  # not exactly one plain addr-spec
    INVALID_DISPLAY_NAME = "invalid_display_name"  # e.g. bidi override characters
    HEADER_INJECTION = "header_injection"  # CR, LF, NUL, line separators, controls
    INVALID_HEADER_NAME = "invalid_header_name"  # not RFC 5322 ftext
    PROTECTED_HEADER = "protected_header"  # Mailroom sets it, or it must never be set
    DUPLICATE_HEADER = "duplicate_header"  # same name twice, ignoring case
    TOO_LONG = "too_long"  # over a length limit of this package
    TOO_MANY = "too_many"  # over a count limit of this package
    NO_RECIPIENTS = "no_recipients"  # to, cc and bcc are all empty
    INVALID_ATTACHMENT = "invalid_attachment"  # filename or content type
    INVALID_BODY = "invalid_body"  # NUL or unencodable characters in text/html
    INVALID_MESSAGE_ID = "invalid_message_id"  # not ``<left@right>``
    INVALID_DATE = "invalid_date"  # naive datetime
    FROM_NOT_ALLOWED = "from_not_allowed"  # a raw message's From is not the account's


class MailInputError(ValueError):
    """One input field was rejected; ``field`` is a dotted path such as ``to[2]``."""

    def __init__(self, field: str, message: str, code: MailErrorCode) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code = code
