"""The sans-IO core: exact bytes out, events in, at every possible split of the input."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.pop3 import connection as core_module
from service.pop3.commands import Command
from service.pop3.connection import POP3Connection, State
from service.pop3.errors import (
    LineTooLong,
    LocalProtocolError,
    MessageTooLarge,
    POP3ConnectionLost,
    RemoteProtocolError,
    ResponseTooLarge,
)
from service.pop3.events import (
    NEED_DATA,
    ConnectionClosed,
    Continuation,
    Err,
    Event,
    Greeting,
    Ok,
    ResponseData,
    ResponseEnd,
    ResponseStart,
)

from .fault_server import dot_stuff

# Helpers ---------------------------------------------------------------------------------


def events(conn: POP3Connection) -> list[Event]:
    """Every event ready now (ConnectionClosed, like h11's, repeats: stop there)."""
    out: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, ConnectionClosed):
            break
        # A core that never asks for data would otherwise loop until memory runs out.
        assert len(out) < 100_000, "next_event() never returned NEED_DATA"
    return out


def feed(conn: POP3Connection, pieces: Iterable[bytes]) -> list[Event]:
    """Feed ``pieces`` one at a time, collecting events after each (``b""`` is skipped:
    to the core it would mean end of file)."""
    out: list[Event] = []
    for piece in pieces:
        if not piece:
            continue
        conn.receive_data(piece)
        out.extend(events(conn))
    return out


def normalized(evs: list[Event]) -> list[tuple[object, ...]]:
    """Events with consecutive data chunks merged, so splits do not matter."""
    out: list[tuple[object, ...]] = []
    for event in evs:
        if isinstance(event, ResponseData):
            if out and out[-1][0] == "data" and out[-1][1] == event.command:
                out[-1] = ("data", event.command, out[-1][2] + event.data)  # type: ignore[operator]
            else:
                out.append(("data", event.command, event.data))
        elif isinstance(event, ResponseStart):
            out.append(("start", event.command, event.text))
        elif isinstance(event, ResponseEnd):
            out.append(("end", event.command))
        elif isinstance(event, Ok):
            out.append(("ok", event.command, event.text))
        elif isinstance(event, Err):
            out.append(("err", event.command, event.text, event.response_code))
        else:
            out.append((type(event).__name__,))
    return out


def greeted() -> POP3Connection:
    conn = POP3Connection()
    assert conn.state is State.GREETING
    conn.receive_data(b"+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n")
    assert events(conn) == [Greeting("POP3 ready <1896.697170952@dbc.mtview.ca.us>")]
    assert conn.state is State.AUTHORIZATION
    return conn


def logged_in(*, pipelining: bool = True) -> POP3Connection:
    conn = greeted()
    assert conn.send(Command.user("alice")) == b"USER alice\r\n"
    conn.receive_data(b"+OK\r\n")
    assert events(conn) == [Ok(Command.user("alice"), "")]
    assert conn.send(Command.pass_("s3cret word")) == b"PASS s3cret word\r\n"
    conn.receive_data(b"+OK maildrop locked\r\n")
    assert len(events(conn)) == 1
    assert conn.state is State.TRANSACTION
    conn.pipelining = pipelining
    return conn


