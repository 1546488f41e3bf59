"""Credential encryption at rest: AES-256-GCM, a random nonce per value, a key id.

Stored form: ``v1.<key id>.<base64url(nonce || ciphertext+tag)>``. The associated data binds
each ciphertext to its row and field (``account id`` + ``field``), so a ciphertext copied
into another row or field fails to decrypt. The first key encrypts; every configured key
decrypts (found by key id), so keys can be rotated by prepending a new one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.config import SECRET_KEY_BYTES, ConfigError, Settings, decode_secret_key

NONCE_BYTES = 12
FORMAT_VERSION = "v1"


class CredentialError(Exception):
    """A stored credential cannot be decrypted (wrong row, unknown key, tampering)."""


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key (never the key)."""
    return hashlib.sha256(b"mailroom-key-id" + key).hexdigest()[:12]


class CredentialCipher:
    """Encrypts and decrypts credentials for one account field at a time."""

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._active_id = key_id(keys[0])
        self._ciphers = {key_id(key): AESGCM(key) for key in keys}

    def encrypt(self, plaintext: str, *, account_id: str, field: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self._active_id].encrypt(
            nonce, plaintext.encode("utf-8"), _aad(account_id, field)
        )
        token = base64.urlsafe_b64encode(nonce + sealed).decode("ascii")
        return f"{FORMAT_VERSION}.{self._active_id}.{token}"

    def decrypt(self, stored: str, *, account_id: str, field: str) -> str:
        try:
            version, kid, token = stored.split(".", 2)
        except ValueError:
            raise CredentialError("malformed stored credential") from None
        cipher = self._ciphers.get(kid)
        if version != FORMAT_VERSION or cipher is None:
            raise CredentialError(f"no configured key with id {kid!r}")
        try:
            blob = base64.urlsafe_b64decode(token)
            plain = cipher.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(account_id, field))
        except (InvalidTag, ValueError):
            raise CredentialError("stored credential failed authentication") from None
        return plain.decode("utf-8")


def _aad(account_id: str, field: str) -> bytes:
    return f"mailroom:{account_id}:{field}".encode()


def load_or_create_keys(settings: Settings) -> tuple[bytes, ...]:
    """The configured keys, or the key file beside the database (created on first start)."""
    if settings.secret_keys:
        return settings.secret_keys
    path: Path = settings.key_file
    if path.exists():
        return (decode_secret_key(path.read_text(), f"key file {path.name}"),)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_KEY_BYTES)).decode()
    # Written whole to a temporary file first, then linked into place: a full disk or a
    # crash leaves no empty or torn key file behind (which would stop every later start),
    # and link() fails if another process starting at once has put its key there first.
    partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(encoded + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.link(partial, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(partial)
    except FileExistsError:
        return (decode_secret_key(path.read_text(), f"key file {path.name}"),)
    except OSError as exc:
        raise ConfigError(f"cannot create the key file beside the database: {exc}") from exc
    return (decode_secret_key(encoded, "generated key"),)
