"""Settings from the environment, and credential encryption."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from service.config import ConfigError, Settings
from service.crypto import CredentialCipher, CredentialError, key_id, load_or_create_keys


def key() -> bytes:
    return os.urandom(32)


def test_defaults_need_nothing() -> None:
    settings = Settings.from_env({})
    assert settings.database == "./data/mailroom.db"
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.api_keys == ()
    assert settings.key_file == Path("./data/mailroom.key")


def test_full_environment() -> None:
    secret = base64.b64encode(key()).decode()
    settings = Settings.from_env(
        {
            "MAILROOM_DATABASE": "/tmp/x.db",
            "MAILROOM_HOST": "0.0.0.0",
            "MAILROOM_PORT": "9000",
            "MAILROOM_API_KEYS": "k-0123456789abcdef, team-a:k-abcdef0123456789",
            "MAILROOM_SECRET_KEY": secret,
            "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8, ::1/128",
            "MAILROOM_RETRY_DELAYS": "1,2.5,10",
        }
    )
    assert settings.port == 9000
    assert [(k.tenant, k.key) for k in settings.api_keys] == [
        ("default", "k-0123456789abcdef"),
        ("team-a", "k-abcdef0123456789"),
    ]
    assert settings.secret_keys == (base64.b64decode(secret),)
    assert [str(n) for n in settings.allowed_networks] == ["127.0.0.0/8", "::1/128"]
    assert settings.retry_delays_s == (1.0, 2.5, 10.0)


@pytest.mark.parametrize(
    ("name", "value", "mentions"),
    [
        ("MAILROOM_PORT", "http", "MAILROOM_PORT"),
        ("MAILROOM_PORT", "70000", "MAILROOM_PORT"),
        ("MAILROOM_API_KEYS", "short", "MAILROOM_API_KEYS"),
        ("MAILROOM_API_KEYS", "bad tenant:k-0123456789abcdef", "MAILROOM_API_KEYS"),
        ("MAILROOM_SECRET_KEY", "not-base64!!", "MAILROOM_SECRET_KEY"),
        ("MAILROOM_SECRET_KEY", base64.b64encode(b"too short").decode(), "32 bytes"),
        ("MAILROOM_ALLOWED_NETWORKS", "10.0.0.0/33", "MAILROOM_ALLOWED_NETWORKS"),
        ("MAILROOM_CA_FILE", "/nonexistent/ca.pem", "MAILROOM_CA_FILE"),
        ("MAILROOM_LOG_FORMAT", "xml", "MAILROOM_LOG_FORMAT"),
        ("MAILROOM_RETRY_DELAYS", "1,x", "MAILROOM_RETRY_DELAYS"),
        ("MAILROOM_RETRIEVAL_TIMEOUT", "0", "MAILROOM_RETRIEVAL_TIMEOUT"),
        ("MAILROOM_VERIFY_TIMEOUT", "soon", "MAILROOM_VERIFY_TIMEOUT"),
        ("MAILROOM_MAX_RETRIEVALS_PER_TENANT", "0", "MAILROOM_MAX_RETRIEVALS_PER_TENANT"),
        ("MAILROOM_EHLO_NAME", "localhost", "fully qualified"),
        ("MAILROOM_EHLO_NAME", "mail .example.com", "fully qualified"),
        ("MAILROOM_EHLO_NAME", "[300.1.2.3]", "address literal"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, mentions: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert mentions in str(info.value)


def test_tenant_shares_default_to_half_only_with_several_tenants() -> None:
    one = Settings.from_env({"MAILROOM_API_KEYS": "k-0123456789abcdef"})
    assert (one.retrievals_per_tenant, one.smtp_sessions_tenant_share) == (8, 20)
    several = Settings.from_env({"MAILROOM_API_KEYS": "a:k-0123456789abcdef,b:k-abcdef0123456789"})
    assert (several.retrievals_per_tenant, several.smtp_sessions_tenant_share) == (4, 10)
    tiny = Settings.from_env(
        {
            "MAILROOM_API_KEYS": "a:k-0123456789abcdef,b:k-abcdef0123456789",
            "MAILROOM_MAX_CONCURRENT_RETRIEVALS": "1",
            "MAILROOM_SMTP_SESSIONS_PER_TENANT": "50",
        }
    )
    assert (tiny.retrievals_per_tenant, tiny.smtp_sessions_tenant_share) == (1, 20)


def test_ehlo_name_accepts_names_and_address_literals() -> None:
    for name in ("mail.example.com", "[192.0.2.1]", "[IPv6:2001:db8::1]"):
        assert Settings.from_env({"MAILROOM_EHLO_NAME": name}).ehlo_name == name


def test_encrypt_decrypt_roundtrip_with_random_nonce() -> None:
    cipher = CredentialCipher((key(),))
    a = cipher.encrypt("s3cret", account_id="acc_1", field="incoming.password")
    b = cipher.encrypt("s3cret", account_id="acc_1", field="incoming.password")
    assert a != b and "s3cret" not in a
    assert cipher.decrypt(a, account_id="acc_1", field="incoming.password") == "s3cret"


def test_ciphertext_moved_to_another_row_or_field_fails() -> None:
    cipher = CredentialCipher((key(),))
    sealed = cipher.encrypt("s3cret", account_id="acc_1", field="incoming.password")
    with pytest.raises(CredentialError):
        cipher.decrypt(sealed, account_id="acc_2", field="incoming.password")
    with pytest.raises(CredentialError):
        cipher.decrypt(sealed, account_id="acc_1", field="outgoing.password")


def test_tampering_and_unknown_key_fail() -> None:
    k1, k2 = key(), key()
    sealed = CredentialCipher((k1,)).encrypt("x", account_id="a", field="f")
    version, kid, token = sealed.split(".")
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    with pytest.raises(CredentialError):
        CredentialCipher((k1,)).decrypt(f"{version}.{kid}.{flipped}", account_id="a", field="f")
    with pytest.raises(CredentialError):
        CredentialCipher((k2,)).decrypt(sealed, account_id="a", field="f")


def test_rotation_new_key_first_old_still_decrypts() -> None:
    old, new = key(), key()
    sealed_old = CredentialCipher((old,)).encrypt("x", account_id="a", field="f")
    rotated = CredentialCipher((new, old))
    assert rotated.decrypt(sealed_old, account_id="a", field="f") == "x"
    assert rotated.encrypt("x", account_id="a", field="f").split(".")[1] == key_id(new)


def test_key_file_created_once_beside_database(tmp_path: Path) -> None:
    settings = Settings(database=str(tmp_path / "d" / "mailroom.db"))
    first = load_or_create_keys(settings)
    assert settings.key_file.exists()
    assert oct(settings.key_file.stat().st_mode & 0o777) == "0o600"
    assert load_or_create_keys(settings) == first
