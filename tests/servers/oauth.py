"""A small OAuth2 provider for tests: a token endpoint and an introspection endpoint.

- ``POST /token`` over HTTPS (a trustme certificate for ``localhost`` and 127.0.0.1):
  the refresh-token grant (RFC 6749 section 6). Each refresh issues a new access token
  and, when ``rotate`` is on, a new refresh token (the old one stops working).
  Refusals are ``400 {"error": "invalid_grant", "error_description": ...}`` (or
  ``invalid_client`` with 401).
- ``POST /introspect`` over plain HTTP on loopback (RFC 7662, as Dovecot's ``oauth2``
  passdb asks it with ``introspection_mode = post``): ``{"active": true, "username": U}``
  for a live access token, ``{"active": false}`` otherwise.

Both run in threads (Dovecot asks the introspection endpoint while the test's event loop
waits on POP3). API::

    with running_oauth_provider(ca) as provider:
        provider.token_url                    https://localhost:PORT/token
        provider.introspection_url            http://127.0.0.1:PORT/introspect
        provider.add_client(client_id, secret)
        provider.grant(username, client_id) -> refresh token
        provider.issue_access_token(username, expires_in=3600) -> access token
        provider.expire(access_token)         introspection calls it inactive from now on
        provider.revoke(refresh_token)        refreshes with it are refused
        provider.refreshes                    grant requests answered with a token
        provider.introspections               introspection requests seen
"""

from __future__ import annotations

import contextlib
import json
import secrets
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme


@dataclass
class _Token:
    username: str
    expires_at: float
    active: bool = True


@dataclass
class OAuthProvider:
    """State of the provider (see the module docstring); thread-safe."""

    ca: trustme.CA
    token_port: int = 0
    introspection_port: int = 0
    rotate: bool = True
    expires_in: int = 3600
    refreshes: int = 0
    introspections: int = 0
    clients: dict[str, str] = field(default_factory=dict)
    refresh_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # -> user, client
    access_tokens: dict[str, _Token] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def token_url(self) -> str:
        return f"https://localhost:{self.token_port}/token"

    @property
    def introspection_url(self) -> str:
        return f"http://127.0.0.1:{self.introspection_port}/introspect"

    def add_client(
        self, client_id: str | None = None, secret: str | None = None
    ) -> tuple[str, str]:
        client_id = client_id or f"client-{secrets.token_hex(4)}"
        secret = secret or secrets.token_urlsafe(16)
        with self.lock:
            self.clients[client_id] = secret
        return client_id, secret

    def grant(self, username: str, client_id: str) -> str:
        """A refresh token for ``username`` (as after the user consented)."""
        token = "rt-" + secrets.token_urlsafe(24)
        with self.lock:
            self.refresh_tokens[token] = (username, client_id)
        return token

    def issue_access_token(self, username: str, expires_in: int | None = None) -> str:
        token = "at-" + secrets.token_urlsafe(24)
        lifetime = self.expires_in if expires_in is None else expires_in
        with self.lock:
            self.access_tokens[token] = _Token(username, time.time() + lifetime)
        return token

    def expire(self, access_token: str) -> None:
        with self.lock:
            self.access_tokens[access_token].active = False

    def revoke(self, refresh_token: str) -> None:
        with self.lock:
            self.refresh_tokens.pop(refresh_token, None)

    def active_refresh_tokens(self, username: str) -> list[str]:
        with self.lock:
            return [t for t, (user, _) in self.refresh_tokens.items() if user == username]

    # -- the endpoints --------------------------------------------------------------------

    def token_endpoint(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if form.get("grant_type") != "refresh_token":
                return 400, {"error": "unsupported_grant_type"}
            client_id = form.get("client_id", "")
            if self.clients.get(client_id) != form.get("client_secret"):
                return 401, {"error": "invalid_client", "error_description": "unknown client"}
            held = self.refresh_tokens.get(form.get("refresh_token", ""))
            if held is None or held[1] != client_id:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                }
            username = held[0]
            access = "at-" + secrets.token_urlsafe(24)
            self.access_tokens[access] = _Token(username, time.time() + self.expires_in)
            answer: dict[str, Any] = {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": self.expires_in,
            }
            if self.rotate:
                del self.refresh_tokens[form["refresh_token"]]
                rotated = "rt-" + secrets.token_urlsafe(24)
                self.refresh_tokens[rotated] = held
                answer["refresh_token"] = rotated
            self.refreshes += 1
            return 200, answer

    def introspect(self, form: dict[str, str]) -> dict[str, Any]:
        with self.lock:
            self.introspections += 1
            token = self.access_tokens.get(form.get("token", ""))
            if token is None or not token.active or token.expires_at < time.time():
                return {"active": False}
            return {"active": True, "username": token.username, "token_type": "Bearer"}


def _handler(provider: OAuthProvider, kind: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode("utf-8", "replace")
            form = {k: v[0] for k, v in urllib.parse.parse_qs(raw).items()}
            if kind == "token" and self.path.split("?")[0] == "/token":
                status, body = provider.token_endpoint(form)
            elif kind == "introspect" and self.path.split("?")[0] == "/introspect":
                status, body = 200, provider.introspect(form)
            else:
                status, body = 404, {"error": "not_found"}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


@contextlib.contextmanager
def running_oauth_provider(ca: trustme.CA | None = None) -> Iterator[OAuthProvider]:
    """Start both endpoints on free loopback ports; stop them on exit."""
    ca = ca or trustme.CA()
    provider = OAuthProvider(ca)
    token_server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(provider, "token"))
    introspection = ThreadingHTTPServer(("127.0.0.1", 0), _handler(provider, "introspect"))
    with tempfile.TemporaryDirectory(prefix="mailroom-oauth-") as tmp:
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
    token_server.socket = context.wrap_socket(token_server.socket, server_side=True)
    provider.token_port = int(token_server.server_address[1])
    provider.introspection_port = int(introspection.server_address[1])
    threads = [
        threading.Thread(target=server.serve_forever, daemon=True, name=f"oauth-{n}")
        for n, server in (("token", token_server), ("introspect", introspection))
    ]
    for thread in threads:
        thread.start()
    try:
        yield provider
    finally:
        for server in (token_server, introspection):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(5)
