"""Loopback world for autoconfig: a DNS server, an HTTPS server for autoconfig documents
and the ISPDB, Dovecot (POP3) and aiosmtpd (SMTP) with certificates for the test names,
all signed by one test CA, and a port that accepts connections but never answers."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trustme

from tests.servers.dovecot import Dovecot, running_dovecot
from tests.servers.smtp import SMTPDServer, SMTPTLSFiles, start_smtpd

# Every name a server here presents a certificate for.
POP3_NAMES = ("pop.withdoc.test", "pop.srvonly.test", "pop.mxhost.test", "pop.preset.test")
SMTP_NAMES = (
    "smtp.withdoc.test",
    "smtp.srvonly.test",
    "smtp.mxhost.test",
    "slow.withdoc.test",
    "smtp.preset.test",
    "localhost",
    "127.0.0.1",
)
HTTPS_NAMES = ("autoconfig.withdoc.test", "withdoc.test", "ispdb.test", "localhost")


@dataclass
class HTTPSServer:
    """``documents``: path (with query) -> XML body; anything else is 404."""

    port: int
    documents: dict[str, bytes]
    requests: list[tuple[str, str]] = field(default_factory=list)  # (Host, path)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, str]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("autoconfig-ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, str(path)


@pytest.fixture(scope="module")
def pop3(ca: tuple[trustme.CA, str]) -> Iterator[Dovecot]:
    with running_dovecot(ssl="yes", ca=ca[0], cert_names=POP3_NAMES) as server:
        yield server


@pytest.fixture(scope="module")
def https(ca: tuple[trustme.CA, str]) -> Iterator[HTTPSServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca[0].issue_cert(*HTTPS_NAMES).configure_cert(context)
    documents: dict[str, bytes] = {}
    requests: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append((self.headers.get("Host", ""), self.path))
            body = documents.get(self.path) or documents.get(self.path.partition("?")[0])
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield HTTPSServer(httpd.server_address[1], documents, requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@dataclass
class SMTPServers:
    tls: SMTPDServer  # implicit TLS (465-style)
    starttls: SMTPDServer  # STARTTLS offered, AUTH after it


@pytest.fixture(scope="module")
def smtp(ca: tuple[trustme.CA, str]) -> Iterator[SMTPServers]:
    """aiosmtpd with implicit TLS and with STARTTLS, in their own thread's event loop: the
    app under test runs in a portal thread that the test's own loop waits on."""
    authority, ca_file = ca
    files = SMTPTLSFiles(
        ca=authority,
        ca_file=ca_file,
        wrong_ca_file=ca_file,
        server_cert=authority.issue_cert(*SMTP_NAMES),
    )
    users = {"alice": "correct horse battery staple"}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=30)

    tls = run(start_smtpd(tls="implicit", tls_files=files, users=users))
    starttls = run(start_smtpd(tls="starttls", tls_files=files, users=users))
    try:
        yield SMTPServers(tls, starttls)
    finally:
        run(tls.stop())
        run(starttls.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
