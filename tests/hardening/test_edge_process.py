"""The HTTP edge of the real process (uvicorn): repeated headers, non-JSON bodies, deep
JSON, and one JSON log line per request with its fields.

Repeated headers are sent on the wire as separate lines, as a client or proxy would; the
in-process test client would merge them.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.process import output, start, stop

KEY = "edge-key-0123456789abcdef"
OTHER = "edge-other-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
LOG_WAIT_S = 10


def account(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "email": "edge@example.com",
        "incoming": {"host": "pop.example.invalid", "username": "u", "password": "pw-edge-1"},
        "outgoing": {"host": "smtp.example.invalid"},
    }


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    directory = tmp_path_factory.mktemp("edge")
    proc, base = start(
        {
            "MAILROOM_DATABASE": str(directory / "mailroom.db"),
            "MAILROOM_API_KEYS": f"{KEY},other:{OTHER}",
            "MAILROOM_LOG_FORMAT": "json",
        }
    )
    try:
        yield base, proc
    finally:
        stop(proc)


def test_repeated_authorization_is_400(live: tuple[str, subprocess.Popen[str]]) -> None:
    base, _ = live
    for second in (KEY, OTHER, "wrong-0123456789"):
        headers = [("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {second}")]
        response = httpx.get(base + "/v1/accounts", headers=headers)
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "ambiguous_header"
        assert KEY not in response.text


def test_repeated_idempotency_key_is_400_and_nothing_is_queued(
    live: tuple[str, subprocess.Popen[str]],
) -> None:
    base, _ = live
    created = httpx.post(base + "/v1/accounts", json=account("idem"), headers=AUTH)
    url = f"{base}/v1/accounts/{created.json()['id']}/outbox"
    body = {"to": ["bob@example.com"], "subject": "s", "text": "t"}
    headers = [*AUTH.items(), ("Idempotency-Key", "one"), ("Idempotency-Key", "two")]
    response = httpx.post(url, json=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "ambiguous_header"
    assert httpx.get(url, headers=AUTH).json()["items"] == []
    once = httpx.post(url, json=body, headers={**AUTH, "Idempotency-Key": "one"})
    assert once.status_code == 202, once.text


def test_non_json_and_deep_json_bodies(live: tuple[str, subprocess.Popen[str]]) -> None:
    base, _ = live
    payload = json.dumps(account("typed")).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = httpx.post(
            base + "/v1/accounts", content=payload, headers={**AUTH, "Content-Type": content_type}
        )
        assert response.status_code == 415, response.text
        assert response.json()["code"] == "unsupported_media_type"
    deep = b"[" * 100_000 + b"]" * 100_000
    response = httpx.post(
        base + "/v1/accounts", content=deep, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "malformed_json"
    assert httpx.get(base + "/v1/accounts", headers=AUTH).json()["items"][0]["name"] == "idem"


def test_one_json_line_per_request(live: tuple[str, subprocess.Popen[str]]) -> None:
    base, proc = live
    created = httpx.post(
        base + "/v1/accounts", json=account("logged"), headers={**AUTH, "X-Request-ID": "req-A1"}
    )
    account_id = created.json()["id"]
    httpx.get(f"{base}/v1/accounts/{account_id}", headers={**AUTH, "X-Request-ID": "req-A2"})
    httpx.get(f"{base}/v1/accounts/{account_id}", headers={"X-Request-ID": "req-A3"})
    httpx.get(f"{base}/health", headers={"X-Request-ID": "req-A4"})
    expected = [
        ("req-A1", "POST", "/v1/accounts", 201),
        ("req-A2", "GET", "/v1/accounts/{account_id}", 200),
        ("req-A3", "GET", "/v1/accounts/{account_id}", 401),
        ("req-A4", "GET", "/health", 200),
    ]
    deadline = time.monotonic() + LOG_WAIT_S  # the line follows the response's last byte
    while True:
        records = [json.loads(line) for line in output(proc).splitlines() if line.strip()]
        lines = [r for r in records if r["logger"] == "mailroom.http"]
        seen = [
            (r.get("request_id"), r["method"], r["route"], r["status"])
            for r in lines
            if str(r.get("request_id", "")).startswith("req-A")
        ]
        if len(seen) >= len(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert seen == expected
    for record in lines:
        assert record["level"] == "info" and record["message"] == "request"
        assert isinstance(record["duration_ms"], float) and record["duration_ms"] >= 0
    text = "\n".join(json.dumps(r) for r in lines)
    assert account_id not in text  # the route template, never the raw path
    assert KEY not in output(proc) and "pw-edge-1" not in output(proc)
