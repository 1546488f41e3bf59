"""SASL initial responses for OAuth2 access tokens, shared by the POP3 and SMTP clients.

Both are sent base64-encoded by the protocol clients.
"""

from __future__ import annotations


def xoauth2_response(username: str, token: str) -> bytes:
    """XOAUTH2 (Google, Microsoft): ``user=U^Aauth=Bearer T^A^A``."""
    return f"user={username}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer_response(username: str, token: str, host: str, port: int) -> bytes:
    """RFC 7628 OAUTHBEARER: a GS2 header naming the user, then host, port and token."""
    authzid = username.replace("=", "=3D").replace(",", "=2C")
    return f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()