# A pipelined batch whose replies exercise every framing rule: a first line that starts
# with a dot, lines that are only dots, an empty line before the terminator, an empty
# body, a -ERR in the middle of multi-line replies, and single-line replies after them.
MESSAGE_1 = b".first line starts with a dot\r\n..\r\n.\r\nmiddle\r\n.x\r\n\r\n"
MESSAGE_2 = b"\r\n"
MESSAGE_3 = b"Subject: 8-bit \xe9\xff\x00\r\n\r\nbody\rwith bare CR\nand LF\r\n."
BATCH = [
    Command.list(),
    Command.retr(1),
    Command.retr(2),
    Command.retr(9),
    Command.top(3, 0),
    Command.uidl(),
    Command.dele(1),
    Command.noop(),
]
REPLIES = (
    b"+OK 3 messages\r\n1 120\r\n2 2\r\n3 60\r\n.\r\n"
    + b"+OK 120 octets\r\n"
    + dot_stuff(MESSAGE_1)
    + b"+OK\r\n"
    + dot_stuff(MESSAGE_2)
    + b"-ERR [SYS/PERM] no such message\r\n"
    + b"+OK top follows\r\n"
    + dot_stuff(MESSAGE_3)
    + b"+OK\r\n.\r\n"
    + b"+OK message 1 deleted\r\n"
    + b"+OK\r\n"
)
EXPECTED = [
    ("start", BATCH[0], "3 messages"),
    ("data", BATCH[0], b"1 120\r\n2 2\r\n3 60\r\n"),
    ("end", BATCH[0]),
    ("start", BATCH[1], "120 octets"),
    ("data", BATCH[1], MESSAGE_1),
    ("end", BATCH[1]),
    ("start", BATCH[2], ""),
    ("data", BATCH[2], MESSAGE_2),
    ("end", BATCH[2]),
    ("err", BATCH[3], "[SYS/PERM] no such message", "SYS/PERM"),
    ("start", BATCH[4], "top follows"),
    ("data", BATCH[4], MESSAGE_3 + b"\r\n"),
    ("end", BATCH[4]),
    ("start", BATCH[5], ""),
    ("end", BATCH[5]),
    ("ok", BATCH[6], "message 1 deleted"),
    ("ok", BATCH[7], ""),
]


def batch_connection() -> tuple[POP3Connection, bytes]:
    conn = logged_in()
    written = b"".join(conn.send(command) for command in BATCH)
    return conn, written


# Framing -----------------------------------------------------------------------------


def test_pipelined_batch_writes_exact_bytes() -> None:
    _, written = batch_connection()
    assert written == (
        b"LIST\r\nRETR 1\r\nRETR 2\r\nRETR 9\r\nTOP 3 0\r\nUIDL\r\nDELE 1\r\nNOOP\r\n"
    )


def test_whole_batch_in_one_read() -> None:
    conn, _ = batch_connection()
    assert normalized(feed(conn, [REPLIES])) == EXPECTED
    assert conn.pending == 0
    assert conn.buffered == 0


def test_batch_fed_byte_by_byte() -> None:
    conn, _ = batch_connection()
    pieces = [REPLIES[i : i + 1] for i in range(len(REPLIES))]
    assert normalized(feed(conn, pieces)) == EXPECTED


def test_batch_split_at_every_position() -> None:
    for cut in range(len(REPLIES) + 1):
        conn, _ = batch_connection()
        got = normalized(feed(conn, [REPLIES[:cut], REPLIES[cut:]]))
        assert got == EXPECTED, f"split at {cut}"


def test_batch_split_inside_every_terminator_and_line_end() -> None:
    # Three-way splits around each CRLF and CRLF.CRLF, inside and at both edges.
    marks = [i for i in range(len(REPLIES)) if REPLIES.startswith(b"\r\n", i)]
    for mark in marks:
        for first in range(max(0, mark - 1), mark + 3):
            for second in range(first, min(len(REPLIES), mark + 6) + 1):
                conn, _ = batch_connection()
                pieces = [REPLIES[:first], REPLIES[first:second], REPLIES[second:]]
                assert normalized(feed(conn, pieces)) == EXPECTED, (first, second)


def test_tiny_stream_chunks_split_at_every_position(monkeypatch: pytest.MonkeyPatch) -> None:
    # With a one-byte chunk threshold every partial-body cut path is taken.
    monkeypatch.setattr(core_module, "STREAM_CHUNK", 1)
    for cut in range(len(REPLIES) + 1):
        conn, _ = batch_connection()
        assert normalized(feed(conn, [REPLIES[:cut], REPLIES[cut:]])) == EXPECTED, cut
    conn, _ = batch_connection()
    pieces = [REPLIES[i : i + 1] for i in range(len(REPLIES))]
    assert normalized(feed(conn, pieces)) == EXPECTED


