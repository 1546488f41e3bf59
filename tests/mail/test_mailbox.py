"""Recipients as ``Name <addr>`` text or name/address pairs: strict parsing, encoding."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

import pytest

from service.mail import Draft, Mailbox, MailErrorCode, MailInputError, compose
from service.mail.addresses import parse_mailbox

DATE = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def draft(**overrides: object) -> Draft:
    values: dict[str, object] = {
        "from_address": "alice@example.com",
        "to": ["bob@example.org"],
        "subject": "Hi",
        "message_id": "<1@example.com>",
        "date": DATE,
        "text": "hello\n",
    }
    values.update(overrides)
    return Draft(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "address", "name"),
    [
        ("bob@example.org", "bob@example.org", None),
        ("Bob <bob@example.org>", "bob@example.org", "Bob"),
        ("Bob Müller <bob@Example.ORG>", "bob@example.org", "Bob Müller"),
        ('"Müller, Bob" <bob@example.org>', "bob@example.org", "Müller, Bob"),
        ("Dr. Bob <bob@example.org>", "bob@example.org", "Dr. Bob"),
        ("<bob@example.org>", "bob@example.org", None),
    ],
)
def test_accepted_forms(text: str, address: str, name: str | None) -> None:
    parsed, parsed_name = parse_mailbox(text, field="to[0]")
    assert parsed.addr_spec == address
    assert parsed_name == name


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Bob <bob@example.org>, Eve <eve@example.org>", MailErrorCode.INVALID_ADDRESS),
        ("bob@example.org, eve@example.org", MailErrorCode.INVALID_ADDRESS),
        ("Müller, Bob <bob@example.org>", MailErrorCode.INVALID_ADDRESS),
        ('"Bob \\" x" <bob@example.org>', MailErrorCode.INVALID_ADDRESS),
        ("Bob<bob@example.org>", MailErrorCode.INVALID_ADDRESS),
        ("Bob  <bob@example.org>", MailErrorCode.INVALID_ADDRESS),
        ("Bob <bob@example.org> x", MailErrorCode.INVALID_ADDRESS),
        ("Bob (comment) <bob@example.org>", MailErrorCode.INVALID_ADDRESS),
        ("Bob <Bob <bob@example.org>>", MailErrorCode.INVALID_ADDRESS),
        ("Bob\r\nBcc: eve@example.org <bob@example.org>", MailErrorCode.HEADER_INJECTION),
        ("Bob\u202e <bob@example.org>", MailErrorCode.INVALID_DISPLAY_NAME),
        ("Bob <bob@example.org\r\n>", MailErrorCode.INVALID_ADDRESS),
    ],
)
def test_refused_forms(text: str, code: MailErrorCode) -> None:
    with pytest.raises(MailInputError) as caught:
        parse_mailbox(text, field="to[0]")
    assert caught.value.code is code
    assert caught.value.field == "to[0]"


def test_names_reach_the_headers_encoded_and_bcc_names_never_do() -> None:
    composed = compose(
        draft(
            to=["Bob Müller <bob@example.org>", Mailbox("carol@example.org", "Carol, Jr.")],
            cc=[Mailbox("dave@example.org", None), '"Eve E." <eve@example.org>'],
            bcc=[Mailbox("zed@example.org", "Secret Zed")],
            reply_to=Mailbox("help@example.com", "Help Desk"),
        )
    )
    assert composed.recipients == (
        "bob@example.org",
        "carol@example.org",
        "dave@example.org",
        "eve@example.org",
        "zed@example.org",
    )
    assert not composed.smtputf8
    assert composed.data.isascii()
    assert b"=?utf-8?" in composed.data  # the non-ASCII name as an RFC 2047 word
    assert b"Secret Zed" not in composed.data and b"zed@" not in composed.data
    parsed = email.message_from_bytes(composed.data, policy=email.policy.default)
    to = parsed["To"].addresses
    assert [(a.display_name, a.addr_spec) for a in to] == [
        ("Bob Müller", "bob@example.org"),
        ("Carol, Jr.", "carol@example.org"),
    ]
    cc = parsed["Cc"].addresses
    assert [(a.display_name, a.addr_spec) for a in cc] == [
        ("", "dave@example.org"),
        ("Eve E.", "eve@example.org"),
    ]
    assert parsed["Reply-To"].addresses[0].display_name == "Help Desk"


def test_bare_addresses_compose_exactly_as_before() -> None:
    plain = compose(draft(to=["bob@example.org"], cc=["carol@example.org"]))
    boxed = compose(draft(to=[Mailbox("bob@example.org")], cc=["<carol@example.org>"]))
    assert plain.data == boxed.data
    assert b"To: bob@example.org\r\nCc: carol@example.org\r\n" in plain.data


def test_name_injection_through_a_mailbox_is_refused() -> None:
    with pytest.raises(MailInputError) as caught:
        compose(draft(to=[Mailbox("bob@example.org", "Bob\r\nBcc: eve@example.org")]))
    assert caught.value.code is MailErrorCode.HEADER_INJECTION
    assert caught.value.field == "to[0].name"


def test_non_ascii_local_part_needs_smtputf8_and_keeps_the_name() -> None:
    composed = compose(draft(to=["José Núñez <josé@example.org>"]))
    assert composed.smtputf8
    assert "José Núñez <josé@example.org>".encode() in composed.data
