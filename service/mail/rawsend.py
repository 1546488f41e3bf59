"""Validate a complete RFC 5322 message a caller wants sent as is (raw MIME send).

Mailroom does not rewrite such a message; it only makes it safe and deliverable:

- every line break becomes CRLF (no bare CR or LF can reach the server: SMTP smuggling),
  no NUL anywhere, no line over 998 octets;
- the header section is exactly ``Name: value`` fields (RFC 5322 ``ftext`` names) and
  their folded continuation lines: a line that is neither, which a receiver could read as
  the start of the body or as another header, is refused (``header_injection``);
- exactly one ``From`` with exactly one address, which must be the account's own;
- ``Message-ID`` (``<left@right>``) and ``Date`` are added at the top when missing, once
  each when present;
- ``To``/``Cc``/``Bcc`` addresses are checked as strictly as a composed message's; ``Bcc``
  fields are removed from the bytes and their addresses kept in the envelope;
- the envelope is ``To`` + ``Cc`` + ``Bcc``, or the recipients the caller gives.

Non-ASCII header text (RFC 6532) or a non-ASCII address needs SMTPUTF8; an 8-bit body
is announced with ``BODY=8BITMIME`` by the SMTP session.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email import policy as email_policy
from email.errors import HeaderParseError
from email.utils import format_datetime

from service.mail.addresses import Address, parse_address
from service.mail.compose import MAX_LINE_OCTETS, make_message_id
from service.mail.errors import MailErrorCode, MailInputError

_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+):")
_MESSAGE_ID = re.compile(
    r"<[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*>\Z"
)
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_ADDRESS_FIELDS = ("to", "cc", "bcc")
_ONCE = ("from", "sender", "to", "cc", "bcc", "subject", "message-id", "date", "reply-to")


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A raw message ready for the outbox."""

    data: bytes  # CRLF, Bcc removed, Message-ID and Date present
    mail_from: str
    recipients: tuple[str, ...]  # the envelope, each address once
    kinds: dict[str, str]  # envelope address -> "to", "cc" or "bcc"
    subject: str
    message_id: str
    smtputf8: bool
    # Display names in the To and Cc headers, by normalized address (those that have one).
    names: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Field:
    name: str  # lowercase
    lines: list[bytes]  # the field's lines, without their CRLF

    @property
    def raw_value(self) -> bytes:
        first = self.lines[0]
        return b"\r\n".join([first[first.index(b":") + 1 :], *self.lines[1:]])


def _fail(field: str, message: str, code: MailErrorCode) -> MailInputError:
    return MailInputError(field, message, code)


def prepare_raw(
    data: bytes,
    *,
    account_email: str,
    date: datetime,
    envelope: Sequence[str] | None = None,
) -> RawMessage:
    """Check ``data`` for the account ``account_email`` and return it ready to send.

    :raises MailInputError: ``header_injection``, ``invalid_header_name``,
        ``duplicate_header``, ``invalid_address``, ``invalid_message_id``,
        ``invalid_body``, ``too_long``, ``no_recipients`` or ``from_not_allowed``.
    """
    if b"\x00" in data:
        raise _fail("message", "NUL bytes are not allowed", MailErrorCode.INVALID_BODY)
    data = _LINE_BREAK.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        head, body = data[:-2], b""
    fields = _fields(head)
    if max(map(len, data.split(b"\r\n"))) > MAX_LINE_OCTETS:
        raise _fail(
            "message", f"a line is longer than {MAX_LINE_OCTETS} octets", MailErrorCode.TOO_LONG
        )
    utf8_headers = not head.isascii()
    if utf8_headers:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(
                "message",
                "header text that is not ASCII must be UTF-8 (RFC 6532)",
                MailErrorCode.HEADER_INJECTION,
            ) from exc
    by_name: dict[str, list[_Field]] = {}
    for item in fields:
        by_name.setdefault(item.name, []).append(item)
    for name in _ONCE:
        if len(by_name.get(name, [])) > 1:
            raise _fail(f"headers.{name}", "given more than once", MailErrorCode.DUPLICATE_HEADER)

    sender = _sender(by_name, account_email)
    parsed: dict[str, list[Address]] = {
        name: _addresses(by_name[name][0]) if name in by_name else [] for name in _ADDRESS_FIELDS
    }
    names = {
        address: name
        for header in ("cc", "to")
        if header in by_name
        for address, name in _display_names(by_name[header][0])
    }
    kinds: dict[str, str] = {}
    for name in _ADDRESS_FIELDS:
        for address in parsed[name]:
            kinds.setdefault(address.addr_spec, name)
    if envelope is not None:
        given = [parse_address(value, field=f"recipients[{i}]") for i, value in enumerate(envelope)]
        recipients = tuple(dict.fromkeys(a.addr_spec for a in given))
        kinds = {a: kinds.get(a, "bcc") for a in recipients}
        smtputf8_envelope = any(a.smtputf8 for a in given)
    else:
        every = [a for name in _ADDRESS_FIELDS for a in parsed[name]]
        recipients = tuple(dict.fromkeys(a.addr_spec for a in every))
        smtputf8_envelope = any(a.smtputf8 for a in every)
    if not recipients:
        raise _fail(
            "recipients",
            "no recipient: the message has no To, Cc or Bcc, and no recipients were given",
            MailErrorCode.NO_RECIPIENTS,
        )

    added: list[bytes] = []
    if "date" not in by_name:
        added.append(b"Date: " + format_datetime(date).encode("ascii"))
    if "message-id" in by_name:
        message_id = _text(by_name["message-id"][0]).strip()
        if not _MESSAGE_ID.match(message_id):
            raise _fail(
                "headers.message-id",
                "must be <left@right> made of dot-atoms",
                MailErrorCode.INVALID_MESSAGE_ID,
            )
    else:
        message_id = make_message_id(sender.domain)
        added.append(b"Message-ID: " + message_id.encode("ascii"))
    kept = [line for item in fields if item.name != "bcc" for line in item.lines]
    new_head = b"\r\n".join([*added, *kept])
    out = new_head + b"\r\n\r\n" + body if separator else new_head + b"\r\n"
    subject = _decoded(by_name["subject"][0]) if "subject" in by_name else ""
    return RawMessage(
        data=out,
        mail_from=sender.addr_spec,
        recipients=recipients,
        kinds=kinds,
        subject=subject,
        message_id=message_id,
        smtputf8=utf8_headers or smtputf8_envelope or sender.smtputf8,
        names=names,
    )