lines_strategy = st.lists(
    st.one_of(
        st.sampled_from([b"", b".", b"..", b"...", b".\r", b"\r", b"x.", b". ", b".\n"]),
        st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"")),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    messages=st.lists(lines_strategy, min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
    chunk=st.sampled_from([1, 2, 3, 5, 64, 1 << 20]),
)
def test_random_messages_and_splits_round_trip(
    messages: list[list[bytes]], cuts: list[int], chunk: int
) -> None:
    original = core_module.STREAM_CHUNK
    core_module.STREAM_CHUNK = chunk
    try:
        bodies = [b"".join(line + b"\r\n" for line in lines) for lines in messages]
        conn = logged_in()
        for number in range(1, len(bodies) + 1):
            conn.send(Command.retr(number))
        stream = b"".join(b"+OK\r\n" + dot_stuff(body) for body in bodies)
        points = sorted({min(c, len(stream)) for c in cuts})
        pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
        got = normalized(feed(conn, pieces))
        datas = [item[2] for item in got if item[0] == "data"]
        assert [d for d in bodies if d] == datas
        assert [item[0] for item in got].count("end") == len(bodies)
    finally:
        core_module.STREAM_CHUNK = original


def test_large_message_streams_in_bounded_chunks() -> None:
    body = b"".join(
        b"%07d .line with content, and a dot after CRLF\r\n..\r\n" % i for i in range(60000)
    )
    stream = b"+OK\r\n" + dot_stuff(body)
    conn = logged_in()
    conn.send(Command.retr(1))
    chunks: list[bytes] = []
    read = 65536
    for start in range(0, len(stream), read):
        conn.receive_data(stream[start : start + read])
        for event in events(conn):
            if isinstance(event, ResponseData):
                chunks.append(event.data)
        # Never more than one chunk threshold plus one read held back.
        assert conn.buffered < core_module.STREAM_CHUNK + read
    assert len(chunks) > 5
    assert b"".join(chunks) == body


def test_one_huge_line_is_streamed_not_buffered() -> None:
    body = b"." + b"A" * (3 * 1024 * 1024) + b"\r\n"
    conn = logged_in()
    conn.send(Command.retr(1))
    stream = b"+OK\r\n" + dot_stuff(body)
    chunks = []
    for start in range(0, len(stream), 100_000):
        conn.receive_data(stream[start : start + 100_000])
        chunks += [e.data for e in events(conn) if isinstance(e, ResponseData)]
        assert conn.buffered < core_module.STREAM_CHUNK + 100_000
    assert len(chunks) > 1 and b"".join(chunks) == body


# Replies, states and transitions -------------------------------------------------------


def test_greeting_and_error_greeting() -> None:
    greeted()
    conn = POP3Connection()
    conn.receive_data(b"-ERR [SYS/TEMP] too busy\r\n")
    assert events(conn) == [Err(None, "[SYS/TEMP] too busy", "SYS/TEMP")]
    assert conn.state is State.CLOSED


def test_state_machine_refuses_commands_out_of_state() -> None:
    conn = POP3Connection()
    with pytest.raises(LocalProtocolError):
        conn.send(Command.capa())  # before the greeting
    conn = greeted()
    with pytest.raises(LocalProtocolError):
        conn.send(Command.retr(1))  # AUTHORIZATION
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.next_event()  # unusable after any error


def test_pass_must_follow_an_accepted_user() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError):
        conn.send(Command.pass_("x"))
    conn = greeted()
    conn.send(Command.user("bob"))
    conn.receive_data(b"-ERR no such user\r\n")
    assert isinstance(events(conn)[0], Err)
    with pytest.raises(LocalProtocolError):
        conn.send(Command.pass_("x"))


def test_no_pipelining_unless_the_server_offers_it() -> None:
    conn = logged_in(pipelining=False)
    conn.send(Command.retr(1))
    with pytest.raises(LocalProtocolError):
        conn.send(Command.retr(2))


def test_session_changing_commands_are_never_pipelined() -> None:
    conn = greeted()
    conn.pipelining = True
    conn.send(Command.capa())
    with pytest.raises(LocalProtocolError):
        conn.send(Command.stls())
    conn = greeted()
    conn.pipelining = True
    conn.send(Command.user("a"))
    with pytest.raises(LocalProtocolError):
        conn.send(Command.capa())


def test_quit_from_transaction_goes_through_update() -> None:
    conn = logged_in()
    conn.send(Command.dele(1))
    assert conn.send(Command.quit()) == b"QUIT\r\n"
    assert conn.state is State.UPDATE
    with pytest.raises(LocalProtocolError):
        conn.send(Command.noop())
    conn = logged_in()
    conn.send(Command.dele(1))
    conn.send(Command.quit())
    conn.receive_data(b"+OK\r\n+OK dewey POP3 server signing off\r\n")
    assert [type(e) for e in events(conn)] == [Ok, Ok]
    assert conn.state is State.CLOSED
    conn.receive_data(b"")
    assert events(conn) == [ConnectionClosed()]


