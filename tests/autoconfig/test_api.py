"""The setup endpoints through the app: presets (content, filling, a loopback preset),
POST /v1/verify (nothing stored, no password logged) and GET /v1/autoconfig."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.domain.enums import Security
from service.domain.inputs import check_host
from service.services.presets import PresetCatalog
from tests.api.conftest import API_KEY, make_settings
from tests.autoconfig.conftest import HTTPSServer, SMTPServers
from tests.servers.dns import dns_in_thread
from tests.servers.dovecot import Dovecot

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
SMTP_PASSWORD = "correct horse battery staple"


def test_every_bundled_preset_is_complete_and_plausible() -> None:
    presets = PresetCatalog().all()
    names = {p.name for p in presets}
    assert {"gmail", "outlook", "yahoo", "fastmail", "gmx"} <= names
    for preset in presets:
        assert preset.domains and preset.title
        for server, standard in (
            (preset.incoming, {Security.TLS: {995}, Security.STARTTLS: {110}}),
            (preset.outgoing, {Security.TLS: {465}, Security.STARTTLS: {587, 25}}),
        ):
            check_host(server.host)
            assert "." in server.host and not server.host.endswith(".test")
            # Only encrypted settings, each on its standard port.
            assert server.security in standard
            assert server.port in standard[server.security]
        if preset.oauth2 is not None:
            assert preset.oauth2.authorization_url.startswith("https://")
            assert preset.oauth2.token_url.startswith("https://")
            assert preset.oauth2.scopes
    gmail = next(p for p in presets if p.name == "gmail")
    assert gmail.oauth2 is not None and "https://mail.google.com/" in gmail.oauth2.scopes
    assert next(p for p in presets if p.name == "outlook").oauth2 is not None


@pytest.fixture
def presets_file(tmp_path: Path, pop3: Dovecot, smtp: SMTPServers) -> str:
    """A preset whose servers are the loopback Dovecot and aiosmtpd (test-only)."""
    path = tmp_path / "presets.json"
    path.write_text(
        json.dumps(
            {
                "loopback": {
                    "title": "Loopback test servers",
                    "domains": ["preset.test"],
                    "incoming": {"host": "localhost", "port": pop3.pop3s_port, "security": "tls"},
                    "outgoing": {
                        "host": "localhost",
                        "port": smtp.starttls.port,
                        "security": "starttls",
                    },
                }
            }
        )
    )
    return str(path)


@pytest.fixture
async def app_client(
    tmp_path: Path, presets_file: str, ca: Any
) -> AsyncIterator[AsyncTestClient[Any]]:
    settings = make_settings(
        tmp_path,
        presets_file=presets_file,
        allowed_networks=LOOPBACK,
        ca_file=ca[1],
        verify_timeout_s=10.0,
    )
    async with AsyncTestClient(app=create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield client


def body(pop3_user: str, pop3_password: str, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "Preset",
        "email": "alice@preset.test",
        "preset": "loopback",
        "incoming": {"username": pop3_user, "password": pop3_password},
        "outgoing": {"username": "alice", "password": SMTP_PASSWORD},
    }
    data.update(overrides)
    return data


async def test_presets_are_listed(app_client: AsyncTestClient[Any]) -> None:
    response = await app_client.get("/v1/presets")
    assert response.status_code == 200
    items = {p["name"]: p for p in response.json()["items"]}
    assert items["gmail"]["incoming"] == {"host": "pop.gmail.com", "port": 995, "security": "tls"}
    assert items["outlook"]["oauth2"]["token_url"].startswith("https://login.microsoftonline.com/")
    assert items["loopback"]["domains"] == ["preset.test"]


async def test_a_preset_fills_what_the_caller_left_out(app_client: AsyncTestClient[Any]) -> None:
    data = {
        "name": "G",
        "email": "g@gmail.com",
        "preset": "gmail",
        "incoming": {"username": "g@gmail.com", "password": "app-password-1"},
        "outgoing": {
            "username": "g@gmail.com",
            "password": "app-password-1",
            "port": 587,
            "security": "starttls",
        },
    }
    response = await app_client.post("/v1/accounts", json=data)
    assert response.status_code == 201, response.text
    account = response.json()
    assert account["incoming"]["host"] == "pop.gmail.com"
    assert (account["incoming"]["port"], account["incoming"]["security"]) == (995, "tls")
    # What the caller gave wins.
    assert account["outgoing"]["host"] == "smtp.gmail.com"
    assert (account["outgoing"]["port"], account["outgoing"]["security"]) == (587, "starttls")


async def test_an_unknown_preset_and_missing_hosts_are_422(
    app_client: AsyncTestClient[Any],
) -> None:
    response = await app_client.post("/v1/accounts", json=body("u", "p", preset="nosuch"))
    assert response.status_code == 422
    assert response.json()["code"] == "unknown_preset"
    no_hosts = body("u", "p")
    del no_hosts["preset"]
    response = await app_client.post("/v1/accounts", json=no_hosts)
    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "validation_error"
    assert {e["field"] for e in problem["errors"]} == {"incoming.host", "outgoing.host"}
    response = await app_client.post("/v1/verify", json=body("u", "p", preset="nosuch"))
    assert response.status_code == 422 and response.json()["code"] == "unknown_preset"
    assert (await app_client.get("/v1/accounts")).json()["items"] == []


async def test_verify_before_saving_stores_nothing_and_logs_no_password(
    app_client: AsyncTestClient[Any], pop3: Dovecot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    mailbox = pop3.add_user()
    mailbox.deliver(b"Subject: hi\n\nhello\n")
    response = await app_client.post("/v1/verify", json=body(mailbox.user, mailbox.password))
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["ok"] is True, result
    assert [s["step"] for s in result["incoming"]["steps"]] == ["connect", "tls", "auth", "mailbox"]
    assert "1 message(s)" in result["incoming"]["steps"][-1]["detail"]
    assert [s["step"] for s in result["outgoing"]["steps"]] == [
        "connect",
        "tls",
        "auth",
        "envelope",
    ]
    assert (await app_client.get("/v1/accounts")).json()["items"] == []
    assert mailbox.count() == 1  # nothing retrieved or deleted

    wrong = "Wr0ng-" + "x9Q2v" * 3
    response = await app_client.post("/v1/verify", json=body(mailbox.user, wrong))
    failed = response.json()
    assert failed["ok"] is False
    assert failed["incoming"]["steps"][-1] == {
        **failed["incoming"]["steps"][-1],
        "step": "auth",
        "ok": False,
        "code": "auth_failed",
    }
    for secret in (mailbox.password, wrong, SMTP_PASSWORD):
        assert secret not in caplog.text
        assert secret not in response.text


async def test_autoconfig_through_the_api(
    tmp_path: Path, https: HTTPSServer, ca: Any, pop3: Dovecot, smtp: SMTPServers
) -> None:
    https.documents["/v1.1/ispdb-only.test"] = (
        '<clientConfig version="1.1"><emailProvider id="ispdb-only.test">'
        '<incomingServer type="pop3"><hostname>localhost</hostname>'
        f"<port>{pop3.pop3s_port}</port><socketType>SSL</socketType>"
        "<username>%EMAILLOCALPART%</username></incomingServer>"
        '<outgoingServer type="smtp"><hostname>localhost</hostname>'
        f"<port>{smtp.tls.port}</port><socketType>SSL</socketType></outgoingServer>"
        "</emailProvider></clientConfig>"
    ).encode()
    records = {"ispdb.test.": {"A": ["127.0.0.1"]}, "localhost.": {"A": ["127.0.0.1"]}}
    with dns_in_thread(records) as dns:
        settings = make_settings(
            tmp_path,
            allowed_networks=LOOPBACK,
            ca_file=ca[1],
            dns_servers=(dns.address,),
            ispdb_url=f"https://ispdb.test:{https.port}/v1.1/",
            autoconfig_timeout_s=5.0,
        )
        async with AsyncTestClient(app=create_app(settings)) as client:
            client.headers["Authorization"] = f"Bearer {API_KEY}"
            response = await client.get("/v1/autoconfig", params={"email": "hal@ispdb-only.test"})
            bad = await client.get("/v1/autoconfig", params={"email": "not-an-address"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert [
        (c["host"], c["port"], c["security"], c["sources"], c["probe"]["ok"])
        for c in result["incoming"]
    ] == [("localhost", pop3.pop3s_port, "tls", ["ispdb"], True)]
    assert result["incoming"][0]["username"] == "hal"
    assert [(c["host"], c["port"], c["probe"]["ok"]) for c in result["outgoing"]] == [
        ("localhost", smtp.tls.port, True)
    ]
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error"
