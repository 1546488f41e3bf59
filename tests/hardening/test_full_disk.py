"""A really full disk, on the real process: the database on a small tmpfs filled by a file.

- A write that finds the disk full answers 507 ``storage_full`` (accounts, sends,
  retrieval triggers) and nothing is acknowledged that was not stored; ``/ready`` is 503
  ``storage_full`` and ``/health`` 200 meanwhile; once space is freed, writes succeed again.
- The service starts on a full disk (a clean stop left no WAL index, so even opening the
  database needs space): it serves ``/health``, reports ``storage_full`` on ``/ready`` and
  503 on the API, and finishes starting (the generated key loads) once space is freed.

Mounting needs root (CI runs as root); elsewhere these tests are skipped.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from service.config import ConfigError, Settings
from service.crypto import load_or_create_keys
from tests.disk import Disk, pytestmark  # noqa: F401 (the skip applies here too)
from tests.process import kill, output, start, stop
from tests.waiting import wait_for

KEY = "disk-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def account(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "email": "full@example.com",
        "incoming": {"host": "pop.example.invalid", "username": "u", "password": "pw-disk-1"},
        "outgoing": {"host": "smtp.example.invalid"},
    }


MAIL = {"to": ["bob@example.com"], "subject": "on a full disk", "text": "hello"}


def test_writes_on_a_full_disk_are_507_and_work_again_once_freed(disk: Disk) -> None:
    proc, base = start({"MAILROOM_DATABASE": disk.database, "MAILROOM_API_KEYS": KEY})
    try:
        with httpx.Client(base_url=base, headers=AUTH, timeout=30) as http:
            first = http.post("/v1/accounts", json=account("before"))
            assert first.status_code == 201, first.text
            account_id = first.json()["id"]
            disk.fill()

            writes = [
                http.post("/v1/accounts", json=account("during")),
                http.post(f"/v1/accounts/{account_id}/outbox", json=MAIL),
                http.post(f"/v1/accounts/{account_id}/retrievals"),
                http.patch(f"/v1/accounts/{account_id}", json={"name": "renamed"}),
            ]
            for response in writes:
                assert response.status_code == 507, response.text
                assert response.headers["content-type"].startswith("application/problem+json")
                assert response.json()["code"] == "storage_full"
            # Nothing acknowledged, nothing stored.
            names = [a["name"] for a in http.get("/v1/accounts").json()["items"]]
            assert names == ["before"]
            assert http.get(f"/v1/accounts/{account_id}/outbox").json()["items"] == []
            assert http.get(f"/v1/accounts/{account_id}/retrievals").json()["items"] == []
            assert http.get("/health").status_code == 200
            ready = http.get("/ready")
            assert ready.status_code == 503 and ready.json()["code"] == "storage_full"

            disk.free()
            assert http.get("/ready").status_code == 200  # the probe's write fits again
            assert http.post("/v1/accounts", json=account("after")).status_code == 201
            sent = http.post(f"/v1/accounts/{account_id}/outbox", json=MAIL)
            assert sent.status_code == 202, sent.text
    finally:
        out = stop(proc)
    assert "Traceback" not in out, out


def test_the_service_starts_on_a_full_disk_and_recovers(disk: Disk) -> None:
    # First start: a generated key (stored in the database, loaded at every start).
    proc, base = start({"MAILROOM_DATABASE": disk.database})
    try:
        match = wait_for(lambda: re.search(r"shown only this once\): (mr_\S+)", output(proc)))
        key = match.group(1)
        headers = {"Authorization": f"Bearer {key}"}
        created = httpx.post(base + "/v1/accounts", json=account("kept"), headers=headers)
        assert created.status_code == 201, created.text
    finally:
        stop(proc)  # a clean stop removes the WAL index: the next open needs space

    disk.fill()
    proc, base = start({"MAILROOM_DATABASE": disk.database})
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            assert http.get("/health").status_code == 200
            ready = http.get("/ready")
            assert ready.status_code == 503, ready.text
            assert ready.json()["code"] == "storage_full"
            waiting = http.get("/v1/accounts")
            assert waiting.status_code == 503, waiting.text
            assert waiting.json()["code"] == "unavailable"
            assert proc.poll() is None  # still running: no crash loop

            disk.free()
            wait_for(lambda: http.get("/ready").status_code == 200)
            listed = wait_for(lambda: http.get("/v1/accounts"))
            assert listed.status_code == 200, listed.text
            assert [a["name"] for a in listed.json()["items"]] == ["kept"]
            account_id = listed.json()["items"][0]["id"]
            sent = http.post(f"/v1/accounts/{account_id}/outbox", json=MAIL)
            assert sent.status_code == 202, sent.text
    except BaseException:
        kill(proc)
        raise
    out = stop(proc)
    assert "the disk is full" in out and "recovery finished" in out, out
    assert "shown only this once" not in out and key not in out  # loaded, not generated again


def test_a_key_file_that_cannot_be_written_leaves_nothing_behind(disk: Disk) -> None:
    """First start on a full disk: no empty or torn key file that would stop every later
    start; once space is back the key is created whole."""
    settings = Settings(database=disk.database)
    disk.fill()
    with pytest.raises(ConfigError, match="cannot create the key file"):
        load_or_create_keys(settings)
    assert not settings.key_file.exists()
    assert [p.name for p in settings.key_file.parent.iterdir()] == []
    disk.free()
    [key] = load_or_create_keys(settings)
    assert load_or_create_keys(settings) == (key,)
    assert settings.key_file.stat().st_mode & 0o777 == 0o600