def test_err_to_quit_is_an_event_and_closes() -> None:
    conn = logged_in()
    conn.send(Command.quit())
    conn.receive_data(b"-ERR some deleted messages not removed\r\n")
    (event,) = events(conn)
    assert isinstance(event, Err) and event.command == Command.quit()
    assert conn.state is State.CLOSED


def test_auth_with_continuation_and_exact_response_bytes() -> None:
    conn = greeted()
    assert conn.send(Command.auth("PLAIN")) == b"AUTH PLAIN\r\n"
    conn.receive_data(b"+ \r\n")
    assert events(conn) == [Continuation(Command.auth("PLAIN"), "")]
    assert conn.send_sasl_response("AGFsaWNlAHNlY3JldA==") == b"AGFsaWNlAHNlY3JldA==\r\n"
    with pytest.raises(LocalProtocolError):
        conn.send_sasl_response("AAAA")  # no second challenge was received
    conn = greeted()
    conn.send(Command.auth("LOGIN"))
    conn.receive_data(b"+ VXNlcm5hbWU6\r\n")
    assert events(conn) == [Continuation(Command.auth("LOGIN"), "VXNlcm5hbWU6")]
    conn.send_sasl_response("YWxpY2U=")
    conn.receive_data(b"+\r\n")  # a bare "+" is an empty challenge
    assert events(conn) == [Continuation(Command.auth("LOGIN"), "")]
    conn.send_sasl_response("c2VjcmV0")
    conn.receive_data(b"+OK\r\n")
    assert isinstance(events(conn)[0], Ok)
    assert conn.state is State.TRANSACTION


def test_sasl_response_is_validated() -> None:
    conn = greeted()
    conn.send(Command.auth("PLAIN"))
    conn.receive_data(b"+ \r\n")
    events(conn)
    with pytest.raises(ValueError):
        conn.send_sasl_response("abc\r\nDELE 1")


def test_continuation_outside_auth_is_a_protocol_error() -> None:
    conn = logged_in()
    conn.send(Command.stat())
    conn.receive_data(b"+ go on\r\n")
    with pytest.raises(RemoteProtocolError):
        events(conn)
    assert conn.state is State.ERROR


def test_stls_discards_everything_received_before_the_handshake() -> None:
    conn = greeted()
    conn.send(Command.stls())
    conn.receive_data(b"+OK begin TLS\r\n+OK injected\r\n-ERR injected\r\n")
    assert events(conn) == [Ok(Command.stls(), "begin TLS")]
    assert conn.state is State.STARTTLS
    conn.receive_data(b"+OK more injected after the reply\r\n")
    assert conn.buffered == 0
    assert conn.discarded == len(
        b"+OK injected\r\n-ERR injected\r\n+OK more injected after the reply\r\n"
    )
    conn.tls_established()
    assert conn.tls_active and conn.state is State.AUTHORIZATION
    conn.send(Command.capa())
    conn.receive_data(b"+OK\r\nUSER\r\n.\r\n")
    assert normalized(events(conn)) == [
        ("start", Command.capa(), ""),
        ("data", Command.capa(), b"USER\r\n"),
        ("end", Command.capa()),
    ]
    with pytest.raises(LocalProtocolError):
        conn.send(Command.stls())  # not twice


def test_nothing_is_sent_between_stls_and_the_handshake() -> None:
    conn = greeted()
    conn.send(Command.stls())
    conn.receive_data(b"+OK\r\n")
    events(conn)
    with pytest.raises(LocalProtocolError):
        conn.send(Command.user("alice"))


def test_tls_established_without_stls_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        greeted().tls_established()


def test_reply_text_is_sanitised() -> None:
    conn = logged_in()
    conn.send(Command.noop())
    conn.receive_data(b"+OK fine\x1b[31m\x00 \xff\r\n")
    (event,) = events(conn)
    assert isinstance(event, Ok)
    assert event.text.isprintable() and "\x1b" not in event.text and "\x00" not in event.text


