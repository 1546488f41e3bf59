"""The outbound connection guard: address rules, embedded IPv4 forms, resolution, rebinding.

No DNS is queried except for ``localhost``: resolvers are injected. The IPv6 forms are built
here independently of ``service.netguard`` (byte layouts from the RFCs), so a mistake in the
guard's unwrapping cannot hide behind the same mistake in the test.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from service.netguard import (
    ALWAYS_REFUSED,
    METADATA_NETWORKS,
    ConnectionGuard,
    HostNotAllowed,
    HostUnresolvable,
    NetGuardError,
    Refusal,
    Resolver,
    parse_ip_literal,
)

EVERYTHING = (IPv4Network("0.0.0.0/0"), IPv6Network("::/0"))
LOOPBACK_V4 = (IPv4Network("127.0.0.0/8"),)
U32 = (1 << 32) - 1

# --- IPv6 forms that carry an IPv4 address, built from the RFC layouts ---------------------


def mapped(v4: IPv4Address) -> IPv6Address:  # RFC 4291 2.5.5.2  ::ffff:a.b.c.d
    return IPv6Address((0xFFFF << 32) | int(v4))


def translated(v4: IPv4Address) -> IPv6Address:  # RFC 2765  ::ffff:0:a.b.c.d
    return IPv6Address((0xFFFF << 48) | int(v4))


def compatible(v4: IPv4Address) -> IPv6Address:  # RFC 4291 2.5.5.1  ::a.b.c.d
    return IPv6Address(int(v4))


def nat64(v4: IPv4Address) -> IPv6Address:  # RFC 6052 well-known prefix 64:ff9b::/96
    return IPv6Address(int(IPv6Address("64:ff9b::")) | int(v4))


def six_to_four(v4: IPv4Address, rest: int = 0) -> IPv6Address:  # RFC 3056 2002:V4ADDR::/48
    return IPv6Address((0x2002 << 112) | (int(v4) << 80) | (rest & ((1 << 80) - 1)))


def nat64_local(v4: IPv4Address, length: int, noise: int = 0) -> IPv6Address:
    """RFC 6052 2.2 layout under the local-use prefix 64:ff9b:1::/48 (RFC 8215)."""
    raw = bytearray(noise.to_bytes(16, "big"))
    raw[0:6] = IPv6Address("64:ff9b:1::").packed[0:6]
    raw[8] = 0  # the "u" octet is always zero
    v4_bytes = v4.packed
    if length == 96:
        raw[12:16] = v4_bytes
    else:
        first = 8 - length // 8  # IPv4 bytes that fit before the u octet
        raw[length // 8 : 8] = v4_bytes[:first]
        raw[9 : 9 + 4 - first] = v4_bytes[first:]
    return IPv6Address(bytes(raw))


def teredo(server: IPv4Address, client: IPv4Address, flags_port: int = 0) -> IPv6Address:
    """RFC 4380 4: 2001:0000:server:flags:port:client, client and port obfuscated."""
    return IPv6Address(
        (0x20010000 << 96) | (int(server) << 64) | ((flags_port & U32) << 32) | (~int(client) & U32)
    )


WRAPPERS: dict[str, Callable[[IPv4Address], IPv6Address]] = {
    "mapped": mapped,
    "translated": translated,
    "compatible": compatible,
    "nat64": nat64,
    "6to4": six_to_four,
}


def refusal(address: str, allowed: Sequence[IPv4Network | IPv6Network] = ()) -> Refusal | None:
    return ConnectionGuard(tuple(allowed)).refusal(ipaddress.ip_address(address))


# --- fixed cases ----------------------------------------------------------------------------

ALWAYS_REFUSED_CASES = [
    ("169.254.169.254", Refusal.METADATA),
    ("169.254.170.2", Refusal.METADATA),
    ("100.100.100.200", Refusal.METADATA),
    ("168.63.129.16", Refusal.METADATA),
    ("192.0.0.192", Refusal.METADATA),
    ("fd00:ec2::254", Refusal.METADATA),
    ("fd00:ec2::253", Refusal.METADATA),
    ("fd20:ce::254", Refusal.METADATA),
    ("169.254.0.1", Refusal.LINK_LOCAL),
    ("169.254.255.255", Refusal.LINK_LOCAL),
    ("fe80::1", Refusal.LINK_LOCAL),
    ("fe80::1%eth0", Refusal.LINK_LOCAL),
    ("febf:ffff::1", Refusal.LINK_LOCAL),
    ("0.0.0.0", Refusal.UNSPECIFIED),
    ("0.1.2.3", Refusal.UNSPECIFIED),
    ("::", Refusal.UNSPECIFIED),
    ("224.0.0.1", Refusal.MULTICAST),
    ("239.255.255.250", Refusal.MULTICAST),
    ("ff02::1", Refusal.MULTICAST),
    ("ff0e::1", Refusal.MULTICAST),
    ("255.255.255.255", Refusal.BROADCAST),
    ("240.0.0.1", Refusal.RESERVED),
    ("254.1.2.3", Refusal.RESERVED),
    ("100::1", Refusal.RESERVED),  # discard-only
    ("::1:0:0:0", Refusal.RESERVED),
    ("5f00::1", Refusal.RESERVED),
    ("e000::1", Refusal.RESERVED),
    # embedded forms of the metadata address
    ("::ffff:169.254.169.254", Refusal.METADATA),
    ("::ffff:a9fe:a9fe", Refusal.METADATA),
    ("::ffff:0:169.254.169.254", Refusal.METADATA),
    ("::169.254.169.254", Refusal.METADATA),
    ("64:ff9b::169.254.169.254", Refusal.METADATA),
    ("64:ff9b::a9fe:a9fe", Refusal.METADATA),
    ("2002:a9fe:a9fe::1", Refusal.METADATA),
    ("2002:a9fe:a9fe:1234:5678::9", Refusal.METADATA),
    ("64:ff9b:1:a9fe:a9:fe00::", Refusal.METADATA),  # local-use NAT64, /48 layout
    ("64:ff9b:1:1:2:3:a9fe:a9fe", Refusal.METADATA),  # local-use NAT64, /96 layout
    ("::ffff:100.100.100.200", Refusal.METADATA),
    ("64:ff9b::168.63.129.16", Refusal.METADATA),
    ("::ffff:0.0.0.0", Refusal.UNSPECIFIED),
    ("::ffff:224.0.0.1", Refusal.MULTICAST),
    ("::ffff:169.254.1.1", Refusal.LINK_LOCAL),
    ("2002:f000:1::1", Refusal.RESERVED),
]


@pytest.mark.parametrize(("address", "reason"), ALWAYS_REFUSED_CASES)
def test_always_refused_even_when_everything_is_allowed(address: str, reason: Refusal) -> None:
    assert refusal(address) == reason
    assert refusal(address, EVERYTHING) == reason
    assert not reason.admissible


def test_teredo_with_metadata_client_is_refused() -> None:
    address = teredo(IPv4Address("65.54.227.120"), IPv4Address("169.254.169.254"), 0x8000_1234)
    assert refusal(str(address), EVERYTHING) == Refusal.METADATA
    server_side = teredo(IPv4Address("169.254.169.254"), IPv4Address("8.8.8.8"))
    assert refusal(str(server_side), EVERYTHING) == Refusal.METADATA


ADMISSIBLE_CASES = [
    ("127.0.0.1", Refusal.LOOPBACK, "127.0.0.0/8"),
    ("127.255.0.9", Refusal.LOOPBACK, "127.0.0.0/8"),
    ("::1", Refusal.LOOPBACK, "::1/128"),
    ("10.1.2.3", Refusal.PRIVATE, "10.0.0.0/8"),
    ("172.16.5.4", Refusal.PRIVATE, "172.16.0.0/12"),
    ("172.31.255.255", Refusal.PRIVATE, "172.16.0.0/12"),
    ("192.168.1.1", Refusal.PRIVATE, "192.168.1.0/24"),
    ("100.64.0.1", Refusal.SHARED, "100.64.0.0/10"),
    ("100.127.255.254", Refusal.SHARED, "100.64.0.0/10"),
    ("fc00::1", Refusal.UNIQUE_LOCAL, "fc00::/7"),
    ("fd12:3456:789a::1", Refusal.UNIQUE_LOCAL, "fd12:3456:789a::/48"),
    ("192.0.2.1", Refusal.NON_GLOBAL, "192.0.2.0/24"),
    ("198.18.0.1", Refusal.NON_GLOBAL, "198.18.0.0/15"),
    ("203.0.113.7", Refusal.NON_GLOBAL, "203.0.113.0/24"),
    ("2001:db8::1", Refusal.NON_GLOBAL, "2001:db8::/32"),
    ("3fff::1", Refusal.NON_GLOBAL, "3fff::/20"),
    ("fec0::1", Refusal.NON_GLOBAL, "fec0::/10"),
    ("64:ff9b:1::8.8.8.8", Refusal.NON_GLOBAL, "64:ff9b:1::/48"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", Refusal.NON_GLOBAL, "2001::/32"),  # Teredo
    # wrapped forms are judged (and admitted) as their IPv4 address
    ("::ffff:127.0.0.1", Refusal.LOOPBACK, "127.0.0.0/8"),
    ("::ffff:10.0.0.1", Refusal.PRIVATE, "10.0.0.0/8"),
    ("64:ff9b::192.168.0.1", Refusal.PRIVATE, "192.168.0.0/16"),
    ("2002:0a00:0001::1", Refusal.PRIVATE, "10.0.0.0/8"),
    ("::127.0.0.1", Refusal.LOOPBACK, "127.0.0.0/8"),
]


@pytest.mark.parametrize(("address", "reason", "network"), ADMISSIBLE_CASES)
def test_non_global_refused_unless_allowed(address: str, reason: Refusal, network: str) -> None:
    assert refusal(address) == reason
    assert reason.admissible
    assert refusal(address, [ipaddress.ip_network(network)]) is None
    assert refusal(address, EVERYTHING) is None


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "169.253.255.255",
        "169.255.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "223.255.255.255",
        "2606:4700:4700::1111",
        "2001:4860:4860::8888",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "::ffff:0:8.8.8.8",
        "64:ff9b::8.8.8.8",
        "2002:0808:0808::1",
    ],
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(address) is None
    ConnectionGuard().check_address(address)


def test_allowed_networks_do_not_cross_families() -> None:
    assert refusal("::1", LOOPBACK_V4) == Refusal.LOOPBACK
    assert refusal("127.0.0.1", [IPv6Network("::/0")]) == Refusal.LOOPBACK
    assert refusal("10.0.0.1", LOOPBACK_V4) == Refusal.PRIVATE


def test_an_allowed_ipv6_prefix_does_not_admit_a_wrapped_private_ipv4() -> None:
    # ::ffff:10.0.0.1 *is* 10.0.0.1: only an IPv4 network can admit it.
    assert refusal("::ffff:10.0.0.1", [IPv6Network("::ffff:0:0/96")]) == Refusal.PRIVATE


def test_check_address_raises_with_context() -> None:
    guard = ConnectionGuard()
    with pytest.raises(HostNotAllowed) as caught:
        guard.check_address(IPv4Address("10.0.0.5"), host="pop.internal")
    error = caught.value
    assert (error.host, error.address, error.reason) == ("pop.internal", "10.0.0.5", "private")
    assert error.code == "host_not_allowed"
    assert isinstance(error, NetGuardError)
    assert error.transient is False
    assert error.account_level is True
    assert "MAILROOM_ALLOWED_NETWORKS" in error.detail
    assert "10.0.0.5" not in str(error)  # the resolved address stays out of messages
    with pytest.raises(HostNotAllowed, match="never allowed"):
        guard.check_address("169.254.169.254")
    with pytest.raises(ValueError):
        guard.check_address("not-an-address")


def test_check_host_literal_checks_literals_only() -> None:
    guard = ConnectionGuard()
    guard.check_host_literal("pop.example.com")  # names are left to resolve()
    guard.check_host_literal("8.8.8.8")
    with pytest.raises(HostNotAllowed):
        guard.check_host_literal("127.0.0.1")
    with pytest.raises(HostNotAllowed):
        guard.check_host_literal("[::1]")


def test_parse_ip_literal() -> None:
    assert parse_ip_literal("[2001:db8::1]") == IPv6Address("2001:db8::1")
    assert parse_ip_literal("10.0.0.1") == IPv4Address("10.0.0.1")
    assert parse_ip_literal("127.1") is None  # shorthand: the resolver's job, then checked
    assert parse_ip_literal("mail.example.com") is None


# --- properties -----------------------------------------------------------------------------


def ipv4_in(network: str) -> st.SearchStrategy[IPv4Address]:
    net = IPv4Network(network)
    return st.integers(int(net.network_address), int(net.broadcast_address)).map(IPv4Address)


metadata_or_link_local_ipv4 = st.one_of(
    st.sampled_from([n.network_address for n in METADATA_NETWORKS if n.version == 4]),
    ipv4_in("169.254.0.0/16"),
)
always_refused_ipv4 = st.one_of(
    metadata_or_link_local_ipv4,
    ipv4_in("0.0.0.0/8"),
    ipv4_in("224.0.0.0/4"),
    ipv4_in("240.0.0.0/4"),
)
allowed_sets = st.sampled_from(
    [
        (),
        LOOPBACK_V4,
        (IPv4Network("10.0.0.0/8"), IPv4Network("192.168.0.0/16")),
        (IPv4Network("100.64.0.0/10"), IPv6Network("fc00::/7")),
        EVERYTHING,
    ]
)


@given(
    v4=always_refused_ipv4,
    form=st.sampled_from(["bare", *sorted(WRAPPERS)]),
    rest=st.integers(0, (1 << 80) - 1),
    allowed=allowed_sets,
)
def test_always_refused_ipv4_is_refused_in_every_form(
    v4: IPv4Address, form: str, rest: int, allowed: tuple[IPv4Network, ...]
) -> None:
    address: IPv4Address | IPv6Address
    if form == "bare":
        address = v4
    elif form == "6to4":
        address = six_to_four(v4, rest)
    else:
        assume(not (form == "compatible" and int(v4) <= 1))  # ::, ::1 are IPv6 themselves
        address = WRAPPERS[form](v4)
    reason = ConnectionGuard(allowed).refusal(address)
    assert reason in ALWAYS_REFUSED, (str(address), reason)


@given(
    v4=metadata_or_link_local_ipv4,
    form=st.sampled_from(["teredo-client", "teredo-server", "local64"]),
    noise=st.integers(0, (1 << 128) - 1),
    length=st.sampled_from([48, 56, 64, 96]),
    allowed=allowed_sets,
)
@example(v4=IPv4Address("169.254.169.254"), form="local64", noise=0, length=56, allowed=EVERYTHING)
def test_metadata_and_link_local_are_refused_wherever_they_may_be_embedded(
    v4: IPv4Address, form: str, noise: int, length: int, allowed: tuple[IPv4Network, ...]
) -> None:
    other = IPv4Address(noise & U32)
    if form == "teredo-client":
        address = teredo(other, v4, noise >> 64)
    elif form == "teredo-server":
        address = teredo(v4, other, noise >> 64)
    else:
        address = nat64_local(v4, length, noise)
    reason = ConnectionGuard(allowed).refusal(address)
    assert reason in (Refusal.METADATA, Refusal.LINK_LOCAL), (str(address), reason)


@given(
    v4=st.ip_addresses(v=4),
    form=st.sampled_from(sorted(WRAPPERS)),
    allowed=allowed_sets,
    rest=st.integers(0, (1 << 80) - 1),
)
def test_wrapped_ipv4_is_judged_as_the_ipv4_address(
    v4: IPv4Address, form: str, allowed: tuple[IPv4Network, ...], rest: int
) -> None:
    assume(not (form == "compatible" and int(v4) <= 1))
    guard = ConnectionGuard(allowed)
    wrapped = six_to_four(v4, rest) if form == "6to4" else WRAPPERS[form](v4)
    assert guard.refusal(wrapped) == guard.refusal(v4)


# Not globally reachable per the IANA special-purpose registries (checked independently of
# the guard's own tables and of the standard library's version-dependent flags).
NOT_GLOBAL = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    )
]


def _unwrapped(ip: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """The IPv4 address an IPv6 form stands for (the five WRAPPERS forms), else ``ip``."""
    if isinstance(ip, IPv4Address):
        return ip
    low = IPv4Address(int(ip) & U32)
    for prefix in ("::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96"):
        if ip in IPv6Network(prefix):
            return low
    if ip in IPv6Network("::/96") and int(ip) > 1:
        return low
    if ip in IPv6Network("2002::/16"):
        return IPv4Address((int(ip) >> 80) & U32)
    return ip


@given(ip=st.ip_addresses())
@example(ip=IPv6Address("64:ff9b:1::1"))
@example(ip=IPv6Address("fec0::1"))
@example(ip=IPv4Address("224.0.0.1"))
@example(ip=IPv6Address("::8.8.8.8"))
@example(ip=IPv6Address("::ffff:0:8.8.8.8"))
@example(ip=IPv6Address("::ffff:10.0.0.1"))
@example(ip=IPv6Address("2002:7f00:1::"))
def test_nothing_non_global_passes_without_allowed_networks(
    ip: IPv4Address | IPv6Address,
) -> None:
    if ConnectionGuard().refusal(ip) is not None:
        return
    target = _unwrapped(ip)
    if isinstance(target, IPv6Address):
        assert target in IPv6Network("2000::/3"), ip
    assert not any(target in net for net in NOT_GLOBAL if net.version == target.version), ip
    assert not any(target in net for net in METADATA_NETWORKS), ip


@given(ip=st.ip_addresses(v=4))
def test_public_ipv4_passes(ip: IPv4Address) -> None:
    assume(ip.is_global and not ip.is_multicast)
    assume(not any(ip in net for net in NOT_GLOBAL if net.version == 4))
    assume(not any(ip in net for net in METADATA_NETWORKS))
    assume(ip not in IPv4Network("192.88.99.0/24"))  # deprecated 6to4 relay anycast
    assert ConnectionGuard().refusal(ip) is None


@given(data=st.data(), version=st.sampled_from([4, 6]), prefix=st.integers(0, 32))
def test_an_allowed_network_admits_everything_but_the_always_refused(
    data: st.DataObject, version: Literal[4, 6], prefix: int
) -> None:
    bits = 32 if version == 4 else 128
    base = data.draw(st.ip_addresses(v=version))
    length = prefix * bits // 32
    network = ipaddress.ip_network(f"{base}/{length}", strict=False)
    ip = data.draw(st.ip_addresses(network=network))
    assume(_unwrapped(ip) == ip)
    reason = ConnectionGuard([network]).refusal(ip)
    assert reason is None or reason in ALWAYS_REFUSED


# --- resolution -----------------------------------------------------------------------------


def fixed(answers: dict[str, list[str]]) -> Resolver:
    """A resolver answering from ``answers`` (and recording nothing else)."""

    async def resolve(host: str, port: int) -> list[str]:
        return list(answers[host])

    return resolve


async def never_called(host: str, port: int) -> list[str]:
    raise AssertionError(f"resolver called for {host}")


async def test_literals_are_checked_without_a_lookup() -> None:
    guard = ConnectionGuard(
        (IPv4Network("127.0.0.0/8"), IPv6Network("::1/128")), resolver=never_called
    )
    assert await guard.resolve("127.0.0.1", 110) == ["127.0.0.1"]
    assert await guard.resolve("[::1]", 110) == ["::1"]
    assert await guard.resolve("8.8.8.8", 25) == ["8.8.8.8"]
    with pytest.raises(HostNotAllowed) as caught:
        await guard.resolve("169.254.169.254", 80)
    assert caught.value.reason == Refusal.METADATA
    assert caught.value.host == caught.value.address == "169.254.169.254"


async def test_every_address_of_a_name_must_pass() -> None:
    answers = {
        "mail.example.com": ["93.184.216.34", "2606:2800:220:1::1946", "93.184.216.34"],
        "split.example.com": ["93.184.216.34", "10.0.0.7", "8.8.8.8"],
        "meta.example.com": ["8.8.8.8", "::ffff:169.254.169.254"],
    }
    guard = ConnectionGuard(resolver=fixed(answers))
    assert await guard.resolve("mail.example.com", 995) == [
        "93.184.216.34",
        "2606:2800:220:1::1946",
    ]
    with pytest.raises(HostNotAllowed) as caught:
        await guard.resolve("split.example.com", 995)
    assert (caught.value.address, caught.value.reason) == ("10.0.0.7", Refusal.PRIVATE)
    assert caught.value.host == "split.example.com"
    assert "10.0.0.7" not in caught.value.detail
    with pytest.raises(HostNotAllowed) as caught:
        await guard.resolve("meta.example.com", 995)
    assert caught.value.reason == Refusal.METADATA


async def test_dns_rebinding_is_checked_on_every_resolution() -> None:
    """The first answer is public, the next points inside: each resolve() sees its own."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["169.254.169.254"]])

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    guard = ConnectionGuard(resolver=rebinding)
    assert await guard.resolve("rebind.example.com", 25) == ["93.184.216.34"]
    with pytest.raises(HostNotAllowed) as caught:
        await guard.resolve("rebind.example.com", 25)
    assert caught.value.reason == Refusal.LOOPBACK
    with pytest.raises(HostNotAllowed) as caught:
        await guard.resolve("rebind.example.com", 25)
    assert caught.value.reason == Refusal.METADATA