def _fields(head: bytes) -> list[_Field]:
    fields: list[_Field] = []
    for number, line in enumerate(head.split(b"\r\n"), start=1):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise _fail(
                    "message",
                    "the first line is a continuation line, not a header field",
                    MailErrorCode.HEADER_INJECTION,
                )
            if not line.strip():
                raise _fail(
                    "message",
                    f"header line {number} is only whitespace (it would end the header"
                    " section for some readers)",
                    MailErrorCode.HEADER_INJECTION,
                )
            fields[-1].lines.append(line)
            continue
        match = _FIELD.match(line)
        if match is None:
            raise _fail(
                "message",
                f"header line {number} is not `Name: value` nor a folded continuation",
                MailErrorCode.HEADER_INJECTION
                if b":" not in line
                else MailErrorCode.INVALID_HEADER_NAME,
            )
        fields.append(_Field(match.group(1).decode("ascii").lower(), [line]))
    if not fields:
        raise _fail("message", "the message has no header fields", MailErrorCode.HEADER_INJECTION)
    return fields


def _text(item: _Field) -> str:
    """The field's value unfolded, as text."""
    value = item.raw_value.decode("utf-8", "replace")
    return re.sub(r"\r\n(?=[ \t])", "", value).strip()


def _header(item: _Field) -> object:
    try:
        return email_policy.SMTPUTF8.header_factory(item.name, _text(item))
    except (HeaderParseError, IndexError, ValueError) as exc:
        raise _fail(
            f"headers.{item.name}", f"cannot be read: {exc}", MailErrorCode.INVALID_ADDRESS
        ) from exc


def _decoded(item: _Field) -> str:
    return str(_header(item))


def _addresses(item: _Field) -> list[Address]:
    header = _header(item)
    field = f"headers.{item.name}"
    if getattr(header, "defects", None):
        defect = header.defects[0]  # type: ignore[attr-defined]
        raise _fail(field, f"not a valid address list: {defect}", MailErrorCode.INVALID_ADDRESS)
    found: list[Address] = []
    for index, mailbox in enumerate(getattr(header, "addresses", ())):
        found.append(parse_address(mailbox.addr_spec, field=f"{field}[{index}]"))
    return found


def _display_names(item: _Field) -> list[tuple[str, str]]:
    """(normalized address, display name) of the mailboxes of a checked address field
    that have a name."""
    found = []
    for mailbox in getattr(_header(item), "addresses", ()):
        if mailbox.display_name:
            found.append((parse_address(mailbox.addr_spec).addr_spec, mailbox.display_name))
    return found


def _sender(by_name: dict[str, list[_Field]], account_email: str) -> Address:
    if "from" not in by_name:
        raise _fail("headers.from", "a From header is required", MailErrorCode.FROM_NOT_ALLOWED)
    addresses = _addresses(by_name["from"][0])
    if len(addresses) != 1:
        raise _fail(
            "headers.from", "From must name exactly one address", MailErrorCode.FROM_NOT_ALLOWED
        )
    [sender] = addresses
    own = parse_address(account_email, field="from")
    if sender.addr_spec != own.addr_spec:
        raise _fail(
            "headers.from",
            f"{sender.addr_spec} is not this account's address ({own.addr_spec})",
            MailErrorCode.FROM_NOT_ALLOWED,
        )
    return sender
