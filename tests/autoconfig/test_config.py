"""The setup settings: MAILROOM_DNS_SERVERS, MAILROOM_ISPDB_URL, MAILROOM_AUTOCONFIG_TIMEOUT,
MAILROOM_PRESETS_FILE."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, Settings
from service.services.presets import PresetCatalog, PresetError


def test_setup_settings_are_read_and_checked(tmp_path: Path) -> None:
    presets = tmp_path / "presets.json"
    presets.write_text("{}")
    settings = Settings.from_env(
        {
            "MAILROOM_DNS_SERVERS": "127.0.0.1:5353, [::1]:53, 10.0.0.2",
            "MAILROOM_ISPDB_URL": "https://ispdb.example.net/v1.1",
            "MAILROOM_AUTOCONFIG_TIMEOUT": "2.5",
            "MAILROOM_PRESETS_FILE": str(presets),
        }
    )
    assert settings.dns_servers == (("127.0.0.1", 5353), ("::1", 53), ("10.0.0.2", 53))
    assert settings.ispdb_url == "https://ispdb.example.net/v1.1/"
    assert settings.autoconfig_timeout_s == 2.5
    assert settings.presets_file == str(presets)
    assert Settings.from_env({"MAILROOM_ISPDB_URL": "off"}).ispdb_url is None
    assert Settings().ispdb_url == "https://autoconfig.thunderbird.net/v1.1/"
    for name, value in (
        ("MAILROOM_DNS_SERVERS", "dns.example.net"),
        ("MAILROOM_DNS_SERVERS", "127.0.0.1:99999"),
        ("MAILROOM_ISPDB_URL", "ftp://x"),
        ("MAILROOM_AUTOCONFIG_TIMEOUT", "0"),
        ("MAILROOM_PRESETS_FILE", str(tmp_path / "missing.json")),
    ):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})


def test_a_presets_file_adds_and_replaces_and_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "presets.json"
    server = {"host": "pop.corp.example", "port": 995, "security": "tls"}
    path.write_text(
        '{"gmail": {"title": "Ours", "domains": ["corp.example"],'
        f' "incoming": {_json(server)}, "outgoing": {_json(server)}}}}}'
    )
    catalog = PresetCatalog(str(path))
    assert catalog.get("gmail").title == "Ours"
    assert catalog.get("outlook").incoming.host == "outlook.office365.com"
    assert catalog.for_domain("CORP.example").name == "gmail"  # type: ignore[union-attr]
    path.write_text('{"Bad Name": {}}')
    with pytest.raises(PresetError):
        PresetCatalog(str(path))
    path.write_text(
        '{"x": {"title": "X", "domains": [], "incoming": {"host": "bad host", "port": 1,'
        ' "security": "tls"}, "outgoing": {"host": "a.example", "port": 1, "security": "tls"}}}'
    )
    with pytest.raises(PresetError, match="incoming"):
        PresetCatalog(str(path))


def _json(value: object) -> str:
    import json

    return json.dumps(value)
