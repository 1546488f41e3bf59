"""Outbound connection guard (SSRF): which addresses an account's mail servers may be.

Accounts name their POP3 and SMTP hosts, so without a guard any API caller could make the
service connect to its own loopback, the private network it runs in, or a cloud metadata
endpoint. :class:`ConnectionGuard` resolves a host, checks *every* address it resolves to,
and returns the checked addresses to dial.

Contract for callers (this is what defeats DNS rebinding)::

    addresses = await guard.resolve(host, port)     # HostNotAllowed / HostUnresolvable
    reader, writer = await asyncio.open_connection(
        addresses[0], port, ssl=context, server_hostname=host
    )

Dial one of the returned IP literals (trying the next on a connection failure; all of them
passed) and never hand ``host`` itself to anything that resolves it again: a name whose DNS
answer changes between the check and the connect (TTL 0, rebinding) would otherwise reach
an address that was never checked. TLS still verifies the certificate against ``host``
(``server_hostname``), so dialling the address loses no authentication. Bound the call with
the connect timeout: the system resolver can be slow.

Rules, for an address and every IPv4 address embedded in it:

- Always refused, whatever ``allowed_networks`` says: cloud metadata and platform endpoints
  (``METADATA_NETWORKS``: 169.254.169.254, 169.254.170.2, 100.100.100.200, 168.63.129.16,
  192.0.0.192, fd00:ec2::/32, fd20:ce::254), link-local (169.254.0.0/16, fe80::/10),
  unspecified ("this network" 0.0.0.0/8, ``::``), multicast, broadcast and reserved
  (240.0.0.0/4; in IPv6 everything outside 2000::/3 that is not listed below).
- Refused unless an ``allowed_networks`` entry contains the address: loopback, private
  (10/8, 172.16/12, 192.168/16), shared/CGNAT (100.64/10), unique-local (fc00::/7) and the
  other special-purpose ranges that are not globally reachable (documentation,
  benchmarking, IETF protocol assignments, site-local, local-use NAT64...).
- Everything else (public unicast) passes.

IPv6 forms that *are* an IPv4 address are judged as that IPv4 address (including
``allowed_networks``, matched against the IPv4 address): IPv4-mapped ``::ffff:a.b.c.d``,
IPv4-translated ``::ffff:0:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64 well-known
prefix ``64:ff9b::a.b.c.d`` and 6to4 ``2002:aabb:ccdd::/48``. Forms that may carry one
among other bits (Teredo 2001::/32, local-use NAT64 64:ff9b:1::/48 at each RFC 6052
position) are judged as IPv6 addresses (not globally reachable, so refused unless
allowed) *and* refused if any IPv4 address they might embed is a metadata or link-local
one (only those: the other always-refused kinds, 0.0.0.0/8 above all, appear by chance in
the zero bits of ordinary addresses at one position or another).

Hierarchy (``code`` in brackets)::

    NetGuardError                   base: host, detail, transient, account_level
    ├── HostNotAllowed              an address is refused; address, reason  [host_not_allowed]
    └── HostUnresolvable            the name gives no address              [host_unresolvable]

``host_unresolvable`` is distinct from the mail clients' ``connect_failed`` so a caller can
tell a misspelt or vanished host name from a server that is down. Error messages name the
host and the kind of address, never the resolved address itself (an internal DNS view is
not the caller's business); ``HostNotAllowed.address`` keeps it for logs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Resolves (host, port) to address strings; the default is the system resolver.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class Refusal(StrEnum):
    """Why an address is refused (``HostNotAllowed.reason``)."""

    METADATA = "metadata"
    LINK_LOCAL = "link_local"
    UNSPECIFIED = "unspecified"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"
    RESERVED = "reserved"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    SHARED = "shared"
    UNIQUE_LOCAL = "unique_local"
    NON_GLOBAL = "non_global"

    @property
    def admissible(self) -> bool:
        """Whether ``allowed_networks`` can admit an address refused for this reason."""
        return self not in ALWAYS_REFUSED

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


ALWAYS_REFUSED = frozenset(
    {
        Refusal.METADATA,
        Refusal.LINK_LOCAL,
        Refusal.UNSPECIFIED,
        Refusal.MULTICAST,
        Refusal.BROADCAST,
        Refusal.RESERVED,
    }
)

_DESCRIPTIONS = {
    Refusal.METADATA: "cloud metadata",
    Refusal.LINK_LOCAL: "link-local",
    Refusal.UNSPECIFIED: "unspecified",
    Refusal.MULTICAST: "multicast",
    Refusal.BROADCAST: "broadcast",
    Refusal.RESERVED: "reserved",
    Refusal.LOOPBACK: "loopback",
    Refusal.PRIVATE: "private",
    Refusal.SHARED: "shared (carrier-grade NAT)",
    Refusal.UNIQUE_LOCAL: "unique-local",
    Refusal.NON_GLOBAL: "special-purpose (not globally reachable)",
}


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# Cloud instance metadata and platform services: credentials and configuration live there.
METADATA_NETWORKS = _nets(
    "169.254.169.254/32",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle... IMDS
    "169.254.170.2/32",  # AWS ECS task metadata and credentials
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "168.63.129.16/32",  # Azure WireServer (a public address!)
    "192.0.0.192/32",  # Oracle Cloud Classic metadata
    "fd00:ec2::/32",  # AWS Nitro services: IMDS fd00:ec2::254, DNS ::253, NTP ::123
    "fd20:ce::254/128",  # GCP metadata over IPv6
)

# (reason, networks) in the order they are tested; the always-refused ones come first.
_IPV4_ALWAYS: tuple[tuple[Refusal, tuple[IPNetwork, ...]], ...] = (
    (Refusal.METADATA, tuple(n for n in METADATA_NETWORKS if n.version == 4)),
    (Refusal.UNSPECIFIED, _nets("0.0.0.0/8")),  # Linux connects 0.0.0.0 to loopback
    (Refusal.BROADCAST, _nets("255.255.255.255/32")),
    (Refusal.LINK_LOCAL, _nets("169.254.0.0/16")),
    (Refusal.MULTICAST, _nets("224.0.0.0/4")),
    (Refusal.RESERVED, _nets("240.0.0.0/4")),
)
# Checked on every position an IPv6 address *might* embed an IPv4 address at. Only these:
# the other always-refused kinds (0.0.0.0/8 above all) turn up by chance in the zero bits
# of ordinary addresses at one position or another.
_IPV4_EMBEDDED_ALWAYS = tuple(
    (reason, networks)
    for reason, networks in _IPV4_ALWAYS
    if reason in (Refusal.METADATA, Refusal.LINK_LOCAL)
)
_IPV4_ADMISSIBLE: tuple[tuple[Refusal, tuple[IPNetwork, ...]], ...] = (
    (Refusal.LOOPBACK, _nets("127.0.0.0/8")),
    (Refusal.PRIVATE, _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    (Refusal.SHARED, _nets("100.64.0.0/10")),
    (
        Refusal.NON_GLOBAL,
        _nets(
            "192.0.0.0/24",  # IETF protocol assignments
            "192.0.2.0/24",  # TEST-NET-1
            "192.88.99.0/24",  # deprecated 6to4 relay anycast
            "198.18.0.0/15",  # benchmarking
            "198.51.100.0/24",  # TEST-NET-2
            "203.0.113.0/24",  # TEST-NET-3
        ),
    ),
)
_IPV6_ALWAYS: tuple[tuple[Refusal, tuple[IPNetwork, ...]], ...] = (
    (Refusal.METADATA, tuple(n for n in METADATA_NETWORKS if n.version == 6)),
    (Refusal.UNSPECIFIED, _nets("::/128")),
    (Refusal.LINK_LOCAL, _nets("fe80::/10")),
    (Refusal.MULTICAST, _nets("ff00::/8")),
)
_IPV6_ADMISSIBLE: tuple[tuple[Refusal, tuple[IPNetwork, ...]], ...] = (
    (Refusal.LOOPBACK, _nets("::1/128")),
    (Refusal.UNIQUE_LOCAL, _nets("fc00::/7")),
    (
        Refusal.NON_GLOBAL,
        _nets(
            "fec0::/10",  # site-local (deprecated)
            "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
            "2001::/23",  # IETF protocol assignments, including Teredo 2001::/32
            "2001:db8::/32",  # documentation
            "3fff::/20",  # documentation
        ),
    ),
)
# IPv6 global unicast; outside it, only the admissible ranges above are not "reserved".
_IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")

# IPv6 prefixes whose low 32 bits are an IPv4 address that the connection reaches.
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT, RFC 2765
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated, RFC 4291
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")  # RFC 3056
# Prefixes that may embed an IPv4 address among other bits.
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215
_NAT64_LOCAL_USE_PREFIX_LENGTHS = (48, 56, 64, 96)  # RFC 6052 lengths within a /48
_TEREDO = ipaddress.IPv6Network("2001::/32")
_IPV4_BITS = 32
_IPV4_MASK = (1 << _IPV4_BITS) - 1


class NetGuardError(Exception):
    """Base of the guard's errors: ``code`` is stable, ``detail`` is for humans.

    ``account_level``: the failure is about the account's host setting, not one message,
    so a worker may stop using the account until it changes. ``transient``: worth retrying.
    """

    code: str = "connect_failed"
    account_level: bool = True

    def __init__(self, host: str, detail: str, *, transient: bool) -> None:
        super().__init__(detail)
        self.host = host
        self.detail = detail
        self.transient = transient


class HostNotAllowed(NetGuardError):
    """``host`` is, or resolves to, ``address``, refused for ``reason``. Never transient."""

    code = "host_not_allowed"

    def __init__(self, host: str, address: str, reason: Refusal) -> None:
        advice = (
            "; add its network to MAILROOM_ALLOWED_NETWORKS to allow it"
            if reason.admissible
            else ", which is never allowed"
        )
        target = "is" if host == address else "resolves to"
        super().__init__(
            host, f"{host!r} {target} a {reason.description} address{advice}", transient=False
        )
        self.address = address
        self.reason = reason


class HostUnresolvable(NetGuardError):
    """The name gives no address (no such name, DNS failure, empty or invalid answer)."""

    code = "host_unresolvable"


def parse_ip_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is a literal (``[v6]`` accepted), else ``None``.

    Only canonical literals count: shorthand like ``127.1`` or ``2130706433`` is left to
    the resolver, which turns it into an address that is then checked like any other.
    """
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, translated, compatible, NAT64
    well-known prefix, 6to4), or ``None``. ``::`` and ``::1`` are IPv6 in their own right."""
    address = _without_scope(address)
    value = int(address)
    if address in _IPV4_MAPPED or address in _NAT64_WELL_KNOWN or address in _IPV4_TRANSLATED:
        return ipaddress.IPv4Address(value & _IPV4_MASK)
    if address in _IPV4_COMPATIBLE and value > 1:
        return ipaddress.IPv4Address(value & _IPV4_MASK)
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((value >> 80) & _IPV4_MASK)
    return None


def rfc6052_ipv4(address: ipaddress.IPv6Address, prefix_length: int) -> ipaddress.IPv4Address:
    """The IPv4 address embedded after a NAT64 prefix of ``prefix_length`` (RFC 6052 2.2).

    Bits 64..71 (the "u" octet) are never part of it.
    """
    raw = int(address).to_bytes(16, "big")
    if prefix_length == 96:
        return ipaddress.IPv4Address(raw[12:16])
    start = prefix_length // 8
    before_u = raw[start:8]
    return ipaddress.IPv4Address(before_u + raw[9 : 9 + 4 - len(before_u)])


def _possible_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address might carry among other bits."""
    if address in _TEREDO and address.teredo is not None:
        return list(address.teredo)
    if address in _NAT64_LOCAL_USE:
        return [rfc6052_ipv4(address, length) for length in _NAT64_LOCAL_USE_PREFIX_LENGTHS]
    return []


