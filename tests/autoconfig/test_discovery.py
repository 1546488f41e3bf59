"""Autoconfig against loopback DNS, HTTPS, Dovecot and aiosmtpd: the four kinds of domain
(an autoconfig document, only SRV records, only an MX, nothing), ranking, the outbound
guard and a dead candidate that must not hold up the answer."""

from __future__ import annotations

import ipaddress
from typing import Any

from service.domain.enums import Security
from service.services.autoconfig import (
    AutoconfigResult,
    Autoconfigurator,
    Candidate,
    CandidateSource,
    parse_config_xml,
)
from service.services.presets import PresetCatalog
from service.services.probe import MailProtocol
from tests.autoconfig.conftest import HTTPSServer, SMTPServers
from tests.servers.dns import DNSServer, running_dns
from tests.servers.dovecot import Dovecot

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
A = {"A": ["127.0.0.1"]}


def document(*servers: str) -> bytes:
    return (
        '<?xml version="1.0"?>\n<clientConfig version="1.1"><emailProvider id="x">'
        + "".join(servers)
        + "</emailProvider></clientConfig>"
    ).encode()


def incoming(kind: str, host: str, port: int, socket_type: str) -> str:
    return (
        f'<incomingServer type="{kind}"><hostname>{host}</hostname><port>{port}</port>'
        f"<socketType>{socket_type}</socketType><username>%EMAILADDRESS%</username>"
        "<authentication>password-cleartext</authentication></incomingServer>"
    )


def outgoing(host: str, port: int, socket_type: str) -> str:
    return (
        f'<outgoingServer type="smtp"><hostname>{host}</hostname><port>{port}</port>'
        f"<socketType>{socket_type}</socketType><username>%EMAILLOCALPART%</username>"
        "</outgoingServer>"
    )


def configurator(
    dns: DNSServer,
    https: HTTPSServer,
    ca_file: str,
    pop3: Dovecot,
    smtp: SMTPServers,
    *,
    timeout_s: float = 10.0,
    networks: Any = LOOPBACK,
    ispdb: bool = False,
) -> Autoconfigurator:
    return Autoconfigurator(
        networks,
        PresetCatalog(),
        timeout_s=timeout_s,
        ispdb_url=f"https://ispdb.test:{https.port}/v1.1/" if ispdb else None,
        dns_servers=[dns.address],
        ca_file=ca_file,
        document_port=https.port,
        guess_ports={
            (MailProtocol.POP3, Security.TLS): pop3.pop3s_port or 0,
            (MailProtocol.POP3, Security.STARTTLS): pop3.pop3_port,
            (MailProtocol.SMTP, Security.TLS): smtp.tls.port,
            (MailProtocol.SMTP, Security.STARTTLS): smtp.starttls.port,
        },
    )


def summary(candidates: list[Candidate]) -> list[tuple[str, int, str, bool]]:
    return [(c.host, c.port, c.security.value, c.probe.ok) for c in candidates]


def test_the_thunderbird_format_is_read_and_imap_ignored() -> None:
    body = document(
        incoming("imap", "imap.a.test", 993, "SSL"),
        incoming("pop3", "pop.%EMAILDOMAIN%", 995, "SSL"),
        outgoing("smtp.a.test", 587, "STARTTLS"),
    )
    found = parse_config_xml(body, "bob@a.test", CandidateSource.AUTOCONFIG)
    assert [(f.protocol, f.host, f.port, f.security, f.username) for f in found] == [
        (MailProtocol.POP3, "pop.a.test", 995, Security.TLS, "bob@a.test"),
        (MailProtocol.SMTP, "smtp.a.test", 587, Security.STARTTLS, "bob"),
    ]


def test_a_document_with_a_dtd_is_refused() -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><clientConfig>&lol2;</clientConfig>'
    )
    try:
        parse_config_xml(bomb, "bob@a.test", CandidateSource.AUTOCONFIG)
    except Exception as exc:
        assert "DTD" in str(exc)
    else:
        raise AssertionError("a DTD was accepted")


