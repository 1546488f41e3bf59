"""The DATA payload: CRLF only, dot-stuffed, exactly one end-of-data marker."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from service.smtp import prepare_data

BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def receive(payload: bytes) -> tuple[bytes, bytes]:
    """What a strict RFC 5321 server reads: (message, bytes left after the end marker)."""
    lines = payload.split(b"\r\n")
    received: list[bytes] = []
    for index, line in enumerate(lines):
        if line == b".":
            return b"".join(part + b"\r\n" for part in received), b"\r\n".join(lines[index + 1 :])
        received.append(line[1:] if line.startswith(b".") else line)
    raise AssertionError("no end-of-data marker")


def test_examples() -> None:
    assert prepare_data(b"") == (b"\r\n.\r\n", 2)
    assert prepare_data(b"a") == (b"a\r\n.\r\n", 3)
    assert prepare_data(b".") == (b"..\r\n.\r\n", 3)
    assert prepare_data(b"a\n.\nb") == (b"a\r\n..\r\nb\r\n.\r\n", 9)
    assert prepare_data(b"a\r.\rb\r\n") == (b"a\r\n..\r\nb\r\n.\r\n", 9)
    assert prepare_data(b"x\r\n.\r\nMAIL FROM:<e@x>\r\n") == (
        b"x\r\n..\r\nMAIL FROM:<e@x>\r\n.\r\n",
        23,
    )
    assert prepare_data(b"..\r\n...\r\n") == (b"...\r\n....\r\n.\r\n", 9)


@given(
    st.binary(max_size=400)
    | st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n"]), max_size=60).map(b"".join)
)
def test_any_bytes_arrive_as_one_crlf_message(message: bytes) -> None:
    payload, size = prepare_data(message)
    assert BARE_CR_OR_LF.search(payload) is None
    received, rest = receive(payload)
    assert rest == b""  # nothing after the marker: no second message can be smuggled
    normalized = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if not normalized.endswith(b"\r\n"):
        normalized += b"\r\n"
    assert received == normalized
    assert size == len(normalized)