# Hostile servers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"HTTP/1.1 400 Bad Request\r\n", b"+OKAY\r\n", b"-ERROR\r\n", b"ok\r\n", b"\r\n"],
)
def test_garbage_instead_of_a_status_line(garbage: bytes) -> None:
    conn = logged_in()
    conn.send(Command.stat())
    conn.receive_data(garbage)
    with pytest.raises(RemoteProtocolError) as caught:
        events(conn)
    assert caught.value.code == "protocol_error"


def test_garbage_is_reported_before_any_line_end() -> None:
    conn = POP3Connection()
    conn.receive_data(b"SSH-2.0-OpenSSH_9.2")  # no CRLF, maybe ever
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_status_line_too_long() -> None:
    conn = POP3Connection(max_line=100)
    conn.receive_data(b"+OK " + b"x" * 97)
    with pytest.raises(LineTooLong) as caught:
        conn.next_event()
    assert caught.value.code == "line_too_long" and caught.value.limit == 100
    conn = POP3Connection(max_line=100)
    conn.receive_data(b"+OK " + b"x" * 200 + b"\r\n")
    with pytest.raises(LineTooLong):
        conn.next_event()
    conn = POP3Connection(max_line=100)
    conn.receive_data(b"+OK " + b"x" * 96 + b"\r\n")  # exactly 100 bytes before CRLF
    assert isinstance(conn.next_event(), Greeting)


def test_message_over_its_limit_is_abandoned() -> None:
    conn = logged_in()
    conn.send(Command.retr(4), limit=100)
    conn.receive_data(b"+OK\r\n" + dot_stuff(b"a" * 98 + b"\r\n"))  # exactly 100 is fine
    assert normalized(events(conn))[1][2] == b"a" * 98 + b"\r\n"
    conn.send(Command.retr(5), limit=100)
    conn.receive_data(b"+OK\r\n" + dot_stuff(b"a" * 99 + b"\r\n"))
    with pytest.raises(MessageTooLarge) as caught:
        events(conn)
    error = caught.value
    assert (error.code, error.number, error.limit, error.abandoned) == (
        "message_too_large",
        5,
        100,
        True,
    )
    assert conn.state is State.ERROR


def test_message_limit_also_applies_while_streaming() -> None:
    conn = POP3Connection(max_message_bytes=1000)
    conn.receive_data(b"+OK\r\n")
    events(conn)
    conn.send(Command.user("a"))
    conn.receive_data(b"+OK\r\n")
    events(conn)
    conn.send(Command.pass_("b"))
    conn.receive_data(b"+OK\r\n")
    events(conn)
    conn.send(Command.retr(1), limit=10**9)  # cannot raise the connection's cap
    conn.receive_data(b"+OK\r\n" + b"y" * (core_module.STREAM_CHUNK + 10))
    with pytest.raises(MessageTooLarge):
        events(conn)


def test_listing_over_max_response_is_refused() -> None:
    conn = POP3Connection(max_response=50)
    conn.receive_data(b"+OK\r\n")
    events(conn)
    conn.send(Command.capa())
    conn.receive_data(b"+OK\r\n" + b"X-CAPABILITY\r\n" * 10 + b".\r\n")
    with pytest.raises(ResponseTooLarge) as caught:
        events(conn)
    assert caught.value.code == "response_too_large"


def test_eof_in_the_middle_of_a_reply() -> None:
    conn = logged_in()
    conn.send(Command.retr(1))
    conn.receive_data(b"+OK\r\nSubject: cut\r\n")
    conn.receive_data(b"")
    with pytest.raises(POP3ConnectionLost) as caught:
        events(conn)
    assert caught.value.code == "connection_lost"
    assert isinstance(caught.value, ConnectionError)


def test_eof_before_the_greeting_and_when_idle() -> None:
    conn = POP3Connection()
    conn.receive_data(b"")
    with pytest.raises(POP3ConnectionLost):
        conn.next_event()
    conn = logged_in()
    conn.receive_data(b"")
    assert events(conn) == [ConnectionClosed()]
    assert conn.state is State.CLOSED


def test_unsolicited_data_is_a_protocol_error() -> None:
    conn = logged_in()
    conn.receive_data(b"+OK surprise\r\n")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
