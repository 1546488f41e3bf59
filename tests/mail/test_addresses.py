"""Strict addr-spec validation: exactly one plain address, normalized, nothing stripped."""

from __future__ import annotations

import email.utils
from email.headerregistry import Address as StdlibAddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.mail import MailErrorCode, MailInputError, normalize_domain, parse_address
from service.mail.addresses import (
    MAX_ADDRESS_OCTETS,
    MAX_DISPLAY_NAME_CHARS,
    MAX_DOMAIN_OCTETS,
    MAX_LABEL_OCTETS,
    MAX_LOCAL_PART_OCTETS,
    normalize_address,
    validate_display_name,
)


@pytest.mark.parametrize(
    ("given_address", "expected", "smtputf8"),
    [
        ("user@example.com", "user@example.com", False),
        ("first.last+tag@sub.example.co.uk", "first.last+tag@sub.example.co.uk", False),
        ("o'brien@example.ie", "o'brien@example.ie", False),
        ("!#$%&'*+-/=?^_`{|}~@example.com", "!#$%&'*+-/=?^_`{|}~@example.com", False),
        # Local parts are case-sensitive (RFC 5321 section 2.4); domains are not.
        ("MixedCase@EXAMPLE.Com", "MixedCase@example.com", False),
        ("user@localhost", "user@localhost", False),
        # IDNA 2008 + UTS 46: the domain goes to A-labels and needs no SMTPUTF8.
        ("user@bücher.example", "user@xn--bcher-kva.example", False),
        ("user@Bücher.Example", "user@xn--bcher-kva.example", False),
        ("user@faß.de", "user@xn--fa-hia.de", False),
        # Fullwidth letters map to ASCII under UTS 46.
        ("user@\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.com", "user@example.com", False),
        ("user@xn--bcher-kva.example", "user@xn--bcher-kva.example", False),
        # Non-ASCII local parts need SMTPUTF8 and are put in NFC.
        ("josé@example.com", "josé@example.com", True),
        ("jose\u0301@example.com", "jos\u00e9@example.com", True),
        ("δοκιμή@παράδειγμα.δοκιμή", "δοκιμή@xn--hxajbheg2az3al.xn--jxalpdlp", True),
        ("用户@例子.广告", "用户@xn--fsqu00a.xn--4rr70v", True),
    ],
)
def test_valid_addresses_are_normalized(given_address: str, expected: str, smtputf8: bool) -> None:
    address = parse_address(given_address, field="to[0]")
    assert address.addr_spec == expected
    assert str(address) == expected
    assert address.smtputf8 is smtputf8
    assert normalize_address(given_address) == (expected, smtputf8)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        (" user@example.com", "whitespace"),
        ("user@example.com ", "whitespace"),
        ("us er@example.com", "whitespace"),
        ("user@example.com\t", "TAB"),
        ("user@example.com\u00a0", "whitespace"),
        ("Name <user@example.com>", "angle brackets"),
        ("<user@example.com>", "angle brackets"),
        ("a@example.com, b@example.com", "not a list"),
        ("a@example.com,b@example.com", "not a list"),
        ("a@example.com;b@example.com", "not a list"),
        ('"quoted"@example.com', "quoted local parts"),
        ('"a@b"@example.com', "quoted local parts"),
        ("user(comment)@example.com", "comments"),
        ("user@example.com(comment)", "comments"),
        ("user\\@example.com", "quoted characters"),
        ("group: user@example.com;", "group syntax"),
        ("@relay.example:user@example.com", "group syntax"),
        ("user@[192.0.2.1]", "address literals"),
        ("user@[IPv6:2001:db8::1]", "address literals"),
        ("user@192.0.2.1", "all digits"),
        ("user@example.com\r\nBcc: victim@example.net", "CARRIAGE RETURN"),
        ("user\n@example.com", "LINE FEED"),
        ("user@exa\x00mple.com", "NUL"),
        ("user@example.com\u2028", "LINE SEPARATOR"),
        ("user\u2029@example.com", "PARAGRAPH SEPARATOR"),
        ("user\u0085@example.com", "U+0085"),
        ("user\x1b@example.com", "U+001B"),
        ("user\x7f@example.com", "U+007F"),
        ("user\u202e@example.com", "RIGHT-TO-LEFT OVERRIDE"),
        ("us\u200ber@example.com", "ZERO WIDTH SPACE"),
        ("user", "needs an @"),
        ("user@", "domain (after @) is empty"),
        ("@example.com", "local part (before @) is empty"),
        ("user@@example.com", "exactly one @"),
        ("a@b@example.com", "exactly one @"),
        (".user@example.com", "dot"),
        ("user.@example.com", "dot"),
        ("us..er@example.com", "dot"),
        ("user@example..com", "empty label"),
        ("user@.example.com", "empty label"),
        ("user@example.com.", "empty label"),
        ("user@-example.com", "inner hyphens"),
        ("user@example-.com", "inner hyphens"),
        ("user@exa_mple.com", "inner hyphens"),
        ("user@xn--a.com", "A-label"),
        ("user@exa mple.com", "whitespace"),
        ("user@bü cher.example", "whitespace"),
        ("user@\u2488.example", "internationalised"),
    ],
)
def test_anything_but_one_plain_addr_spec_is_refused(value: str, reason: str) -> None:
    with pytest.raises(MailInputError) as caught:
        parse_address(value, field="cc[3]")
    assert caught.value.code is MailErrorCode.INVALID_ADDRESS
    assert caught.value.field == "cc[3]"
    assert reason in caught.value.message


