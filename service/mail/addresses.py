"""Strict validation of mail addresses and display names.

An address is exactly one RFC 5321 ``Mailbox`` written as a plain addr-spec,
``local-part@domain``, and nothing else:

- the local part is a dot-atom (RFC 5322 ``atext`` runs joined by single dots); non-ASCII
  letters are allowed (RFC 6531/6532) and make the message need SMTPUTF8. Quoted-string
  local parts, comments, display names, angle brackets, lists, whitespace and control
  characters are refused: permissive parsers (``email.utils.parseaddr``, and aiosmtplib
  on top of it) silently rewrite such input into some *other* address.
- the domain is a host name of LDH labels; a non-ASCII (internationalised) domain is
  converted to its A-label form with IDNA 2008 + UTS 46, so it never needs SMTPUTF8.
  Address literals (``[192.0.2.1]``) and trailing dots are refused.
- limits are RFC 5321 section 4.5.3.1: local part 64 octets, domain 255 octets, the
  whole address 254 octets (a 256-octet path minus its angle brackets).

Display names may be any text except line breaks, control characters and the bidi
embedding/override/isolate controls that reorder how an address is displayed.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import idna

from service.mail.errors import MailErrorCode, MailInputError
from service.mail.headers import describe_char, first_forbidden_char

MAX_LOCAL_PART_OCTETS = 64
MAX_DOMAIN_OCTETS = 255
MAX_ADDRESS_OCTETS = 254
MAX_LABEL_OCTETS = 63
MAX_DISPLAY_NAME_CHARS = 256

_ASCII_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
# Bidi embedding, override and isolate controls: they make "moc.evil@bank" display as an
# address it is not. Marks like U+200E/U+200F are harmless and stay allowed in names.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Characters people paste by mistake, with a precise reason to give back.
_HINTS = {
    "<": "angle brackets and display names are not accepted; send the bare address",
    ">": "angle brackets and display names are not accepted; send the bare address",
    '"': "quoted local parts are not accepted",
    "(": "comments are not accepted in an address",
    ")": "comments are not accepted in an address",
    "[": "address literals are not accepted; use a domain name",
    "]": "address literals are not accepted; use a domain name",
    ":": "group syntax and source routes are not accepted",
    "\\": "quoted characters are not accepted",
    ",": "exactly one address is accepted per field, not a list",
    ";": "exactly one address is accepted per field, not a list",
}


@dataclass(frozen=True, slots=True)
class Address:
    """A validated address: ``addr_spec`` is what goes on the wire and in headers."""

    local_part: str  # NFC-normalised, case preserved (local parts are case-sensitive)
    domain: str  # lowercase A-label form (ASCII)
    smtputf8: bool  # the local part has non-ASCII characters

    @property
    def addr_spec(self) -> str:
        """``local@domain``, the normalized address."""
        return f"{self.local_part}@{self.domain}"

    def __str__(self) -> str:
        return self.addr_spec


def _fail(field: str, message: str) -> MailInputError:
    return MailInputError(field, message, MailErrorCode.INVALID_ADDRESS)


def _check_characters(value: str, field: str) -> None:
    """Refuse whitespace, controls and syntax that would make this more than an addr-spec."""
    bad = first_forbidden_char(value)
    if bad is not None:
        raise _fail(field, f"{describe_char(value[bad])} is not allowed in an address")
    # Syntax characters first: they say best what the caller tried ("Name <a@b>").
    for char, hint in _HINTS.items():
        if char in value:
            raise _fail(field, hint)
    for char in value:
        if char.isspace():
            raise _fail(field, f"whitespace ({describe_char(char)}) is not allowed in an address")
        if char in _BIDI_CONTROLS:
            raise _fail(field, f"{describe_char(char)} is not allowed in an address")


def _validate_local_part(local: str, field: str) -> tuple[str, bool]:
    """Return the NFC local part and whether it is non-ASCII."""
    if not local:
        raise _fail(field, "the local part (before @) is empty")
    smtputf8 = not local.isascii()
    if smtputf8:
        # RFC 6532 section 3.1: UTF-8 text in mail should be in NFC.
        local = unicodedata.normalize("NFC", local)
    for atom in local.split("."):
        if not atom:
            raise _fail(field, "the local part has a leading, trailing or doubled dot")
        for char in atom:
            if char in _ASCII_ATEXT:
                continue
            # Non-ASCII: letters, marks, digits, punctuation and symbols; never format,
            # control, unassigned or private-use characters, or separators.
            if char.isascii() or unicodedata.category(char)[0] in "CZ":
                raise _fail(field, f"{describe_char(char)} is not allowed in the local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART_OCTETS:
        raise _fail(field, f"the local part is longer than {MAX_LOCAL_PART_OCTETS} octets")
    return local, smtputf8


def _validate_domain(domain: str, field: str) -> str:
    """Return the lowercase A-label form of ``domain``."""
    if not domain:
        raise _fail(field, "the domain (after @) is empty")
    if domain.isascii():
        ascii_domain = domain.lower()
    else:
        try:
            # UTS 46 maps case and width variants, then IDNA 2008 validates the labels.
            ascii_domain = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise _fail(field, f"the domain is not a valid internationalised name: {exc}") from exc
    labels = ascii_domain.split(".")
    for label in labels:
        if not label:
            raise _fail(field, "the domain has an empty label (leading, trailing or doubled dot)")
        if len(label) > MAX_LABEL_OCTETS:
            raise _fail(field, f"a domain label is longer than {MAX_LABEL_OCTETS} octets")
        if not _LDH_LABEL.match(label):
            raise _fail(
                field,
                f"domain label {label!r} must be letters, digits and inner hyphens",
            )
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError) as exc:
                raise _fail(field, f"domain label {label!r} is not a valid A-label") from exc
    if labels[-1].isdigit():
        # RFC 3696 section 2: a top-level domain is never all-numeric; this also keeps
        # bare IPv4 addresses out.
        raise _fail(field, "the top-level domain cannot be all digits")
    if len(ascii_domain) > MAX_DOMAIN_OCTETS:
        raise _fail(field, f"the domain is longer than {MAX_DOMAIN_OCTETS} octets")
    return ascii_domain


def parse_address(value: str, *, field: str = "address") -> Address:
    """Validate one plain addr-spec and return it normalized.

    Normalization: the domain is lowercased and IDNA-encoded, a non-ASCII local part is
    put in NFC. Nothing is stripped: surrounding whitespace is an error.

    :raises MailInputError: code ``invalid_address`` with a message saying why.
    """
    if not isinstance(value, str):
        raise _fail(field, "an address must be a string")
    if not value:
        raise _fail(field, "the address is empty")
    _check_characters(value, field)
    local, sep, domain = value.rpartition("@")
    if not sep:
        raise _fail(field, "an address needs an @ between local part and domain")
    if "@" in local:
        raise _fail(field, "an address has exactly one @")
    local, smtputf8 = _validate_local_part(local, field)
    ascii_domain = _validate_domain(domain, field)
    address = Address(local_part=local, domain=ascii_domain, smtputf8=smtputf8)
    if len(address.addr_spec.encode("utf-8")) > MAX_ADDRESS_OCTETS:
        raise _fail(field, f"the address is longer than {MAX_ADDRESS_OCTETS} octets")
    return address


# Specials that may not appear in an unquoted display name of the ``Name <addr>`` form
# (``.`` is allowed, as RFC 5322's obsolete phrase syntax and every mail client do).
_NAME_SPECIALS = frozenset('()<>[]:;@\\,"')


def parse_mailbox(value: str, *, field: str = "address") -> tuple[Address, str | None]:
    """Validate one recipient given as text: a plain addr-spec, or strictly ``Name <addr>``.

    The name form is one display name, one space, then the address in angle brackets,
    nothing after it. The name is either words (no RFC 5322 specials but ``.``) separated
    by single spaces, or one double-quoted string without ``"`` or ``\\`` inside (no
    escapes). ``<addr>`` alone is the address without a name. Anything else, comments,
    groups, several addresses, is refused with the reason.

    :raises MailInputError: ``invalid_address``, or the display name's own codes
        (``header_injection``, ``invalid_display_name``, ``too_long``).
    """
    if isinstance(value, str) and "<" in value and not value.endswith(">"):
        raise _fail(field, "write `Name <address>` with nothing after the >, or the bare address")
    if not isinstance(value, str) or not value.endswith(">") or "<" not in value:
        return parse_address(value, field=field), None
    head, _, inner = value[:-1].rpartition("<")
    address = parse_address(inner, field=field)
    if not head:
        return address, None
    if not head.endswith(" ") or head.endswith("  "):
        raise _fail(field, "write a name, one space, then <address>")
    name = validate_display_name(head[:-1], field=field)
    if len(name) >= 2 and name.startswith('"') and name.endswith('"'):
        name = name[1:-1]
        if '"' in name or "\\" in name:
            raise _fail(field, 'a quoted name cannot contain " or \\ (no escapes)')
    else:
        for char in name:
            if char in _NAME_SPECIALS:
                raise _fail(
                    field,
                    f"{describe_char(char)} in a name: put the name in double quotes,"
                    ' or give {"address", "name"}',
                )
        if name != name.strip() or "  " in name:
            raise _fail(field, "a name has no leading, trailing or doubled spaces")
    return address, (name or None)


def normalize_address(value: str, *, field: str = "address") -> tuple[str, bool]:
    """``(normalized addr-spec, needs SMTPUTF8)`` for one address; see :func:`parse_address`."""
    address = parse_address(value, field=field)
    return address.addr_spec, address.smtputf8


def normalize_domain(value: str, *, field: str = "domain") -> str:
    """Validate a bare domain name and return its lowercase A-label form.

    :raises MailInputError: code ``invalid_address``.
    """
    _check_characters(value, field)
    if "@" in value:
        raise _fail(field, "a domain has no @")
    return _validate_domain(value, field)


def validate_display_name(value: str, *, field: str = "name") -> str:
    """Validate a display name; return it unchanged (the composer quotes/encodes it).

    Specials such as ``<``, ``,`` or ``"`` are fine: the name is quoted or RFC 2047-encoded
    as one phrase. (Whitespace around a name is folding whitespace to mail parsers and
    may not survive, as in any header.)

    :raises MailInputError: ``header_injection`` for line breaks and control characters,
        ``invalid_display_name`` for bidi controls, ``too_long``.
    """
    bad = first_forbidden_char(value)
    if bad is not None:
        raise MailInputError(
            field,
            f"{describe_char(value[bad])} at position {bad} is not allowed in a name",
            MailErrorCode.HEADER_INJECTION,
        )
    for index, char in enumerate(value):
        if char in _BIDI_CONTROLS:
            raise MailInputError(
                field,
                f"{describe_char(char)} at position {index} is not allowed in a name",
                MailErrorCode.INVALID_DISPLAY_NAME,
            )
    if len(value) > MAX_DISPLAY_NAME_CHARS:
        raise MailInputError(
            field, f"longer than {MAX_DISPLAY_NAME_CHARS} characters", MailErrorCode.TOO_LONG
        )
    return value
