"""POP3Client end to end against a real Dovecot (started by tests/servers/dovecot.py)."""

from __future__ import annotations

import contextlib
import ssl

import pytest
import trustme

from service.domain.enums import Security
from service.pop3 import (
    AuthFailed,
    AuthMechanism,
    MessageTooLarge,
    POP3Client,
    TLSCertificateInvalid,
    TLSRequired,
)
from tests.servers.dovecot import Dovecot, Mailbox


def connect(
    server: Dovecot, security: Security = Security.STARTTLS, **kwargs: object
) -> POP3Client:
    port = server.pop3s_port if security is Security.TLS else server.pop3_port
    assert port is not None
    kwargs.setdefault("ca_file", server.ca_file)
    kwargs.setdefault("timeout", 20)
    return POP3Client(server.hostname, port, security, **kwargs)  # type: ignore[arg-type]


def message(index: int, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: a{index}@example.org\r\nTo: b@example.net\r\n"
        f"Subject: test {index}\r\nMessage-ID: <{index}@example.org>\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize("security", [Security.STARTTLS, Security.TLS, Security.NONE])
async def test_login_and_fetch_with_every_security_mode(
    dovecot: Dovecot, mailbox: Mailbox, security: Security
) -> None:
    mailbox.deliver(message(1))
    async with connect(dovecot, security) as pop:
        assert pop.tls_active is (security is not Security.NONE)
        assert pop.pipelining  # Dovecot advertises PIPELINING
        await pop.login(mailbox.user, mailbox.password)
        assert await pop.stat() == (1, len(message(1)))
        assert await pop.retr(1) == message(1)


@pytest.mark.parametrize(
    "mechanism", [AuthMechanism.PLAIN, AuthMechanism.USER, AuthMechanism.LOGIN]
)
async def test_each_authentication_mechanism(
    dovecot: Dovecot, mailbox: Mailbox, mechanism: AuthMechanism
) -> None:
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password, mechanism=mechanism)
        assert await pop.stat() == (0, 0)


@pytest.mark.parametrize("mechanism", [None, AuthMechanism.USER])
async def test_wrong_password(
    dovecot: Dovecot, mailbox: Mailbox, mechanism: AuthMechanism | None
) -> None:
    async with connect(dovecot) as pop:
        with pytest.raises(AuthFailed) as caught:
            await pop.login(mailbox.user, mailbox.password + "x", mechanism=mechanism)
    assert caught.value.code == "auth_failed"


async def test_stls_not_offered_by_the_server(dovecot_plain: Dovecot) -> None:
    box = dovecot_plain.add_user()
    with pytest.raises(TLSRequired) as caught:
        async with connect(dovecot_plain, Security.STARTTLS) as pop:
            await pop.login(box.user, box.password)
    assert caught.value.code == "tls_required"
    async with connect(dovecot_plain, Security.NONE) as pop:  # the same server in clear
        await pop.login(box.user, box.password)


@pytest.mark.parametrize("security", [Security.STARTTLS, Security.TLS])
async def test_certificate_from_another_ca_is_refused(dovecot: Dovecot, security: Security) -> None:
    other = trustme.CA()
    context = ssl.create_default_context()
    other.configure_trust(context)
    with pytest.raises(TLSCertificateInvalid):
        await connect(dovecot, security, ca_file=None, ssl_context=context).connect()


@pytest.mark.parametrize("security", [Security.STARTTLS, Security.TLS])
async def test_certificate_for_another_host_is_refused(
    dovecot: Dovecot, security: Security
) -> None:
    port = dovecot.pop3s_port if security is Security.TLS else dovecot.pop3_port
    assert port is not None
    pop = POP3Client(
        "pop.example.org", port, security, ca_file=dovecot.ca_file, connect_address="127.0.0.1"
    )
    with pytest.raises(TLSCertificateInvalid):
        await pop.connect()


async def test_connect_address_with_a_verified_name(dovecot: Dovecot, mailbox: Mailbox) -> None:
    pop = POP3Client(
        "localhost",
        dovecot.pop3s_port or 0,
        Security.TLS,
        ca_file=dovecot.ca_file,
        connect_address="127.0.0.1",
    )
    async with pop:
        await pop.login(mailbox.user, mailbox.password)


async def test_empty_mailbox(dovecot: Dovecot, mailbox: Mailbox) -> None:
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        assert await pop.stat() == (0, 0)
        assert await pop.list() == {}
        assert await pop.uidl() == {}
        assert [m async for m in pop.retrieve_many([])] == []


async def test_a_thousand_messages(dovecot: Dovecot, mailbox: Mailbox) -> None:
    originals = [message(i, b"line\r\n" * (i % 50)) for i in range(1000)]
    mailbox.deliver_many(originals)
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        sizes = await pop.list()
        unique_ids = await pop.uidl()
        assert len(sizes) == 1000 and len(set(unique_ids.values())) == 1000
        assert sizes == {n: len(originals[n - 1]) for n in range(1, 1001)}
        got = {number: data async for number, data in pop.retrieve_many(sorted(sizes))}
    assert [got[n] for n in range(1, 1001)] == originals