def test_local_part_limit_is_64_octets_counted_in_utf8() -> None:
    assert parse_address("a" * MAX_LOCAL_PART_OCTETS + "@example.com")
    with pytest.raises(MailInputError, match="64 octets"):
        parse_address("a" * (MAX_LOCAL_PART_OCTETS + 1) + "@example.com")
    # "é" is two octets in UTF-8: 32 of them fill the local part exactly.
    assert parse_address("é" * 32 + "@example.com").smtputf8
    with pytest.raises(MailInputError, match="64 octets"):
        parse_address("é" * 33 + "@example.com")


def test_label_limit_is_63_octets() -> None:
    assert parse_address("u@" + "a" * MAX_LABEL_OCTETS + ".example")
    with pytest.raises(MailInputError, match="63 octets"):
        parse_address("u@" + "a" * (MAX_LABEL_OCTETS + 1) + ".example")


def test_whole_address_limit_is_254_octets() -> None:
    local = "a" * 64
    labels = ["b" * 63, "c" * 63, "d" * 61]  # 63+1+63+1+61 = 189; 64 + 1 + 189 = 254
    exact = f"{local}@{'.'.join(labels)}"
    assert len(exact) == MAX_ADDRESS_OCTETS
    assert parse_address(exact).addr_spec == exact
    with pytest.raises(MailInputError, match="254 octets"):
        parse_address(f"{local}@{'.'.join([*labels[:2], 'd' * 62])}")


def test_domain_limit_is_255_octets() -> None:
    labels = ["a" * 63, "b" * 63, "c" * 63, "d" * 63]  # 4*63 + 3 dots = 255
    assert len(normalize_domain(".".join(labels))) == MAX_DOMAIN_OCTETS
    with pytest.raises(MailInputError, match="255 octets"):
        normalize_domain(".".join([*labels, "e"]))