async def test_a_domain_with_an_autoconfig_document(
    https: HTTPSServer,
    ca: Any,
    pop3: Dovecot,
    smtp: SMTPServers,
    blackhole: int,
) -> None:
    https.documents["/mail/config-v1.1.xml"] = document(
        incoming("pop3", "pop.withdoc.test", pop3.pop3_port, "STARTTLS"),
        incoming("pop3", "pop.withdoc.test", pop3.pop3s_port or 0, "SSL"),
        incoming("imap", "pop.withdoc.test", 993, "SSL"),
        outgoing("smtp.withdoc.test", smtp.starttls.port, "STARTTLS"),
        outgoing("smtp.withdoc.test", smtp.tls.port, "SSL"),
        # A server that accepts connections and never answers: reported, never waited for.
        outgoing("slow.withdoc.test", blackhole, "SSL"),
    )
    records = {
        "withdoc.test.": A,
        "autoconfig.withdoc.test.": A,
        "pop.withdoc.test.": A,
        "smtp.withdoc.test.": A,
        "slow.withdoc.test.": A,
    }
    async with running_dns(records) as dns:
        auto = configurator(dns, https, ca[1], pop3, smtp, timeout_s=5.0)
        result = await auto.discover("carol@withdoc.test")
    assert summary(result.incoming) == [
        ("pop.withdoc.test", pop3.pop3s_port, "tls", True),
        ("pop.withdoc.test", pop3.pop3_port, "starttls", True),
    ]
    best = result.incoming[0]
    assert CandidateSource.AUTOCONFIG in best.sources
    assert best.username == "carol@withdoc.test"
    assert best.probe.tls and best.probe.pipelining and best.probe.uidl
    assert "PLAIN" in best.probe.auth_mechanisms
    assert result.incoming[1].probe.starttls_offered
    assert summary(result.outgoing) == [
        ("smtp.withdoc.test", smtp.tls.port, "tls", True),
        ("smtp.withdoc.test", smtp.starttls.port, "starttls", True),
        ("slow.withdoc.test", blackhole, "tls", False),
    ]
    assert result.outgoing[0].username == "carol"
    assert "PLAIN" in result.outgoing[0].probe.auth_mechanisms
    assert result.outgoing[2].probe.code == "timeout"
    # Both document URLs were asked for, the first with the address.
    paths = sorted(path for _, path in https.requests)
    assert "/mail/config-v1.1.xml?emailaddress=carol@withdoc.test" in paths
    assert "/.well-known/autoconfig/mail/config-v1.1.xml" in paths


async def test_a_domain_with_only_srv_records(
    https: HTTPSServer, ca: Any, pop3: Dovecot, smtp: SMTPServers
) -> None:
    records = {
        "srvonly.test.": {},
        "_pop3s._tcp.srvonly.test.": {"SRV": [f"0 1 {pop3.pop3s_port} pop.srvonly.test."]},
        "_pop3._tcp.srvonly.test.": {"SRV": ["0 0 0 ."]},  # RFC 6186: not offered
        "_submission._tcp.srvonly.test.": {"SRV": [f"5 1 {smtp.starttls.port} smtp.srvonly.test."]},
        "pop.srvonly.test.": A,
        "smtp.srvonly.test.": A,
    }
    async with running_dns(records) as dns:
        result = await configurator(dns, https, ca[1], pop3, smtp).discover("dan@srvonly.test")
    # The SRV targets, and the guesses on the same names that answered too (the test
    # servers listen on both standard-port stand-ins), implicit TLS first.
    assert summary(result.incoming) == [
        ("pop.srvonly.test", pop3.pop3s_port, "tls", True),
        ("pop.srvonly.test", pop3.pop3_port, "starttls", True),
    ]
    assert [c.sources for c in result.incoming] == [[CandidateSource.SRV], [CandidateSource.GUESS]]
    assert summary(result.outgoing) == [
        ("smtp.srvonly.test", smtp.tls.port, "tls", True),
        ("smtp.srvonly.test", smtp.starttls.port, "starttls", True),
    ]
    assert [c.sources for c in result.outgoing] == [[CandidateSource.GUESS], [CandidateSource.SRV]]
    srv = {r.name: r for r in result.sources if r.source is CandidateSource.SRV}
    assert srv["_pop3s._tcp.srvonly.test"].found == 1
    assert srv["_pop3._tcp.srvonly.test"].found == 0
    assert all(not r.ok for r in result.sources if r.source is CandidateSource.AUTOCONFIG)


