"""Fixtures for the POP3 tests: scripted fault servers and a TLS identity for them."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from .fault_server import Handler, ScriptedServer

StartServer = Callable[..., Awaitable[ScriptedServer]]


@dataclass(frozen=True)
class FaultTLS:
    """A CA the client trusts (``ca_file``) and a server context for localhost."""

    ca_file: str
    server_context: ssl.SSLContext


@pytest.fixture(scope="session")
def fault_tls(tmp_path_factory: pytest.TempPathFactory) -> FaultTLS:
    ca = trustme.CA()
    ca_file = Path(tmp_path_factory.mktemp("fault-tls")) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return FaultTLS(str(ca_file), context)


@pytest.fixture
async def serve() -> AsyncIterator[StartServer]:
    """``await serve(handler, ssl_context=None)`` starts a scripted server on loopback."""
    servers: list[ScriptedServer] = []

    async def start(
        handler: Handler, *, ssl_context: ssl.SSLContext | None = None
    ) -> ScriptedServer:
        server = ScriptedServer(handler, ssl_context=ssl_context)
        await server.__aenter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.__aexit__(None, None, None)
        assert not server.errors, server.errors