def test_normalize_domain_refuses_an_address() -> None:
    with pytest.raises(MailInputError, match="no @"):
        normalize_domain("user@example.com")
    assert normalize_domain("Bücher.Example") == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    "name",
    [
        "Zoë O'Brien",
        'Eve "The Boss" <eve@evil.example>, Mallory',  # quoted by the composer, not refused
        "\U0001f468\u200d\U0001f469\u200d\U0001f467 family",  # ZERO WIDTH JOINERs in one emoji
        "\u200f\u05e2\u05d1\u05e8\u05d9\u05ea",  # RIGHT-TO-LEFT MARK is not an override
        "",
    ],
)
def test_display_names_are_returned_unchanged(name: str) -> None:
    assert validate_display_name(name, field="from_name") == name


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("Eve\r\nBcc: victim@example.net", MailErrorCode.HEADER_INJECTION),
        ("Eve\nX: y", MailErrorCode.HEADER_INJECTION),
        ("Eve\rX", MailErrorCode.HEADER_INJECTION),
        ("Eve\x00", MailErrorCode.HEADER_INJECTION),
        ("Eve\u2028X", MailErrorCode.HEADER_INJECTION),
        ("Eve\u2029X", MailErrorCode.HEADER_INJECTION),
        ("Eve\u0085X", MailErrorCode.HEADER_INJECTION),
        ("Eve\tX", MailErrorCode.HEADER_INJECTION),
        ("Eve\x7f", MailErrorCode.HEADER_INJECTION),
        ("Eve\ud800", MailErrorCode.HEADER_INJECTION),
        ("\u202emoc.knab@ecila", MailErrorCode.INVALID_DISPLAY_NAME),
        ("Eve\u2066x\u2069", MailErrorCode.INVALID_DISPLAY_NAME),
        ("x" * (MAX_DISPLAY_NAME_CHARS + 1), MailErrorCode.TOO_LONG),
    ],
)
def test_display_names_with_line_breaks_or_controls_are_refused(
    name: str, code: MailErrorCode
) -> None:
    with pytest.raises(MailInputError) as caught:
        validate_display_name(name, field="from_name")
    assert caught.value.code is code
    assert caught.value.field == "from_name"


# -- properties --------------------------------------------------------------------------

_ATEXT = st.sampled_from(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_ATOM = st.text(_ATEXT, min_size=1, max_size=10)
_LOCAL = st.lists(_ATOM, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_DOMAIN = st.tuples(
    st.lists(_LABEL, min_size=1, max_size=3), st.from_regex(r"[a-z]{2,6}", fullmatch=True)
).map(lambda parts: ".".join([*parts[0], parts[1]]))


@given(local=_LOCAL, domain=_DOMAIN)
def test_every_ascii_dot_atom_address_is_accepted_as_is(local: str, domain: str) -> None:
    value = f"{local}@{domain}"
    address = parse_address(value)
    assert address.addr_spec == value
    assert not address.smtputf8
    # The stdlib agrees it is one plain addr-spec.
    assert email.utils.parseaddr(value) == ("", value)
    assert StdlibAddress(addr_spec=value).addr_spec == value


_FORBIDDEN = st.sampled_from(list('\r\n\x00\t \u2028\u2029\u0085<>,;"()[]\\:'))


@given(local=_LOCAL, domain=_DOMAIN, bad=_FORBIDDEN, where=st.integers(min_value=0))
def test_a_forbidden_character_anywhere_is_refused(
    local: str, domain: str, bad: str, where: int
) -> None:
    value = f"{local}@{domain}"
    position = where % (len(value) + 1)
    with pytest.raises(MailInputError) as caught:
        parse_address(value[:position] + bad + value[position:])
    assert caught.value.code is MailErrorCode.INVALID_ADDRESS


@given(st.text(max_size=80))
def test_any_text_is_refused_or_gives_a_stable_single_address(value: str) -> None:
    try:
        address = parse_address(value)
    except MailInputError as exc:
        assert exc.code is MailErrorCode.INVALID_ADDRESS
        return
    spec = address.addr_spec
    assert spec.count("@") == 1
    assert not any(ch.isspace() or not ch.isprintable() for ch in spec)
    assert parse_address(spec) == address  # normalization is idempotent