async def test_lines_starting_with_dots(dovecot: Dovecot, mailbox: Mailbox) -> None:
    body = b".\r\n..\r\n...\r\n.leading dot\r\n. \r\nmiddle\r\n.\r\n..\r\n"
    original = b".Subject-ish first line with a dot\r\n\r\n" + body
    mailbox.deliver(message(1, body))
    mailbox.deliver(original)
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        assert await pop.retr(1) == message(1, body)
        assert await pop.retr(2) == original
        assert [d async for _, d in pop.retrieve_many([2, 1])] == [original, message(1, body)]


async def test_eight_bit_message(dovecot: Dovecot, mailbox: Mailbox) -> None:
    body = bytes(range(0x20, 0x100)) + b"\r\n" + "héllo wörld ✓\r\n".encode() + b"\xff\xfe\x80\r\n"
    mailbox.deliver(message(1, body))
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        assert await pop.retr(1) == message(1, body)


async def test_twenty_megabyte_message(dovecot: Dovecot, mailbox: Mailbox) -> None:
    line = b"0123456789" * 7 + b"\r\n"  # 72 bytes
    body = line * (20 * 1024 * 1024 // len(line)) + b".\r\n..end\r\n"
    original = message(1, body)
    mailbox.deliver(original)
    async with connect(dovecot, Security.TLS) as pop:
        await pop.login(mailbox.user, mailbox.password)
        assert await pop.list_one(1) == len(original)
        assert await pop.retr(1) == original
        chunks = [chunk async for chunk in pop.retr_chunks(1)]
    assert len(chunks) > 1
    assert sum(map(len, chunks)) == len(original) and b"".join(chunks) == original


async def test_top(dovecot: Dovecot, mailbox: Mailbox) -> None:
    mailbox.deliver(message(1, b"one\r\ntwo\r\nthree\r\n"))
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        head = message(1, b"")
        assert await pop.top(1, 0) == head
        assert await pop.top(1, 2) == head + b"one\r\ntwo\r\n"


async def test_single_message_listings(dovecot: Dovecot, mailbox: Mailbox) -> None:
    mailbox.deliver_many([message(1), message(2)])
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        unique_ids = await pop.uidl()
        assert await pop.uidl_one(2) == unique_ids[2]
        assert await pop.list_one(2) == len(message(2))
        await pop.noop()


async def test_dele_then_quit_deletes(dovecot: Dovecot, mailbox: Mailbox) -> None:
    mailbox.deliver_many([message(i) for i in range(5)])
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        await pop.dele([1, 3, 5])
        assert (await pop.stat()).messages == 2
    assert mailbox.count() == 2
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        assert [d async for _, d in pop.retrieve_many([1, 2])] == [message(1), message(3)]


async def test_dele_without_quit_deletes_nothing(dovecot: Dovecot, mailbox: Mailbox) -> None:
    mailbox.deliver_many([message(i) for i in range(3)])
    with pytest.raises(RuntimeError):
        async with connect(dovecot) as pop:
            await pop.login(mailbox.user, mailbox.password)
            await pop.dele([1, 2, 3])
            raise RuntimeError("the store failed to commit")
    pop = connect(dovecot)
    await pop.connect()
    await pop.login(mailbox.user, mailbox.password)
    await pop.dele(1)
    pop.close()  # dropped without QUIT
    assert mailbox.count() == 3
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        assert (await pop.stat()).messages == 3


async def test_rset_unmarks_deletions(dovecot: Dovecot, mailbox: Mailbox) -> None:
    mailbox.deliver_many([message(i) for i in range(2)])
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        await pop.dele([1, 2])
        await pop.rset()
        assert (await pop.stat()).messages == 2
    assert mailbox.count() == 2


async def test_cap_refuses_a_listed_large_message_and_keeps_it(
    dovecot: Dovecot, mailbox: Mailbox
) -> None:
    mailbox.deliver_many([message(1), message(2, b"x" * 50_000 + b"\r\n"), message(3)])
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        with pytest.raises(MessageTooLarge) as caught:
            async for _ in pop.retrieve_many([1, 2, 3], max_bytes=10_000):
                pass
        assert caught.value.number == 2 and not caught.value.abandoned
        assert [n async for n, _ in pop.retrieve_many([1, 3], max_bytes=10_000)] == [1, 3]
        await pop.dele([1, 3])
    assert mailbox.count() == 1


async def test_abandoned_transfer_deletes_nothing(dovecot: Dovecot, mailbox: Mailbox) -> None:
    mailbox.deliver_many([message(1), message(2, b"y" * 400_000 + b"\r\n")])
    async with connect(dovecot) as pop:
        await pop.login(mailbox.user, mailbox.password)
        await pop.dele(1)
        with pytest.raises(MessageTooLarge) as caught:
            await pop.retr(2, max_bytes=100_000)  # no LIST yet: found out mid-transfer
        assert caught.value.abandoned and not pop.usable
    assert mailbox.count() == 2


async def test_leaving_retrieve_many_early_then_deleting(
    dovecot: Dovecot, mailbox: Mailbox
) -> None:
    mailbox.deliver_many([message(i) for i in range(100)])
    async with connect(dovecot, pipeline_window=16) as pop:
        await pop.login(mailbox.user, mailbox.password)
        async with contextlib.aclosing(pop.retrieve_many(range(1, 101))) as stream:
            async for number, _ in stream:
                if number == 10:
                    break
        await pop.dele(range(1, 11))
    assert mailbox.count() == 90
