"""Commands: exact bytes, and arguments refused before anything could be written."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.pop3.commands import Command, Verb
from service.pop3.errors import InvalidArgument


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        (Command.user("alice"), b"USER alice\r\n"),
        (Command.pass_("pass word with spaces"), b"PASS pass word with spaces\r\n"),
        (Command.pass_("pässwörd"), "PASS pässwörd\r\n".encode()),
        (Command.auth("PLAIN", "AGFsaWNlAHNlY3JldA=="), b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
        (Command.auth("PLAIN", "="), b"AUTH PLAIN =\r\n"),
        (Command.auth("LOGIN"), b"AUTH LOGIN\r\n"),
        (Command.stls(), b"STLS\r\n"),
        (Command.capa(), b"CAPA\r\n"),
        (Command.stat(), b"STAT\r\n"),
        (Command.list(), b"LIST\r\n"),
        (Command.list(7), b"LIST 7\r\n"),
        (Command.uidl(), b"UIDL\r\n"),
        (Command.uidl(12), b"UIDL 12\r\n"),
        (Command.top(3, 0), b"TOP 3 0\r\n"),
        (Command.retr(2000), b"RETR 2000\r\n"),
        (Command.dele(1), b"DELE 1\r\n"),
        (Command.rset(), b"RSET\r\n"),
        (Command.noop(), b"NOOP\r\n"),
        (Command.quit(), b"QUIT\r\n"),
    ],
)
def test_command_bytes_are_exact(command: Command, wire: bytes) -> None:
    assert command.encode() == wire


@pytest.mark.parametrize(
    ("command", "multiline"),
    [
        (Command.capa(), True),
        (Command.list(), True),
        (Command.list(1), False),
        (Command.uidl(), True),
        (Command.uidl(1), False),
        (Command.retr(1), True),
        (Command.top(1, 5), True),
        (Command.stat(), False),
        (Command.dele(1), False),
        (Command.quit(), False),
    ],
)
def test_which_replies_are_multiline(command: Command, multiline: bool) -> None:
    assert command.multiline is multiline


@pytest.mark.parametrize("bad", ["\r", "\n", "\0", "\x01", "\x1b", "\x7f", "\x85", "\t"])
@pytest.mark.parametrize("build", [Command.user, Command.pass_])
def test_control_characters_are_refused(build: object, bad: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        build(f"alice{bad}DELE 1")  # type: ignore[operator]
    assert caught.value.code == "invalid_argument"


@given(
    st.text(min_size=0, max_size=20),
    st.sampled_from([chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]),
    st.text(min_size=0, max_size=20),
)
def test_any_control_character_anywhere_is_refused(head: str, control: str, tail: str) -> None:
    with pytest.raises(InvalidArgument):
        Command.pass_(head + control + tail)


def test_user_name_cannot_contain_a_space() -> None:
    with pytest.raises(InvalidArgument):
        Command.user("alice smith")


@pytest.mark.parametrize("value", ["", None, 7])
def test_credentials_must_be_non_empty_strings(value: object) -> None:
    with pytest.raises(InvalidArgument):
        Command.user(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Command.pass_(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("number", [0, -1, True, "1", 1.0, 2**31, None])
def test_message_numbers_are_positive_integers(number: object) -> None:
    for build in (Command.retr, Command.dele, Command.list, Command.uidl):
        if number is None and build in (Command.list, Command.uidl):
            continue  # LIST and UIDL without a number are the multi-line forms
        with pytest.raises(InvalidArgument):
            build(number)  # type: ignore[arg-type]


def test_top_takes_a_message_number_and_a_line_count() -> None:
    assert Command.top(1, 0).args == (1, 0)
    with pytest.raises(InvalidArgument):
        Command.top(0, 1)
    with pytest.raises(InvalidArgument):
        Command.top(1, -1)


@pytest.mark.parametrize(
    ("mechanism", "response"),
    [("plain", None), ("PL AIN", None), ("PLAIN", "not base64!"), ("PLAIN", "*"), ("X" * 21, None)],
)
def test_auth_arguments_are_validated(mechanism: str, response: str | None) -> None:
    with pytest.raises(InvalidArgument):
        Command.auth(mechanism, response)


def test_arity_is_checked_for_hand_built_commands() -> None:
    with pytest.raises(InvalidArgument):
        Command(Verb.STAT, (1,))
    with pytest.raises(InvalidArgument):
        Command(Verb.RETR)


def test_repr_never_shows_a_password() -> None:
    assert "hunter2" not in repr(Command.pass_("hunter2"))
    secret = "AGFsaWNlAGh1bnRlcjI="
    assert secret not in repr(Command.auth("PLAIN", secret))
    assert repr(Command.retr(3)) == "Command(RETR 3)"