def _without_scope(address: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(int(address)) if address.scope_id else address


def _match(
    address: IPAddress, table: Iterable[tuple[Refusal, tuple[IPNetwork, ...]]]
) -> Refusal | None:
    for reason, networks in table:
        if any(address in network for network in networks):
            return reason
    return None


class ConnectionGuard:
    """Decides which addresses account hosts may connect to; see the module docstring.

    ``allowed_networks`` admits loopback, private and other non-global addresses it
    contains (never the always-refused kinds). ``resolver`` replaces the system resolver
    (``loop.getaddrinfo``), for tests that simulate DNS answers.
    """

    def __init__(
        self,
        allowed_networks: Iterable[IPNetwork] = (),
        resolver: Resolver | None = None,
    ) -> None:
        networks = tuple(allowed_networks)
        self.allowed_networks = networks
        self._allowed_v4 = tuple(n for n in networks if isinstance(n, ipaddress.IPv4Network))
        self._allowed_v6 = tuple(n for n in networks if isinstance(n, ipaddress.IPv6Network))
        self._resolver: Resolver = resolver or system_resolver

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` to dial, every one checked (IP literals: no lookup).

        Raises :class:`HostNotAllowed` if *any* address is refused (a name with one bad
        answer among good ones is refused outright) and :class:`HostUnresolvable` if the
        name gives no address. Addresses keep the resolver's order, without duplicates.
        """
        literal = parse_ip_literal(host)
        if literal is not None:
            self.check_address(literal, host=host)
            return [str(literal)]
        if not host:
            raise HostUnresolvable(host, "the host name is empty", transient=False)
        try:
            answers = await self._resolver(host, port)
        except socket.gaierror as exc:
            raise HostUnresolvable(
                host,
                f"{host!r} does not resolve: {exc.strerror or exc}",
                transient=exc.errno not in _PERMANENT_GAI_ERRORS,
            ) from exc
        except (OSError, UnicodeError, ValueError) as exc:
            # UnicodeError: IDNA refused the name (a label over 63 characters...);
            # ValueError: a NUL in it. Neither gets better by retrying.
            raise HostUnresolvable(
                host, f"{host!r} cannot be resolved: {exc}", transient=isinstance(exc, OSError)
            ) from exc
        addresses: list[str] = []
        for answer in answers:
            address = parse_ip_literal(answer)
            if address is None:
                raise HostUnresolvable(
                    host, f"the resolver answered {answer!r} for {host!r}", transient=False
                )
            self.check_address(address, host=host)
            text = str(address)
            if text not in addresses:
                addresses.append(text)
        if not addresses:
            raise HostUnresolvable(host, f"{host!r} has no address", transient=True)
        return addresses

    def check_address(self, ip: IPAddress | str, *, host: str | None = None) -> None:
        """Raise :class:`HostNotAllowed` unless ``ip`` may be connected to.

        ``host`` names the host the address belongs to in the error (default: ``ip``).
        A string that is not an IP address raises ``ValueError``.
        """
        address = ip if not isinstance(ip, str) else ipaddress.ip_address(ip)
        reason = self.refusal(address)
        if reason is not None:
            raise HostNotAllowed(host if host is not None else str(address), str(address), reason)

    def check_host_literal(self, host: str) -> None:
        """Check ``host`` if it is an IP literal; names pass (no lookup is made).

        For validating input without touching DNS; :meth:`resolve` at connect time is the
        check that counts.
        """
        literal = parse_ip_literal(host)
        if literal is not None:
            self.check_address(literal, host=host)

    def refusal(self, ip: IPAddress) -> Refusal | None:
        """Why ``ip`` is refused, or ``None`` if it may be connected to."""
        if isinstance(ip, ipaddress.IPv4Address):
            return self._refusal_v4(ip)
        embedded = embedded_ipv4(ip)
        if embedded is not None:
            return self._refusal_v4(embedded)
        return self._refusal_v6(_without_scope(ip))

    def _refusal_v4(self, ip: ipaddress.IPv4Address) -> Refusal | None:
        if (reason := _match(ip, _IPV4_ALWAYS)) is not None:
            return reason
        if any(ip in network for network in self._allowed_v4):
            return None
        if (reason := _match(ip, _IPV4_ADMISSIBLE)) is not None:
            return reason
        # Whatever the standard library also knows not to be global.
        return None if ip.is_global else Refusal.NON_GLOBAL

    def _refusal_v6(self, ip: ipaddress.IPv6Address) -> Refusal | None:
        if (reason := _match(ip, _IPV6_ALWAYS)) is not None:
            return reason
        for candidate in _possible_ipv4(ip):
            if (reason := _match(candidate, _IPV4_EMBEDDED_ALWAYS)) is not None:
                return reason
        admissible = _match(ip, _IPV6_ADMISSIBLE)
        if admissible is None and ip not in _IPV6_GLOBAL_UNICAST:
            return Refusal.RESERVED
        if any(ip in network for network in self._allowed_v6):
            return None
        if admissible is not None:
            return admissible
        return None if ip.is_global else Refusal.NON_GLOBAL


# getaddrinfo errors that say the name does not exist (as opposed to a DNS failure).
_PERMANENT_GAI_ERRORS = frozenset(
    code
    for code in (
        socket.EAI_NONAME,
        getattr(socket, "EAI_NODATA", None),
        socket.EAI_SERVICE,
        socket.EAI_FAMILY,
        socket.EAI_SOCKTYPE,
        socket.EAI_BADFLAGS,
    )
    if code is not None
)


async def system_resolver(host: str, port: int) -> list[str]:
    """Every IPv4 and IPv6 address of ``host`` for a TCP connection, by ``loop.getaddrinfo``."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [
        str(sockaddr[0])
        for family, _type, _proto, _name, sockaddr in infos
        if family in (socket.AF_INET, socket.AF_INET6)
    ]