async def test_a_domain_with_only_an_mx_gets_probed_guesses(
    https: HTTPSServer, ca: Any, pop3: Dovecot, smtp: SMTPServers
) -> None:
    https.documents["/v1.1/mxhost.test"] = b"not xml"  # the ISPDB's answer is unusable
    records = {
        "mxonly.test.": {"MX": ["10 mx1.mxhost.test."]},
        "mx1.mxhost.test.": A,
        "pop.mxhost.test.": A,
        "smtp.mxhost.test.": A,
        "ispdb.test.": A,
    }
    async with running_dns(records) as dns:
        auto = configurator(dns, https, ca[1], pop3, smtp, ispdb=True)
        result = await auto.discover("erin@mxonly.test")
    assert result.mx == ["mx1.mxhost.test"]
    # Guesses under the MX's base domain that answered, implicit TLS first.
    assert summary(result.incoming) == [
        ("pop.mxhost.test", pop3.pop3s_port, "tls", True),
        ("pop.mxhost.test", pop3.pop3_port, "starttls", True),
    ]
    assert summary(result.outgoing) == [
        ("smtp.mxhost.test", smtp.tls.port, "tls", True),
        ("smtp.mxhost.test", smtp.starttls.port, "starttls", True),
    ]
    assert all(c.sources == [CandidateSource.GUESS] for c in result.incoming + result.outgoing)
    # The ISPDB was asked by the domain and by the MX's base domain.
    asked = [path for host, path in https.requests if host.startswith("ispdb.test")]
    assert "/v1.1/mxonly.test" in asked and "/v1.1/mxhost.test" in asked


async def test_a_domain_with_nothing(
    https: HTTPSServer, ca: Any, pop3: Dovecot, smtp: SMTPServers
) -> None:
    async with running_dns({}) as dns:
        result: AutoconfigResult = await configurator(dns, https, ca[1], pop3, smtp).discover(
            "frank@nothing.test"
        )
        assert ("nothing.test.", "MX") in dns.queries
    assert result.incoming == [] and result.outgoing == []
    assert result.mx == []
    assert result.sources and not any(r.ok for r in result.sources)


async def test_the_outbound_guard_applies_to_documents_and_probes(
    https: HTTPSServer, ca: Any, pop3: Dovecot, smtp: SMTPServers
) -> None:
    https.requests.clear()
    https.documents["/mail/config-v1.1.xml"] = document(
        incoming("pop3", "pop.withdoc.test", pop3.pop3s_port or 0, "SSL"),
    )
    records = {
        "autoconfig.withdoc.test.": A,
        "withdoc.test.": A,
        "_pop3s._tcp.withdoc.test.": {"SRV": [f"0 1 {pop3.pop3s_port} pop.withdoc.test."]},
        "pop.withdoc.test.": A,
    }
    async with running_dns(records) as dns:
        auto = configurator(dns, https, ca[1], pop3, smtp, networks=[])
        result = await auto.discover("gina@withdoc.test")
    assert https.requests == []  # loopback is not allowed: nothing was fetched
    documents = [r for r in result.sources if r.source is CandidateSource.AUTOCONFIG]
    assert documents and all("loopback" in r.detail for r in documents)
    assert [(c.host, c.probe.ok, c.probe.code) for c in result.incoming] == [
        ("pop.withdoc.test", False, "host_not_allowed")
    ]


async def test_plain_text_is_listed_only_where_no_tls_is_offered(
    https: HTTPSServer, ca: Any, pop3: Dovecot, smtp: SMTPServers, dovecot_plain: Dovecot
) -> None:
    https.documents["/mail/config-v1.1.xml"] = document(
        incoming("pop3", "localhost", dovecot_plain.pop3_port, "plain"),
        # A server that offers STLS although the document says plain text.
        incoming("pop3", "pop.withdoc.test", pop3.pop3_port, "plain"),
    )
    records = {"autoconfig.withdoc.test.": A, "pop.withdoc.test.": A, "localhost.": A}
    async with running_dns(records) as dns:
        result = await configurator(dns, https, ca[1], pop3, smtp).discover("ian@withdoc.test")
    # STLS was offered: listed as STARTTLS; the plain-text-only server is dropped because
    # encrypted candidates work.
    hosts = [(c.host, c.port, c.security.value) for c in result.incoming]
    assert ("pop.withdoc.test", pop3.pop3_port, "starttls") in hosts
    assert all(security != "none" for _, _, security in hosts)
    assert not any(port == dovecot_plain.pop3_port for _, port, _ in hosts)

    # With only the plain-text server, it is listed as what it is.
    https.documents["/mail/config-v1.1.xml"] = document(
        incoming("pop3", "localhost", dovecot_plain.pop3_port, "plain"),
    )
    async with running_dns({"autoconfig.withdoc.test.": A, "localhost.": A}) as dns:
        only = await configurator(dns, https, ca[1], pop3, smtp).discover("ian@withdoc.test")
    assert [(c.host, c.port, c.security.value, c.probe.ok, c.probe.tls) for c in only.incoming] == [
        ("localhost", dovecot_plain.pop3_port, "none", True, False)
    ]
    assert not only.incoming[0].probe.starttls_offered
