"""No secret leaks, request ids, metrics and settings verification, on the real process.

Retrieval (POP3 STLS to Dovecot) and sending (SMTP STARTTLS + AUTH to aiosmtpd) run with
generated passwords, through a process logging JSON at DEBUG; every log line and every
response body is then scanned for the passwords.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.process import start, stop
from tests.servers.dovecot import Dovecot
from tests.servers.smtp import SMTPDServer, SMTPTLSFiles
from tests.waiting import until

KEY = "observe-key-0123456789abcdef"


async def test_secrets_never_leak_and_everything_is_observable(
    tmp_path: Path,
    dovecot: Dovecot,
    smtp_tls_files: SMTPTLSFiles,
    smtpd_factory: Callable[..., Awaitable[SMTPDServer]],
) -> None:
    pop3_password = "P0p-" + secrets.token_urlsafe(18)
    smtp_password = "Smtp-" + secrets.token_urlsafe(18)
    wrong_password = "Wr0ng-" + secrets.token_urlsafe(18)
    mailbox = dovecot.add_user(password=pop3_password)
    mailbox.deliver(b"Subject: hello\n\nhi\n")
    smtpd = await smtpd_factory(tls="starttls", users={"sender": smtp_password})
    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_text(Path(dovecot.ca_file).read_text() + Path(smtp_tls_files.ca_file).read_text())
    proc, base = start(
        {
            "MAILROOM_DATABASE": str(tmp_path / "mailroom.db"),
            "MAILROOM_API_KEYS": KEY,
            "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
            "MAILROOM_CA_FILE": str(bundle),
            "MAILROOM_LOG_FORMAT": "json",
            "MAILROOM_LOG_LEVEL": "DEBUG",
        }
    )
    bodies: list[str] = []
    try:
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        ) as http:

            async def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
                response = await http.request(method, url, **kwargs)
                bodies.append(response.text)
                return response

            def account(pop3: str, smtp: str) -> dict[str, Any]:
                return {
                    "name": "observed",
                    "email": "sender@example.com",
                    "incoming": {
                        "host": dovecot.hostname,
                        "port": dovecot.pop3_port,
                        "security": "starttls",
                        "username": mailbox.user,
                        "password": pop3,
                    },
                    "outgoing": {
                        "host": "localhost",
                        "port": smtpd.port,
                        "security": "starttls",
                        "username": "sender",
                        "password": smtp,
                    },
                }

            good = await call("POST", "/v1/accounts", json=account(pop3_password, smtp_password))
            good_id = good.json()["id"]
            bad_id = (
                await call("POST", "/v1/accounts", json=account(wrong_password, wrong_password))
            ).json()["id"]

            verified = (await call("POST", f"/v1/accounts/{good_id}/verify")).json()
            assert verified["ok"] is True, verified
            assert [s["step"] for s in verified["incoming"]["steps"]] == [
                "connect",
                "tls",
                "auth",
                "mailbox",
            ]
            assert [s["step"] for s in verified["outgoing"]["steps"]] == [
                "connect",
                "tls",
                "auth",
                "envelope",
            ]
            refused = (await call("POST", f"/v1/accounts/{bad_id}/verify")).json()
            assert refused["ok"] is False
            assert refused["incoming"]["steps"][-1]["code"] == "auth_failed"
            assert refused["outgoing"]["steps"][-1]["code"] == "auth_failed"

            for account_id, expected in ((good_id, "succeeded"), (bad_id, "failed")):
                started = await call("POST", f"/v1/accounts/{account_id}/retrievals")
                url = f"/v1/accounts/{account_id}/retrievals/{started.json()['id']}"
                done = await until(
                    lambda url=url: call("GET", url),
                    lambda r: r.json()["status"] in ("succeeded", "failed"),
                )
                assert done.json()["status"] == expected, done.text

            for account_id, expected in ((good_id, "sent"), (bad_id, "deferred")):
                sent = await call(
                    "POST",
                    f"/v1/accounts/{account_id}/outbox",
                    json={"to": ["rcpt@example.com"], "subject": "s", "text": "t"},
                )
                url = f"/v1/accounts/{account_id}/outbox/{sent.json()['id']}"
                final = await until(
                    lambda url=url: call("GET", url),
                    lambda r: r.json()["status"] in ("sent", "failed", "deferred"),
                )
                assert final.json()["status"] == expected, final.text
            assert len(smtpd.messages) == 1

            metrics = await http.get("/metrics", headers={"Authorization": ""})
            assert metrics.status_code == 200
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(metrics.text)
                for s in family.samples
            }
            assert samples[("mailroom_retrievals_total", (("outcome", "succeeded"),))] == 1
            assert samples[("mailroom_retrievals_total", (("outcome", "failed"),))] == 1
            for outcome in ("succeeded", "failed"):
                duration = ("mailroom_retrieval_duration_seconds_count", (("outcome", outcome),))
                assert samples[duration] == 1
            assert samples[("mailroom_messages_downloaded_total", ())] == 1
            assert samples[("mailroom_delivery_attempts_total", (("outcome", "sent"),))] == 1
            assert samples[("mailroom_delivery_latency_seconds_count", ())] == 1
            assert samples[("mailroom_outbox_messages", (("status", "sent"),))] == 1
            # The bad account's message waits for a retry: the oldest unsent has an age.
            assert samples[("mailroom_outbox_messages", (("status", "deferred"),))] == 1
            assert samples[("mailroom_outbox_oldest_unsent_age_seconds", ())] > 0
            created = (
                "mailroom_http_requests_total",
                (("method", "POST"), ("route", "/v1/accounts"), ("status", "201")),
            )
            assert samples[created] == 2  # the good and the bad account
            echoed = await http.get("/health", headers={"X-Request-ID": "trace-me-123"})
            assert echoed.headers["x-request-id"] == "trace-me-123"
    finally:
        log = stop(proc)

    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) > 10
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(r.get("request_id") for r in records)
    # One line per request, its fields as keys: the leak scan below covers them too.
    requests = [r for r in records if r.get("logger") == "mailroom.http"]
    assert {(r["method"], r["route"], r["status"]) for r in requests} >= {
        ("POST", "/v1/accounts", 201),
        ("POST", "/v1/accounts/{account_id}/verify", 200),
    }
    assert all(r.get("request_id") and "duration_ms" in r for r in requests)
    for secret in (pop3_password, smtp_password, wrong_password):
        assert secret not in log
        for body in bodies:
            assert secret not in body
    assert smtp_password.encode() not in b"".join(m.data for m in smtpd.messages)
