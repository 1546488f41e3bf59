"""Reply parsers: CAPA, STAT, LIST, UIDL (strict: a lying listing is a protocol error)."""

from __future__ import annotations

import pytest

from service.pop3.errors import RemoteProtocolError
from service.pop3.replies import (
    Capabilities,
    parse_capabilities,
    parse_listing,
    parse_scan_line,
    parse_stat,
    parse_unique_id_line,
    parse_unique_ids,
    response_code,
)


def test_capabilities() -> None:
    caps = parse_capabilities(
        b"CAPA\r\nTOP\r\nuser\r\nSASL PLAIN login\r\nPIPELINING\r\nLOGIN-DELAY 900\r\n"
        b"EXPIRE 30\r\nIMPLEMENTATION Example Server 1.0\r\nSTLS\r\n"
    )
    assert caps.supported
    assert caps.pipelining and caps.stls and caps.user
    assert caps.sasl == {"PLAIN", "LOGIN"}
    assert caps.login_delay == 900
    assert caps.expire == "30"
    assert caps.implementation == "Example Server 1.0"
    assert "top" in caps and "UIDL" not in caps


def test_capabilities_without_extras() -> None:
    caps = parse_capabilities(b"TOP\r\nUIDL\r\n")
    assert not caps.pipelining and not caps.stls and not caps.user
    assert caps.sasl == frozenset()
    assert caps.login_delay is None and caps.expire is None and caps.implementation is None


def test_per_user_values() -> None:
    assert parse_capabilities(b"LOGIN-DELAY 60 USER\r\n").per_user
    assert parse_capabilities(b"EXPIRE 30 USER\r\n").per_user
    assert not parse_capabilities(b"LOGIN-DELAY 60\r\nUSER\r\n").per_user


def test_login_delay_must_be_a_number() -> None:
    assert parse_capabilities(b"LOGIN-DELAY soon\r\n").login_delay is None
    assert parse_capabilities(b"LOGIN-DELAY 60 USER\r\n").login_delay == 60


def test_unsupported_capabilities_assume_rfc1939() -> None:
    caps = Capabilities.unsupported()
    assert not caps.supported and caps.user and not caps.pipelining and not caps.stls


def test_stat() -> None:
    assert parse_stat("2 320") == (2, 320)
    assert parse_stat("0 0 extra words") == (0, 0)
    for bad in ["", "2", "two 320", "-1 5", "+2 5", "1_0 5"]:
        with pytest.raises(RemoteProtocolError):
            parse_stat(bad)


def test_scan_lines_and_listing() -> None:
    assert parse_scan_line("3 120") == (3, 120)
    assert parse_scan_line("3 120 extra", expected=3) == (3, 120)
    with pytest.raises(RemoteProtocolError):
        parse_scan_line("4 120", expected=3)
    assert parse_listing(b"1 10\r\n2 20\r\n") == {1: 10, 2: 20}
    assert parse_listing(b"") == {}
    for bad in [b"1 10\r\n1 20\r\n", b"1\r\n", b"x 10\r\n", b"1 ten\r\n", b"\r\n"]:
        with pytest.raises(RemoteProtocolError):
            parse_listing(bad)


def test_unique_ids_are_validated() -> None:
    longest = "!" + "a" * 68 + "~"  # 70 characters from both ends of 0x21-0x7E
    assert parse_unique_ids(f"1 abc\r\n2 {longest}\r\n".encode()) == {1: "abc", 2: longest}
    assert parse_unique_id_line(b"5 xyz", expected=5) == (5, "xyz")
    bad_ids = [b"a" * 71, b"", b"has space", b"tab\there", b"del\x7f", b"\xc3\xa9t\xc3\xa9"]
    for bad in bad_ids:
        with pytest.raises(RemoteProtocolError):
            parse_unique_ids(b"1 " + bad + b"\r\n")


@pytest.mark.parametrize(
    "body",
    [
        b"1 same\r\n2 same\r\n",  # one unique-id for two messages
        b"1 one\r\n1 two\r\n",  # one message listed twice
        b"0 zero\r\n",
        b"one uid\r\n",
    ],
)
def test_duplicate_or_malformed_uidl_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        parse_unique_ids(body)
    assert caught.value.code == "protocol_error"


def test_uidl_answer_for_another_message_is_refused() -> None:
    with pytest.raises(RemoteProtocolError):
        parse_unique_id_line(b"6 xyz", expected=5)


def test_response_codes() -> None:
    assert response_code("[IN-USE] mailbox locked") == "IN-USE"
    assert response_code("[SYS/TEMP] try later") == "SYS/TEMP"
    assert response_code("[auth] nope") == "AUTH"
    assert response_code("no code") is None
    assert response_code("[unterminated") is None
