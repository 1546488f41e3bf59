"""Mail as data, no I/O. Outgoing: address and header validation, MIME composition.

(``parse.py``, the reading side for retrieved mail, lives here too and is imported from
its own module.)

Public API::

    parse_address(value, *, field) -> Address            strict single addr-spec
    normalize_address(value, *, field) -> (str, bool)    (address, needs SMTPUTF8)
    validate_display_name(value, *, field) -> str
    validate_subject(value, *, field) -> str
    validate_extra_headers(mapping, *, field) -> tuple[(name, value), ...]
    is_protected_header(name) -> bool
    compose(Draft) -> ComposedMessage                    exact bytes + envelope
    make_message_id(domain) -> str

Every refusal is a :class:`MailInputError` with a stable :class:`MailErrorCode`.
"""

from service.mail.addresses import (
    Address,
    normalize_address,
    normalize_domain,
    parse_address,
    validate_display_name,
)
from service.mail.compose import (
    Attachment,
    ComposedMessage,
    Draft,
    Mailbox,
    compose,
    make_message_id,
)
from service.mail.errors import MailErrorCode, MailInputError
from service.mail.headers import (
    PROTECTED_HEADER_PREFIXES,
    PROTECTED_HEADERS,
    is_protected_header,
    validate_extra_headers,
    validate_header_name,
    validate_header_value,
    validate_subject,
)

__all__ = [
    "PROTECTED_HEADERS",
    "PROTECTED_HEADER_PREFIXES",
    "Address",
    "Attachment",
    "ComposedMessage",
    "Draft",
    "MailErrorCode",
    "MailInputError",
    "Mailbox",
    "compose",
    "is_protected_header",
    "make_message_id",
    "normalize_address",
    "normalize_domain",
    "parse_address",
    "validate_display_name",
    "validate_extra_headers",
    "validate_header_name",
    "validate_header_value",
    "validate_subject",
]
