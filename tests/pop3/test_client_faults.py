"""POP3Client against scripted servers: the faults and attacks Dovecot will not stage."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket

import pytest

from service.domain.enums import Security
from service.pop3 import (
    AuthFailed,
    AuthMechanism,
    CommandRejected,
    InvalidArgument,
    LineTooLong,
    LocalProtocolError,
    MailboxLocked,
    MessageTooLarge,
    POP3Client,
    POP3ConnectError,
    POP3ConnectionLost,
    POP3Error,
    POP3TimeoutError,
    RemoteProtocolError,
    ResponseTooLarge,
    TLSCertificateInvalid,
    TLSRequired,
    UpdateFailed,
)
from service.pop3 import errors as pop3_errors
from tests.waiting import until

from .conftest import FaultTLS, StartServer
from .fault_server import MiniPOP3, Session

CREDENTIAL_VERBS = {"USER", "PASS", "AUTH", "APOP"}


def client(port: int, security: Security = Security.NONE, **kwargs: object) -> POP3Client:
    kwargs.setdefault("timeout", 10)
    return POP3Client("localhost", port, security, **kwargs)  # type: ignore[arg-type]


def messages(count: int, size: int = 300) -> list[bytes]:
    return [
        (f"Subject: message {n}\r\n\r\n".encode() + b"." * 3 + b"x" * size + b"\r\n")
        for n in range(1, count + 1)
    ]


# Error codes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "bases"),
    [
        (pop3_errors.POP3ConnectError, "connect_failed", (ConnectionError,)),
        (pop3_errors.TLSHandshakeError, "tls_failed", (ConnectionError,)),
        (pop3_errors.POP3TimeoutError, "timeout", (TimeoutError,)),
        (pop3_errors.SessionDeadlineExceeded, "timeout", (POP3TimeoutError,)),
        (pop3_errors.TransferTooSlow, "timeout", (POP3TimeoutError,)),
        (pop3_errors.POP3ConnectionLost, "connection_lost", (ConnectionError,)),
        (pop3_errors.TLSRequired, "tls_required", ()),
        (pop3_errors.TLSCertificateInvalid, "tls_certificate_invalid", ()),
        (pop3_errors.InvalidArgument, "invalid_argument", (ValueError,)),
        (pop3_errors.LocalProtocolError, "protocol_error", ()),
        (pop3_errors.RemoteProtocolError, "protocol_error", ()),
        (pop3_errors.LineTooLong, "line_too_long", (RemoteProtocolError,)),
        (pop3_errors.ResponseTooLarge, "response_too_large", (RemoteProtocolError,)),
        (pop3_errors.MessageTooLarge, "message_too_large", ()),
        (pop3_errors.CommandRejected, "command_rejected", ()),
        (pop3_errors.AuthFailed, "auth_failed", (CommandRejected,)),
        (pop3_errors.PlaintextLoginRefused, "tls_required", (AuthFailed,)),
        (pop3_errors.MailboxLocked, "mailbox_locked", (AuthFailed,)),
        (pop3_errors.UpdateFailed, "update_failed", (CommandRejected,)),
    ],
)
def test_error_codes_are_stable(error: type[POP3Error], code: str, bases: tuple[type, ...]) -> None:
    assert error.code == code
    assert issubclass(error, POP3Error)
    for base in bases:
        assert issubclass(error, base)


# STLS and TLS -------------------------------------------------------------------------------


async def test_stls_not_offered_fails_before_any_credential(serve: StartServer) -> None:
    server = await serve(MiniPOP3(capabilities=("USER", "SASL PLAIN", "PIPELINING")))
    with pytest.raises(TLSRequired) as caught:
        async with client(server.port, Security.STARTTLS) as pop:
            await pop.login("alice", "secret")
    assert caught.value.code == "tls_required"
    await asyncio.sleep(0)
    assert server.commands() == ["CAPA"]


async def test_stls_refused_fails_before_any_credential(
    serve: StartServer, fault_tls: FaultTLS
) -> None:
    server = await serve(
        MiniPOP3(capabilities=("USER", "STLS"), replies={"STLS": b"-ERR not now\r\n"})
    )
    pop = client(server.port, Security.STARTTLS, ca_file=fault_tls.ca_file)
    with pytest.raises(TLSRequired):
        await pop.connect()
    with pytest.raises(LocalProtocolError):
        await pop.login("alice", "secret")  # the failed client sends nothing more
    pop.close()
    await asyncio.sleep(0.01)
    assert server.commands() == ["CAPA", "STLS"]


async def test_server_without_capa_still_must_accept_stls(serve: StartServer) -> None:
    server = await serve(MiniPOP3(replies={"CAPA": b"-ERR what?\r\n", "STLS": b"-ERR what?\r\n"}))
    with pytest.raises(TLSRequired):
        await client(server.port, Security.STARTTLS).connect()
    await asyncio.sleep(0.01)
    assert not CREDENTIAL_VERBS & set(server.commands())


def stls_server(fault_tls: FaultTLS, injected: bytes, capabilities: tuple[str, ...]) -> MiniPOP3:
    async def stls(session: Session, line: bytes) -> bool:
        # One write: the reply and the injection arrive together, before the handshake.
        session.send(b"+OK begin TLS\r\n" + injected)
        await session.start_tls(fault_tls.server_context)
        mini.capabilities = capabilities
        return False

    mini = MiniPOP3(messages=messages(2), capabilities=("USER", "STLS"), replies={"STLS": stls})
    return mini


async def test_data_injected_before_the_tls_handshake_is_discarded(
    serve: StartServer, fault_tls: FaultTLS
) -> None:
    # If the client kept these bytes it would read them as replies to CAPA, USER and
    # PASS: a fake capability list, and a fake login success for a wrong password.
    injected = b"+OK\r\nPIPELINING\r\nX-INJECTED\r\n.\r\n+OK\r\n+OK injected login\r\n"
    server = await serve(stls_server(fault_tls, injected, ("USER", "UIDL", "X-AFTER-TLS")))
    async with client(server.port, Security.STARTTLS, ca_file=fault_tls.ca_file) as pop:
        assert pop.tls_active
        caps = pop.cached_capabilities
        assert caps is not None
        assert "X-AFTER-TLS" in caps and "X-INJECTED" not in caps
        assert not pop.pipelining
        with pytest.raises(AuthFailed):
            await pop.login("alice", "wrong password")
        await pop.login("alice", "secret")
        assert (await pop.stat()).messages == 2
    assert server.commands() == [
        "CAPA",
        "STLS",
        "CAPA",
        "USER",
        "PASS",
        "USER",
        "PASS",
        "STAT",
        "QUIT",
    ]


async def test_implicit_tls(serve: StartServer, fault_tls: FaultTLS) -> None:
    server = await serve(MiniPOP3(messages=messages(1)), ssl_context=fault_tls.server_context)
    async with client(server.port, Security.TLS, ca_file=fault_tls.ca_file) as pop:
        assert pop.tls_active
        await pop.login("alice", "secret")
        assert await pop.retr(1) == messages(1)[0]


@pytest.mark.parametrize("security", [Security.TLS, Security.STARTTLS])
async def test_untrusted_certificate_fails_without_fallback(
    serve: StartServer, fault_tls: FaultTLS, security: Security
) -> None:
    tls = fault_tls.server_context if security is Security.TLS else None
    mini = stls_server(fault_tls, b"", ("USER",))
    server = await serve(mini, ssl_context=tls)
    with pytest.raises(TLSCertificateInvalid) as caught:
        await client(server.port, security).connect()  # system CAs only: not trusted
    assert caught.value.code == "tls_certificate_invalid"
    await asyncio.sleep(0.05)
    assert not CREDENTIAL_VERBS & set(server.commands())


@pytest.mark.parametrize("security", [Security.TLS, Security.STARTTLS])
async def test_wrong_host_certificate_fails(
    serve: StartServer, fault_tls: FaultTLS, security: Security
) -> None:
    tls = fault_tls.server_context if security is Security.TLS else None
    server = await serve(stls_server(fault_tls, b"", ("USER",)), ssl_context=tls)
    pop = POP3Client(
        "mail.example.net",  # the certificate names localhost and 127.0.0.1 only
        server.port,
        security,
        ca_file=fault_tls.ca_file,
        connect_address="127.0.0.1",
        timeout=10,
    )
    with pytest.raises(TLSCertificateInvalid):
        await pop.connect()
    await asyncio.sleep(0.05)
    assert not CREDENTIAL_VERBS & set(server.commands())


async def test_plaintext_on_a_tls_port_is_a_typed_error(
    serve: StartServer, fault_tls: FaultTLS
) -> None:
    server = await serve(MiniPOP3())  # answers in clear
    with pytest.raises(POP3ConnectError) as caught:
        await client(server.port, Security.TLS, ca_file=fault_tls.ca_file).connect()
    assert caught.value.code == "tls_failed"  # the same code as SMTP's
    assert "set security to starttls" in caught.value.detail
    assert "POP3Client" not in caught.value.detail


# Authentication ------------------------------------------------------------------------


async def test_auth_plain_with_initial_response_when_offered(serve: StartServer) -> None:
    server = await serve(MiniPOP3(capabilities=("USER", "SASL PLAIN LOGIN")))
    async with client(server.port) as pop:
        await pop.login("alice", "s3cret pass")
    token = base64.b64encode(b"\0alice\0s3cret pass")
    assert server.session.lines[1] == b"AUTH PLAIN " + token


async def test_user_pass_when_no_sasl(serve: StartServer) -> None:
    server = await serve(MiniPOP3(capabilities=("USER",)))
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
    assert server.session.lines[1:3] == [b"USER alice", b"PASS secret"]


def sasl_server(challenges: list[bytes]) -> MiniPOP3:
    async def auth(session: Session, line: bytes) -> bool:
        for challenge in challenges:
            session.send(challenge)
            await session.readline()
        session.send(b"+OK welcome\r\n")
        session.authenticated = True
        return False

    mini = MiniPOP3(capabilities=("SASL PLAIN LOGIN",), replies={"AUTH": auth})
    return mini


async def test_auth_login_exchange(serve: StartServer) -> None:
    server = await serve(sasl_server([b"+ VXNlcm5hbWU6\r\n", b"+ UGFzc3dvcmQ6\r\n"]))
    async with client(server.port) as pop:
        await pop.login("alice", "secret", mechanism=AuthMechanism.LOGIN)
        await pop.noop()
    assert server.session.lines[1:4] == [b"AUTH LOGIN", b"YWxpY2U=", b"c2VjcmV0"]


async def test_long_credentials_send_plain_after_a_challenge(serve: StartServer) -> None:
    # RFC 5034: AUTH with its initial response must fit in 255 octets.
    server = await serve(sasl_server([b"+ \r\n"]))
    password = "p" * 300
    async with client(server.port) as pop:
        await pop.login("alice", password)
    assert server.session.lines[1] == b"AUTH PLAIN"
    assert base64.b64decode(server.session.lines[2]) == b"\0alice\0" + password.encode()


async def test_extra_sasl_challenge_is_cancelled(serve: StartServer) -> None:
    async def auth(session: Session, line: bytes) -> bool:
        session.send(b"+ more?\r\n")
        answer = await session.readline()
        session.send(b"-ERR cancelled\r\n" if answer == b"*" else b"+OK\r\n")
        session.authenticated = answer != b"*"
        return False

    server = await serve(MiniPOP3(capabilities=("SASL PLAIN",), replies={"AUTH": auth}))
    async with client(server.port) as pop:
        with pytest.raises(AuthFailed):
            await pop.login("alice", "secret")
    assert server.session.lines[2] == b"*"


async def test_locked_mailbox_is_a_temporary_mailbox_locked(serve: StartServer) -> None:
    server = await serve(MiniPOP3(replies={"PASS": b"-ERR [IN-USE] mailbox locked\r\n"}))
    async with client(server.port) as pop:
        with pytest.raises(MailboxLocked) as caught:
            await pop.login("alice", "secret")
    assert caught.value.code == "mailbox_locked"
    assert caught.value.response_code == "IN-USE" and caught.value.temporary
    assert caught.value.detail == ("the POP3 server answered -ERR to PASS: [IN-USE] mailbox locked")


@pytest.mark.parametrize(
    ("verb", "reply", "code"),
    [
        # Dovecot's own words (disable_plaintext_auth), at USER
        (
            "USER",
            b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS)"
            b" connections.\r\n",
            "tls_required",
        ),
        ("PASS", b"-ERR [SYS/PERM] TLS required for login\r\n", "tls_required"),
        ("USER", b"-ERR Use STLS first\r\n", "tls_required"),
        ("PASS", b"-ERR [AUTH] Authentication failed.\r\n", "auth_failed"),
        ("PASS", b"-ERR [SYS/TEMP] try later\r\n", "auth_failed"),
        ("PASS", b"-ERR Unable to lock maildrop: in use by another session\r\n", "mailbox_locked"),
    ],
)
async def test_login_refusals_are_classified_by_the_server_text(
    serve: StartServer, verb: str, reply: bytes, code: str
) -> None:
    server = await serve(MiniPOP3(replies={verb: reply}))
    async with client(server.port) as pop:
        with pytest.raises(AuthFailed) as caught:
            await pop.login("alice", "secret")
    assert caught.value.code == code
    text = reply.decode().removeprefix("-ERR ").strip()
    assert caught.value.detail == f"the POP3 server answered -ERR to {verb}: {text}"
    if verb == "USER":
        assert "PASS" not in server.commands()  # the password never left


async def test_tls_words_on_an_encrypted_connection_are_plain_auth_failures(
    serve: StartServer, fault_tls: FaultTLS
) -> None:
    # Over TLS "TLS required" cannot be the reason: it stays auth_failed.
    mini = MiniPOP3(replies={"PASS": b"-ERR [AUTH] TLS required\r\n"})
    server = await serve(mini, ssl_context=fault_tls.server_context)
    async with client(server.port, Security.TLS, ca_file=fault_tls.ca_file) as pop:
        with pytest.raises(AuthFailed) as caught:
            await pop.login("alice", "secret")
    assert caught.value.code == "auth_failed"


async def test_login_delay_is_exposed(serve: StartServer) -> None:
    server = await serve(MiniPOP3(capabilities=("USER", "LOGIN-DELAY 900")))
    async with client(server.port) as pop:
        assert pop.login_delay == 900
        await pop.login("alice", "secret")
        assert pop.login_delay == 900
    assert server.commands().count("CAPA") == 1


async def test_per_user_login_delay_is_read_after_login(serve: StartServer) -> None:
    async def capa(session: Session, line: bytes) -> bool:
        delay = "300" if session.authenticated else "60 USER"
        session.send(f"+OK\r\nUSER\r\nLOGIN-DELAY {delay}\r\n.\r\n".encode())
        return False

    server = await serve(MiniPOP3(replies={"CAPA": capa}))
    async with client(server.port) as pop:
        assert pop.login_delay == 60
        await pop.login("alice", "secret")
        assert pop.login_delay == 300
    assert server.commands() == ["CAPA", "USER", "PASS", "CAPA", "QUIT"]


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("alice\r\nDELE 1", "secret"),
        ("alice", "secret\r\nDELE 1"),
        ("al\0ice", "x"),
        ("alice", "a\x7fb"),
    ],
)
async def test_control_characters_in_credentials_are_never_written(
    serve: StartServer, username: str, password: str
) -> None:
    server = await serve(MiniPOP3(capabilities=("USER", "SASL PLAIN")))
    async with client(server.port) as pop:
        with pytest.raises(InvalidArgument) as caught:
            await pop.login(username, password)
        assert caught.value.code == "invalid_argument"
        assert pop.usable  # nothing was written, the session goes on
    assert server.commands() == ["CAPA", "QUIT"]


async def test_user_name_with_space_is_refused_for_user_pass(serve: StartServer) -> None:
    server = await serve(MiniPOP3(capabilities=("USER",)))
    async with client(server.port) as pop:
        with pytest.raises(InvalidArgument):
            await pop.login("alice smith", "secret")
    assert server.commands() == ["CAPA", "QUIT"]


async def test_invalid_message_numbers_are_never_written(serve: StartServer) -> None:
    server = await serve(MiniPOP3(messages=messages(2)))
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        for bad in (0, -1, True):
            with pytest.raises(InvalidArgument):
                await pop.retr(bad)
            with pytest.raises(InvalidArgument):
                await pop.dele([1, bad])
        assert (await pop.stat()).messages == 2
    assert server.commands() == ["CAPA", "USER", "PASS", "STAT", "QUIT"]


# Silence, drops and garbage ---------------------------------------------------------------


async def test_silent_server_times_out(serve: StartServer) -> None:
    async def silent(session: Session) -> None:
        await asyncio.sleep(3600)

    server = await serve(silent)
    with pytest.raises(POP3TimeoutError) as caught:
        await client(server.port, timeout=0.2).connect()
    assert caught.value.code == "timeout" and isinstance(caught.value, TimeoutError)


async def test_server_falling_silent_mid_session_times_out(serve: StartServer) -> None:
    async def hang(session: Session, line: bytes) -> bool:
        await asyncio.sleep(3600)
        return True

    server = await serve(MiniPOP3(messages=messages(1), replies={"STAT": hang}))
    pop = client(server.port, timeout=0.3)
    async with pop:
        await pop.login("alice", "secret")
        with pytest.raises(POP3TimeoutError):
            await pop.stat()
        assert not pop.usable
        with pytest.raises(LocalProtocolError):
            await pop.noop()
    assert "QUIT" not in server.commands()


async def test_connection_dropped_mid_retr(serve: StartServer) -> None:
    async def drop(session: Session, line: bytes) -> bool:
        session.send(b"+OK\r\nSubject: half a message\r\n\r\nsome of the bo")
        await session.writer.drain()
        session.abort()
        return True

    mini = MiniPOP3(messages=messages(3), replies={"RETR": drop})
    server = await serve(mini)
    with pytest.raises(POP3ConnectionLost) as caught:
        async with client(server.port) as pop:
            await pop.login("alice", "secret")
            await pop.dele(1)
            await pop.retr(2)
    assert caught.value.code == "connection_lost"
    assert mini.deleted_at_quit == []


async def test_connection_refused(closed_port: int) -> None:
    with pytest.raises(POP3ConnectError) as caught:
        await client(closed_port).connect()
    assert caught.value.code == "connect_failed"


async def test_err_greeting(serve: StartServer) -> None:
    server = await serve(MiniPOP3(greeting=b"-ERR [SYS/TEMP] too many connections\r\n"))
    with pytest.raises(POP3ConnectError, match="too many connections"):
        await client(server.port).connect()


async def test_err_to_quit_is_update_failed(serve: StartServer) -> None:
    server = await serve(
        MiniPOP3(
            messages=messages(1), replies={"QUIT": b"-ERR some deleted messages not removed\r\n"}
        )
    )
    pop = client(server.port)
    with pytest.raises(UpdateFailed) as caught:
        async with pop:
            await pop.login("alice", "secret")
            await pop.dele(1)
    assert caught.value.code == "update_failed"
    assert "not removed" in caught.value.text
    assert not pop.usable


@pytest.mark.parametrize(
    "greeting",
    [
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2p1\r\n",
        b"220 smtp.example.com ESMTP\r\n",
    ],
)
async def test_garbage_instead_of_a_greeting(serve: StartServer, greeting: bytes) -> None:
    server = await serve(MiniPOP3(greeting=greeting))
    with pytest.raises(RemoteProtocolError) as caught:
        await client(server.port).connect()
    assert caught.value.code == "protocol_error"


async def test_garbage_without_line_end_is_not_a_hang(serve: StartServer) -> None:
    # A generous timeout: the client must recognise garbage, not wait for a CRLF.
    server = await serve(MiniPOP3(greeting=b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"))
    with pytest.raises(RemoteProtocolError):
        await client(server.port, timeout=60).connect()


async def test_garbage_status_after_a_command(serve: StartServer) -> None:
    server = await serve(MiniPOP3(messages=messages(1), replies={"STAT": b"OK 1 200\r\n"}))
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        with pytest.raises(RemoteProtocolError):
            await pop.stat()
        assert not pop.usable


async def test_one_megabyte_status_line(serve: StartServer) -> None:
    server = await serve(MiniPOP3(replies={"NOOP": b"+OK " + b"x" * 1_000_000 + b"\r\n"}))
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        with pytest.raises(LineTooLong) as caught:
            await pop.noop()
    assert caught.value.code == "line_too_long"


# Size caps ---------------------------------------------------------------------------------


async def test_retr_larger_than_its_list_size_is_abandoned(serve: StartServer) -> None:
    bodies = messages(3)
    bodies[1] = b"Subject: liar\r\n\r\n" + b"z" * 300_000 + b"\r\n"
    mini = MiniPOP3(messages=bodies, listed_sizes={2: 1000})  # LIST says 1 KB
    server = await serve(mini)
    received: list[int] = []
    with pytest.raises(MessageTooLarge) as caught:
        async with client(server.port) as pop:
            await pop.login("alice", "secret")
            async for number, _data in pop.retrieve_many([1, 2, 3]):
                received.append(number)
                await asyncio.sleep(0)
    error = caught.value
    assert (error.code, error.number, error.listed_size, error.abandoned) == (
        "message_too_large",
        2,
        1000,
        True,
    )
    assert error.limit < 300_000
    assert received == [1]
    assert not pop.usable
    assert "DELE" not in server.commands() and "QUIT" not in server.commands()


async def test_message_listed_over_the_cap_is_refused_before_retr(serve: StartServer) -> None:
    bodies = messages(3)
    bodies[2] = b"Subject: big\r\n\r\n" + b"b" * 5000 + b"\r\n"
    server = await serve(MiniPOP3(messages=bodies))
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        with pytest.raises(MessageTooLarge) as caught:
            async for _ in pop.retrieve_many([1, 2, 3], max_bytes=4000):
                pass
        assert caught.value.abandoned is False and caught.value.listed_size == len(bodies[2])
        assert pop.usable
        assert [n async for n, _ in pop.retrieve_many([1, 2], max_bytes=4000)] == [1, 2]
    assert server.commands().count("RETR") == 2


async def test_retr_over_the_cap_without_list(serve: StartServer) -> None:
    server = await serve(MiniPOP3(messages=[b"x" * 10_000 + b"\r\n"]))
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        with pytest.raises(MessageTooLarge) as caught:
            await pop.retr(1, max_bytes=1000)
        assert caught.value.abandoned and not pop.usable


async def test_listing_larger_than_max_response(serve: StartServer) -> None:
    server = await serve(MiniPOP3(messages=messages(50)))
    async with client(server.port, max_response=200) as pop:
        await pop.login("alice", "secret")
        with pytest.raises(ResponseTooLarge) as caught:
            await pop.uidl()
    assert caught.value.code == "response_too_large"


@pytest.mark.parametrize(
    "unique_ids",
    [["same", "same"], ["a" * 71, "b"], ["has\x7fdel", "b"], ["ok", "caf\u00e9"]],
)
async def test_invalid_or_duplicate_uidl_is_a_protocol_error(
    serve: StartServer, unique_ids: list[str]
) -> None:
    server = await serve(MiniPOP3(messages=messages(2), unique_ids=unique_ids))
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        with pytest.raises(RemoteProtocolError):
            await pop.uidl()
        assert not pop.usable  # a server lying about identities gets no DELE


# Pipelining and the streaming iterators --------------------------------------------------


async def test_pipelines_only_when_offered(serve: StartServer) -> None:
    bodies = messages(40)
    plain = await serve(MiniPOP3(messages=bodies, capabilities=("USER",)))
    piped = await serve(MiniPOP3(messages=bodies))
    for server in (plain, piped):
        async with client(server.port, pipeline_window=8) as pop:
            await pop.login("alice", "secret")
            got = [data async for _, data in pop.retrieve_many(range(1, 41))]
            assert got == bodies
            await pop.dele(range(1, 41))
    assert plain.session.pipelined == []
    assert any(line.startswith(b"RETR") for line in piped.session.pipelined)
    assert any(line.startswith(b"DELE") for line in piped.session.pipelined)


async def test_err_to_one_retr_leaves_the_client_usable(serve: StartServer) -> None:
    server = await serve(MiniPOP3(messages=messages(5)))
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        got = []
        with pytest.raises(CommandRejected) as caught:
            async for number, _ in pop.retrieve_many([1, 2, 9, 3, 4]):
                got.append(number)
        assert caught.value.command == "RETR" and got == [1, 2]
        assert pop.usable and (await pop.stat()).messages == 5


async def test_dele_reports_refusals_after_reading_every_reply(serve: StartServer) -> None:
    mini = MiniPOP3(messages=messages(3))
    server = await serve(mini)
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        with pytest.raises(CommandRejected, match="7, 8"):
            await pop.dele([1, 7, 8, 3])
        assert (await pop.stat()).messages == 1
    assert mini.deleted_at_quit == [1, 3]
    assert server.commands().count("DELE") == 4


async def test_breaking_out_of_retrieve_many_keeps_the_client_usable(serve: StartServer) -> None:
    mini = MiniPOP3(messages=messages(30))
    server = await serve(mini)
    async with client(server.port, pipeline_window=16) as pop:
        await pop.login("alice", "secret")
        async with contextlib.aclosing(pop.retrieve_many(range(1, 31))) as stream:
            async for number, _ in stream:
                if number == 3:
                    break
        await pop.dele([1, 2, 3])
    assert mini.deleted_at_quit == [1, 2, 3]


async def test_another_command_abandons_a_suspended_iteration(serve: StartServer) -> None:
    mini = MiniPOP3(messages=messages(10))
    server = await serve(mini)
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        stream = pop.retrieve_many(range(1, 11))
        assert (await anext(stream))[0] == 1
        assert (await pop.stat()).messages == 10  # abandons the iteration, reads its replies
        with pytest.raises(LocalProtocolError, match="abandoned"):
            await anext(stream)
        chunks = pop.retr_chunks(4)
        assert await anext(chunks)
        await pop.noop()
        with pytest.raises(LocalProtocolError):
            await anext(chunks)
        assert await pop.retr(10) == messages(10)[9]
    assert server.commands()[-1] == "QUIT"


async def test_cancelled_operation_makes_the_client_unusable(serve: StartServer) -> None:
    async def slow(session: Session, line: bytes) -> bool:
        await asyncio.sleep(3600)
        return True

    server = await serve(MiniPOP3(messages=messages(1), replies={"RETR": slow}))
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        task = asyncio.create_task(pop.retr(1))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not pop.usable
    assert "QUIT" not in server.commands()


async def test_quit_nowait_sends_quit_and_closes(serve: StartServer) -> None:
    mini = MiniPOP3(messages=messages(2))
    server = await serve(mini)
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        await pop.uidl()
        pop.quit_nowait()
        assert not pop.usable
    # QUIT reaches the server once (the context's exit sends no second one).
    commands = await until(lambda: asyncio.sleep(0, server.commands()), lambda seen: "QUIT" in seen)
    assert commands.count("QUIT") == 1
    assert mini.deleted_at_quit == []


async def test_quit_nowait_after_dele_does_not_commit_them_blindly(serve: StartServer) -> None:
    # With deletions marked, QUIT must be answered: quit_nowait only drops the connection.
    mini = MiniPOP3(messages=messages(2))
    server = await serve(mini)
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        await pop.dele(1)
        pop.quit_nowait()
        assert not pop.usable
    await asyncio.sleep(0.05)
    assert "QUIT" not in server.commands()
    assert mini.deleted_at_quit == []


async def test_exception_inside_async_with_sends_no_quit(serve: StartServer) -> None:
    mini = MiniPOP3(messages=messages(2))
    server = await serve(mini)
    with pytest.raises(RuntimeError):
        async with client(server.port) as pop:
            await pop.login("alice", "secret")
            await pop.dele([1, 2])
            raise RuntimeError("storing failed")
    await asyncio.sleep(0.05)
    assert "QUIT" not in server.commands()
    assert mini.deleted_at_quit == []


async def test_retr_chunks_concatenate_to_the_message(serve: StartServer) -> None:
    # Larger than the client's read buffer limit, so it cannot arrive in one piece.
    body = b"".join(b"line %06d\r\n.dot\r\n" % i for i in range(200_000))
    server = await serve(MiniPOP3(messages=[body]))
    async with client(server.port) as pop:
        await pop.login("alice", "secret")
        chunks = [chunk async for chunk in pop.retr_chunks(1)]
    assert len(chunks) > 1 and b"".join(chunks) == body


async def test_constructor_validates_its_arguments() -> None:
    with pytest.raises(InvalidArgument):
        POP3Client("mail.example.com", 995, Security.TLS, connect_address="mail.example.com")
    with pytest.raises(InvalidArgument):
        POP3Client("mail.example.com", 0, Security.TLS)
    with pytest.raises(InvalidArgument):
        POP3Client("mail.example.com\r\n", 995, Security.TLS)
    with pytest.raises(InvalidArgument):
        POP3Client("mail.example.com", 995, "tls")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        POP3Client("localhost", 995, Security.TLS, ca_file="x.pem", ssl_context=object())  # type: ignore[arg-type]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