async def test_numeric_shorthand_is_caught_after_resolution() -> None:
    # getaddrinfo turns "2130706433" and "127.1" into 127.0.0.1; simulated here.
    guard = ConnectionGuard(resolver=fixed({"2130706433": ["127.0.0.1"], "127.1": ["127.0.0.1"]}))
    for host in ("2130706433", "127.1"):
        with pytest.raises(HostNotAllowed) as caught:
            await guard.resolve(host, 25)
        assert caught.value.reason == Refusal.LOOPBACK


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), False),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), True),
        (UnicodeError("label too long"), False),
        (OSError("resolver broke"), True),
    ],
)
async def test_resolution_failures_are_unresolvable(error: Exception, transient: bool) -> None:
    async def failing(host: str, port: int) -> list[str]:
        raise error

    with pytest.raises(HostUnresolvable) as caught:
        await ConnectionGuard(resolver=failing).resolve("nowhere.example", 110)
    assert caught.value.code == "host_unresolvable"
    assert caught.value.transient is transient
    assert caught.value.host == "nowhere.example"
    assert caught.value.__cause__ is error


async def test_empty_and_garbage_answers_are_unresolvable() -> None:
    guard = ConnectionGuard(resolver=fixed({"empty.example": [], "junk.example": ["nope"]}))
    with pytest.raises(HostUnresolvable, match="no address"):
        await guard.resolve("empty.example", 25)
    with pytest.raises(HostUnresolvable):
        await guard.resolve("junk.example", 25)
    with pytest.raises(HostUnresolvable):
        await guard.resolve("", 25)


async def test_localhost_with_the_system_resolver() -> None:
    loopback = (IPv4Network("127.0.0.0/8"), IPv6Network("::1/128"))
    addresses = await ConnectionGuard(loopback).resolve("localhost", 110)
    assert addresses
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses)
    with pytest.raises(HostNotAllowed) as caught:
        await ConnectionGuard().resolve("localhost", 110)
    assert caught.value.reason == Refusal.LOOPBACK


async def test_the_caller_dials_the_checked_address() -> None:
    """The contract: connect to what resolve() returned, not to the name."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK ready\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        guard = ConnectionGuard(LOOPBACK_V4, resolver=fixed({"pop.test": ["127.0.0.1"]}))
        addresses = await guard.resolve("pop.test", port)
        reader, writer = await asyncio.open_connection(addresses[0], port)
        assert await reader.readline() == b"+OK ready\r\n"
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
