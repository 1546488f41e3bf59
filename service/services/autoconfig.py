"""Autoconfiguration: from an address, find and probe its POP3 and SMTP servers.

What a modern mail client does when a person types an address. Sources, asked at once,
each within its share of ``MAILROOM_AUTOCONFIG_TIMEOUT``:

- a provider preset serving the domain (``service/data/presets.json``);
- the domain's own autoconfig documents (Thunderbird's config-v1.1 XML):
  ``https://autoconfig.<domain>/mail/config-v1.1.xml?emailaddress=...`` and
  ``https://<domain>/.well-known/autoconfig/mail/config-v1.1.xml``;
- the ISPDB (``MAILROOM_ISPDB_URL``), by domain and by the MX's base domain;
- DNS SRV records (RFC 6186, RFC 8314): ``_pop3s._tcp``, ``_pop3._tcp``,
  ``_submissions._tcp``, ``_submission._tcp``;
- guesses: ``pop.``, ``pop3.``, ``mail.`` (POP3) and ``smtp.``, ``mail.`` (SMTP) of the
  domain and of the MX's base domain, on the standard ports, kept only when a probe answers.

Every candidate is then probed live (connect, TLS with the certificate verified, POP3 CAPA
or SMTP EHLO), through the outbound guard like every account connection: documents are
fetched and hosts probed only at addresses ``MAILROOM_ALLOWED_NETWORKS`` admits. Nothing is
logged in; no password is asked for.

Ranking: candidates whose probe succeeded first, then implicit TLS, STARTTLS, plain; then
by source (preset, autoconfig document, ISPDB, SRV, guess). A plain-text candidate whose
server offers STLS/STARTTLS becomes a STARTTLS one, and plain candidates are dropped when a
TLS one of the same protocol works: a plain-text login is never suggested where TLS is
offered. A source or probe that does not answer in time is reported, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Iterable, Mapping
from enum import StrEnum

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import idna
import msgspec

from service.codes import ErrorCode
from service.domain.accounts import POP3_PORTS, SMTP_PORTS
from service.domain.enums import Security
from service.domain.inputs import check_host
from service.errors import FieldError, Invalid
from service.logs import log_event
from service.netguard import ConnectionGuard, IPNetwork, NetGuardError
from service.pop3.client import POP3Client
from service.pop3.errors import POP3Error, TLSRequired
from service.services.connect import ehlo_name
from service.services.presets import PresetCatalog
from service.services.probe import MailProtocol
from service.smtp.config import SMTPServer, SMTPTimeouts
from service.smtp.errors import SMTPDeliveryError
from service.smtp.session import SMTPSession
from service.tls import client_context

logger = logging.getLogger("mailroom.autoconfig")

DEFAULT_AUTOCONFIG_TIMEOUT_S = 10.0
# Discovery (DNS, documents) may use this share of the budget; probing has the rest.
DISCOVERY_SHARE = 0.5
# A document larger than this is not a mail configuration.
MAX_DOCUMENT_BYTES = 128 * 1024
MAX_HTTP_HEADER_BYTES = 16 * 1024
MAX_CANDIDATES_PER_PROTOCOL = 16
HTTPS_PORT = 443
# Placeholders of the Thunderbird format, replaced from the address.
_PLACEHOLDER = re.compile(r"%(EMAILADDRESS|EMAILLOCALPART|EMAILDOMAIN)%")

POP3_GUESS_PREFIXES = ("pop", "pop3", "mail")
SMTP_GUESS_PREFIXES = ("smtp", "mail")
# Guesses try implicit TLS and STARTTLS on the standard ports (plain text is what a
# STARTTLS probe falls back to when the server offers no STARTTLS).
GUESS_PORTS = {
    (MailProtocol.POP3, Security.TLS): POP3_PORTS[Security.TLS],
    (MailProtocol.POP3, Security.STARTTLS): POP3_PORTS[Security.STARTTLS],
    (MailProtocol.SMTP, Security.TLS): SMTP_PORTS[Security.TLS],
    (MailProtocol.SMTP, Security.STARTTLS): SMTP_PORTS[Security.STARTTLS],
}
SECURITY_RANK = {Security.TLS: 0, Security.STARTTLS: 1, Security.NONE: 2}


class CandidateSource(StrEnum):
    """Where a candidate came from, most trusted first."""

    PRESET = "preset"
    AUTOCONFIG = "autoconfig"
    ISPDB = "ispdb"
    SRV = "srv"
    GUESS = "guess"


SOURCE_RANK = {source: rank for rank, source in enumerate(CandidateSource)}


class ProbeResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one live connection showed. ``ok``: connected, TLS (when the candidate uses
    it) established with a valid certificate, and the server greeted and answered CAPA
    or EHLO. ``code``/``detail`` say why not otherwise."""

    ok: bool
    code: ErrorCode | None = None
    detail: str
    tls: bool = False
    starttls_offered: bool = False
    auth_mechanisms: list[str] = msgspec.field(default_factory=list)
    pipelining: bool = False
    uidl: bool | None = None  # POP3 only
    capabilities: list[str] = msgspec.field(default_factory=list)


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """One way to reach a server: ``sources`` lists every source that named it."""

    protocol: MailProtocol
    host: str
    port: int
    security: Security
    username: str | None
    sources: list[CandidateSource]
    probe: ProbeResult


class SourceReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one source gave: ``found`` candidates, or why nothing (``detail``)."""

    source: CandidateSource
    name: str
    ok: bool
    found: int
    detail: str


class AutoconfigResult(msgspec.Struct, frozen=True, kw_only=True):
    """Ranked candidates for the incoming (POP3) and outgoing (SMTP) server."""

    email: str
    domain: str
    mx: list[str]
    incoming: list[Candidate]
    outgoing: list[Candidate]
    sources: list[SourceReport]


class _Found(msgspec.Struct, frozen=True):
    protocol: MailProtocol
    host: str
    port: int
    security: Security
    username: str | None
    source: CandidateSource
    weight: int = 0  # SRV priority; lower first


class FetchError(Exception):
    """An HTTP fetch that gave no document."""


def base_domain(host: str) -> str:
    """The registrable-looking part of ``host``: its last two labels (mx1.mail.example.com
    gives example.com). No public-suffix list: a guess, used only for guesses and the ISPDB."""
    labels = host.rstrip(".").lower().split(".")
    return ".".join(labels[-2:])


def _socket_type(text: str) -> Security | None:
    return {"SSL": Security.TLS, "STARTTLS": Security.STARTTLS, "PLAIN": Security.NONE}.get(
        text.strip().upper()
    )


def _parse_xml(body: bytes) -> ET.Element:
    """Parse a small XML document, refusing DTDs and entities (no expansion bombs)."""
    if len(body) > MAX_DOCUMENT_BYTES:
        raise FetchError("the document is too large")
    lowered = body.lower()
    if b"<!doctype" in lowered or b"<!entity" in lowered:
        raise FetchError("the document declares a DTD or entities, which are refused")
    try:
        return ET.fromstring(body)  # noqa: S314 - DTDs refused above
    except ET.ParseError as exc:
        raise FetchError(f"not well-formed XML: {exc}") from exc


def parse_config_xml(body: bytes, email: str, source: CandidateSource) -> list[_Found]:
    """The POP3 and SMTP servers a Thunderbird config-v1.1 document lists."""
    root = _parse_xml(body)
    local, _, domain = email.rpartition("@")
    values = {"EMAILADDRESS": email, "EMAILLOCALPART": local, "EMAILDOMAIN": domain}

    def text(element: ET.Element, tag: str) -> str | None:
        child = element.find(tag)
        if child is None or child.text is None:
            return None
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], child.text.strip())

    found: list[_Found] = []
    for tag, kind, protocol in (
        ("incomingServer", "pop3", MailProtocol.POP3),
        ("outgoingServer", "smtp", MailProtocol.SMTP),
    ):
        for server in root.iter(tag):
            if (server.get("type") or "").lower() != kind:
                continue
            host, port_text = text(server, "hostname"), text(server, "port")
            security = _socket_type(text(server, "socketType") or "")
            if host is None or security is None:
                continue
            try:
                check_host(host)
                port = int(port_text) if port_text else _default_port(protocol, security)
            except ValueError:
                continue
            if not 0 < port < 65536:
                continue
            found.append(
                _Found(protocol, host.lower(), port, security, text(server, "username"), source)
            )
    return found


def _default_port(protocol: MailProtocol, security: Security) -> int:
    return (POP3_PORTS if protocol is MailProtocol.POP3 else SMTP_PORTS)[security]


def dns_resolver(
    servers: Iterable[tuple[str, int]], timeout_s: float
) -> dns.asyncresolver.Resolver:
    """A dnspython resolver asking ``servers`` (the system's when empty)."""
    servers = list(servers)
    if not servers:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
    resolver.lifetime = timeout_s
    resolver.timeout = timeout_s
    return resolver


class Autoconfigurator:
    """Finds, probes and ranks server settings for an address (see the module docstring)."""

    def __init__(
        self,
        allowed_networks: Iterable[IPNetwork],
        presets: PresetCatalog,
        *,
        timeout_s: float = DEFAULT_AUTOCONFIG_TIMEOUT_S,
        ispdb_url: str | None = None,
        dns_servers: Iterable[tuple[str, int]] = (),
        ca_file: str | None = None,
        ehlo: str | None = None,
        document_port: int = HTTPS_PORT,
        guess_ports: Mapping[tuple[MailProtocol, Security], int] | None = None,
    ) -> None:
        """``document_port`` and ``guess_ports`` replace the standard ports (443 for the
        domain's documents; 995, 110, 465, 587 for guesses): for tests on loopback."""
        if not timeout_s > 0:
            raise ValueError("the autoconfig timeout must be positive")
        self._timeout_s = timeout_s
        servers = tuple(dns_servers)
        self._dns = dns_resolver(servers, timeout_s * DISCOVERY_SHARE)
        # With configured DNS servers, host names are resolved by them too (the guard
        # then checks every address they give).
        self._guard = ConnectionGuard(
            allowed_networks, resolver=self._addresses if servers else None
        )
        self._presets = presets
        self._ispdb_url = ispdb_url
        self._ca_file = ca_file
        self._ssl_context = client_context(ca_file)
        self._ehlo = ehlo
        self._document_host_suffix = "" if document_port == HTTPS_PORT else f":{document_port}"
        self._guess_ports = dict(GUESS_PORTS)
        if guess_ports:
            self._guess_ports.update(guess_ports)

    # -- the use case ---------------------------------------------------------------------

    async def discover(self, email: str) -> AutoconfigResult:
        """Ranked, probed candidates for ``email``; answers within the configured time."""
        local, _, domain = email.rpartition("@")
        try:
            ascii_domain = idna.encode(domain.rstrip("."), uts46=True).decode("ascii").lower()
            check_host(ascii_domain)
        except (idna.IDNAError, ValueError, UnicodeError):
            raise Invalid(
                f"{domain!r} is not a mail domain",
                errors=[FieldError("email", "the domain is not a valid host name")],
            ) from None
        if not local:
            raise Invalid("give a whole address", errors=[FieldError("email", "no local part")])
        loop = asyncio.get_running_loop()
        end = loop.time() + self._timeout_s
        discovery_end = loop.time() + self._timeout_s * DISCOVERY_SHARE
        reports: list[SourceReport] = []
        found: list[_Found] = []

        preset = self._presets.for_domain(ascii_domain)
        if preset is not None:
            for protocol, server in (
                (MailProtocol.POP3, preset.incoming),
                (MailProtocol.SMTP, preset.outgoing),
            ):
                found.append(
                    _Found(
                        protocol,
                        server.host,
                        server.port,
                        server.security,
                        email,
                        CandidateSource.PRESET,
                    )
                )
            reports.append(
                SourceReport(
                    source=CandidateSource.PRESET,
                    name=preset.name,
                    ok=True,
                    found=2,
                    detail=f"preset {preset.name!r} serves {ascii_domain}",
                )
            )

        mx_task = asyncio.ensure_future(self._mx(ascii_domain))
        tasks: list[tuple[CandidateSource, str, asyncio.Future[list[_Found]]]] = []

        def start(source: CandidateSource, name: str, job: Awaitable[list[_Found]]) -> None:
            tasks.append((source, name, asyncio.ensure_future(job)))

        quoted = urllib.parse.quote(email, safe="@")
        suffix = self._document_host_suffix
        for url, query in (
            (f"https://autoconfig.{ascii_domain}{suffix}/mail/config-v1.1.xml", True),
            (f"https://{ascii_domain}{suffix}/.well-known/autoconfig/mail/config-v1.1.xml", False),
        ):
            start(
                CandidateSource.AUTOCONFIG,
                url,
                self._document(
                    f"{url}?emailaddress={quoted}" if query else url,
                    email,
                    CandidateSource.AUTOCONFIG,
                ),
            )
        if self._ispdb_url:
            start(
                CandidateSource.ISPDB,
                f"{self._ispdb_url}{ascii_domain}",
                self._document(f"{self._ispdb_url}{ascii_domain}", email, CandidateSource.ISPDB),
            )
        for service, protocol, security in (
            ("_pop3s._tcp", MailProtocol.POP3, Security.TLS),
            ("_pop3._tcp", MailProtocol.POP3, Security.STARTTLS),
            ("_submissions._tcp", MailProtocol.SMTP, Security.TLS),
            ("_submission._tcp", MailProtocol.SMTP, Security.STARTTLS),
        ):
            start(
                CandidateSource.SRV,
                f"{service}.{ascii_domain}",
                self._srv(f"{service}.{ascii_domain}", protocol, security, email),
            )

        # The MX gives a second base domain: ISPDB by it, and guesses under it.
        mx: list[str] = []
        try:
            async with asyncio.timeout_at(discovery_end):
                mx = await mx_task
        except (TimeoutError, dns.exception.DNSException):
            pass
        bases = [ascii_domain]
        if mx and base_domain(mx[0]) != ascii_domain:
            bases.append(base_domain(mx[0]))
            if self._ispdb_url:
                mx_base = base_domain(mx[0])
                start(
                    CandidateSource.ISPDB,
                    f"{self._ispdb_url}{mx_base}",
                    self._document(f"{self._ispdb_url}{mx_base}", email, CandidateSource.ISPDB),
                )

        # Collect what the sources found in time; the rest is reported, not waited for.
        pending = [task for _, _, task in tasks]
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(discovery_end):
                    await asyncio.wait(pending)
        for source, name, task in tasks:
            if not task.done():
                task.cancel()
                reports.append(
                    SourceReport(
                        source=source,
                        name=name,
                        ok=False,
                        found=0,
                        detail="no answer in time",
                    )
                )
                continue
            exc = task.exception()
            if exc is not None:
                reports.append(
                    SourceReport(source=source, name=name, ok=False, found=0, detail=str(exc))
                )
                continue
            got = task.result()
            found.extend(got)
            reports.append(
                SourceReport(
                    source=source,
                    name=name,
                    ok=bool(got),
                    found=len(got),
                    detail=f"{len(got)} server(s)" if got else "no POP3 or SMTP server listed",
                )
            )
        if not mx_task.done():
            mx_task.cancel()

        named = {(f.protocol, f.host, f.port) for f in found}
        guesses = [
            _Found(protocol, f"{prefix}.{base}", port, security, email, CandidateSource.GUESS)
            for base in bases
            for protocol, prefixes in (
                (MailProtocol.POP3, POP3_GUESS_PREFIXES),
                (MailProtocol.SMTP, SMTP_GUESS_PREFIXES),
            )
            for prefix in prefixes
            for security in (Security.TLS, Security.STARTTLS)
            for port in [self._guess_ports[(protocol, security)]]
        ]
        guesses = [g for g in guesses if (g.protocol, g.host, g.port) not in named]
        incoming, outgoing = await self._probe_all(found, guesses, end)
        result = AutoconfigResult(
            email=email,
            domain=ascii_domain,
            mx=mx,
            incoming=incoming,
            outgoing=outgoing,
            sources=reports,
        )
        log_event(
            logger,
            "autoconfig",
            domain=ascii_domain,
            incoming=len(incoming),
            outgoing=len(outgoing),
        )
        return result

    # -- sources --------------------------------------------------------------------------

    async def _mx(self, domain: str) -> list[str]:
        try:
            answer = await self._dns.resolve(domain, "MX")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            return []
        records = sorted(answer, key=lambda r: r.preference)
        hosts = [r.exchange.to_text(omit_final_dot=True).lower() for r in records]
        return [h for h in hosts if h and h != "."]

    async def _srv(
        self, name: str, protocol: MailProtocol, security: Security, email: str
    ) -> list[_Found]:
        try:
            answer = await self._dns.resolve(name, "SRV")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise FetchError(f"DNS: {exc}") from exc
        found: list[_Found] = []
        for record in answer:
            target = record.target.to_text(omit_final_dot=True).lower()
            if target in ("", ".") or record.port == 0:
                continue  # RFC 6186: "." means the service is not offered
            try:
                check_host(target)
            except ValueError:
                continue
            found.append(
                _Found(
                    protocol,
                    target,
                    int(record.port),
                    security,
                    email,
                    CandidateSource.SRV,
                    int(record.priority),
                )
            )
        return found

    async def _document(self, url: str, email: str, source: CandidateSource) -> list[_Found]:
        body = await self.fetch(url)
        return parse_config_xml(body, email, source)

    async def _addresses(self, host: str, port: int) -> list[str]:
        """A and AAAA answers of ``host`` from the configured DNS servers."""
        addresses: list[str] = []
        for kind in ("A", "AAAA"):
            try:
                answer = await self._dns.resolve(host, kind)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                raise OSError(f"DNS: {exc}") from exc
            addresses.extend(r.address for r in answer)
        return addresses

    async def fetch(self, url: str) -> bytes:
        """GET ``url`` over HTTPS (certificate verified), at an address the guard admits."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise FetchError(f"not an http(s) URL: {url}")
        host = parts.hostname
        tls = parts.scheme == "https"
        port = parts.port or (HTTPS_PORT if tls else 80)
        try:
            addresses = await self._guard.resolve(host, port)
        except NetGuardError as exc:
            raise FetchError(str(exc)) from exc
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(
                addresses[0],
                port,
                ssl=self._ssl_context if tls else None,
                server_hostname=host if tls else None,
                limit=MAX_HTTP_HEADER_BYTES,
            )
            host_header = host if parts.port is None else f"{host}:{port}"
            writer.write(
                (
                    f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n"
                    "Accept: application/xml, text/xml\r\nUser-Agent: Mailroom-autoconfig\r\n"
                    "Connection: close\r\n\r\n"
                ).encode("ascii")
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.read(MAX_DOCUMENT_BYTES + 1)
            while len(body) <= MAX_DOCUMENT_BYTES:
                more = await reader.read(MAX_DOCUMENT_BYTES + 1 - len(body))
                if not more:
                    break
                body += more
        except ssl.SSLCertVerificationError as exc:
            raise FetchError(f"{host}: certificate not valid: {exc.verify_message}") from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise FetchError(f"{host}: {exc or type(exc).__name__}") from exc
        finally:
            if writer is not None:
                writer.transport.abort()
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "200":
            raise FetchError(f"{host} answered {lines[0][:80]!r}")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        if len(body) > MAX_DOCUMENT_BYTES:
            raise FetchError("the document is too large")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = _dechunk(body)
        return body

    # -- probes ---------------------------------------------------------------------------

    async def _probe_all(
        self, found: list[_Found], guesses: list[_Found], end: float
    ) -> tuple[list[Candidate], list[Candidate]]:
        merged: dict[tuple[MailProtocol, str, int], tuple[_Found, list[CandidateSource]]] = {}
        for item in sorted(found, key=lambda f: (SOURCE_RANK[f.source], f.weight)):
            key = (item.protocol, item.host, item.port)
            if key in merged:
                if item.source not in merged[key][1]:
                    merged[key][1].append(item.source)
            else:
                merged[key] = (item, [item.source])
        for item in guesses:
            merged.setdefault((item.protocol, item.host, item.port), (item, [item.source]))
        entries = list(merged.values())
        loop = asyncio.get_running_loop()
        budget = max(end - loop.time(), 0.05)
        jobs = [asyncio.ensure_future(self._probe(item, budget)) for item, _ in entries]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(end):
                await asyncio.wait(jobs)
        candidates: list[Candidate] = []
        for (item, sources), job in zip(entries, jobs, strict=True):
            if job.done() and not job.cancelled() and job.exception() is None:
                security, probe = job.result()
            else:
                job.cancel()
                security, probe = (
                    item.security,
                    ProbeResult(ok=False, code=ErrorCode.TIMEOUT, detail="no answer in time"),
                )
            if sources == [CandidateSource.GUESS] and not probe.ok:
                continue  # a guess is only a candidate when a server answers there
            candidates.append(
                Candidate(
                    protocol=item.protocol,
                    host=item.host,
                    port=item.port,
                    security=security,
                    username=item.username,
                    sources=sources,
                    probe=probe,
                )
            )
        return _rank(candidates, MailProtocol.POP3), _rank(candidates, MailProtocol.SMTP)

    async def _probe(self, item: _Found, budget: float) -> tuple[Security, ProbeResult]:
        """Probe ``item``; a plain port is asked for STARTTLS first (plain only if refused)."""
        try:
            address = (await self._guard.resolve(item.host, item.port))[0]
        except NetGuardError as exc:
            return item.security, ProbeResult(ok=False, code=ErrorCode(exc.code), detail=str(exc))
        probe = self._probe_pop3 if item.protocol is MailProtocol.POP3 else self._probe_smtp
        if item.security is Security.TLS:
            return Security.TLS, await probe(item.host, item.port, Security.TLS, address, budget)
        result = await probe(item.host, item.port, Security.STARTTLS, address, budget)
        if result.code == ErrorCode.TLS_REQUIRED:
            # The server offers no STARTTLS: plain text is all there is.
            plain = await probe(item.host, item.port, Security.NONE, address, budget)
            return Security.NONE, plain
        return Security.STARTTLS, result

    async def _probe_pop3(
        self, host: str, port: int, security: Security, address: str, timeout_s: float
    ) -> ProbeResult:
        client = POP3Client(
            host,
            port,
            security,
            ssl_context=self._ssl_context,
            connect_address=address,
            timeout=timeout_s,
        )
        try:
            async with asyncio.timeout(timeout_s):
                await client.connect()
                caps = client.cached_capabilities
                with contextlib.suppress(POP3Error):
                    await client.quit()
        except TLSRequired as exc:
            return ProbeResult(ok=False, code=ErrorCode.TLS_REQUIRED, detail=exc.detail)
        except POP3Error as exc:
            return ProbeResult(ok=False, code=_code(exc.code), detail=exc.detail)
        except TimeoutError:
            return ProbeResult(
                ok=False, code=ErrorCode.TIMEOUT, detail=f"no answer within {timeout_s:.3g} s"
            )
        finally:
            client.close()
        entries = sorted(caps.entries) if caps is not None else []
        return ProbeResult(
            ok=True,
            detail=f"POP3 server answered at {host}:{port}"
            + (" over TLS, certificate valid" if client.tls_active else " in plain text"),
            tls=client.tls_active,
            starttls_offered=security is Security.STARTTLS or (caps is not None and caps.stls),
            auth_mechanisms=sorted(caps.sasl) if caps is not None else [],
            pipelining=caps is not None and caps.pipelining,
            uidl=caps is None or not caps.supported or "UIDL" in caps,
            capabilities=entries,
        )

    async def _probe_smtp(
        self, host: str, port: int, security: Security, address: str, timeout_s: float
    ) -> ProbeResult:
        server = SMTPServer(
            host=host,
            port=port,
            security=security,
            ca_file=self._ca_file,
            connect_address=address,
            local_hostname=self._ehlo or ehlo_name(None, "", f"probe@{host}"),
            timeouts=SMTPTimeouts(
                connect=timeout_s,
                greeting=timeout_s,
                command=timeout_s,
                mail=timeout_s,
                rcpt=timeout_s,
                quit=min(timeout_s, 1.0),
            ),
        )
        session = SMTPSession(server)
        try:
            async with asyncio.timeout(timeout_s):
                await session.open()
                extensions = session.extensions
                encrypted = session.encrypted
                await session.close()
        except SMTPDeliveryError as exc:
            return ProbeResult(ok=False, code=_code(str(exc.code)), detail=exc.detail)
        except TimeoutError:
            session.abort()
            return ProbeResult(
                ok=False, code=ErrorCode.TIMEOUT, detail=f"no answer within {timeout_s:.3g} s"
            )
        auth = extensions.get("auth", "")
        return ProbeResult(
            ok=True,
            detail=f"SMTP server answered EHLO at {host}:{port}"
            + (" over TLS, certificate valid" if encrypted else " in plain text"),
            tls=encrypted,
            starttls_offered=security is Security.STARTTLS or "starttls" in extensions,
            auth_mechanisms=sorted({m.upper() for m in auth.split()}),
            pipelining="pipelining" in extensions,
            capabilities=sorted(k.upper() for k in extensions),
        )


def _code(code: str) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.PROTOCOL_ERROR


def _rank(candidates: list[Candidate], protocol: MailProtocol) -> list[Candidate]:
    mine = [c for c in candidates if c.protocol is protocol]
    # A plain candidate that offers STLS/STARTTLS was already probed as STARTTLS; a plain
    # one is dropped when a TLS candidate works: never a plaintext login where TLS is offered.
    if any(c.probe.ok and c.security is not Security.NONE for c in mine):
        mine = [c for c in mine if c.security is not Security.NONE]
    mine.sort(
        key=lambda c: (
            not c.probe.ok,
            SECURITY_RANK[c.security],
            min(SOURCE_RANK[s] for s in c.sources),
            c.host,
            c.port,
        )
    )
    return mine[:MAX_CANDIDATES_PER_PROTOCOL]


def _dechunk(body: bytes) -> bytes:
    """The payload of a chunked HTTP/1.1 body (a malformed one raises FetchError)."""
    out = bytearray()
    rest = body
    while True:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            raise FetchError("a malformed chunked body")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise FetchError("a malformed chunked body") from None
        if size == 0:
            return bytes(out)
        out += rest[:size]
        rest = rest[size + 2 :]
