"""The API docs work offline: headless Chromium loads ``/docs/`` from the real process with
every host but loopback unreachable, and the rendered page lists every operation of the
served OpenAPI document. The Swagger UI files are the vendored ones, unchanged."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.docs import SWAGGER_UI_DIR, SWAGGER_UI_VERSION
from tests.process import free_port, start, stop

# Virtual time the page may use to load and render (Chromium fast-forwards idle time, so
# this bounds the wait; it is not a timing assertion). The process timeout is the backstop.
RENDER_BUDGET_MS = 20_000
CHROMIUM_TIMEOUT_S = 180
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        # An error, never a skip: scripts/test.sh installs it (Debian package `chromium`).
        pytest.fail("chromium is not installed (Debian package `chromium`)")
    return found


@pytest.fixture
def service(tmp_path: Path) -> Iterator[str]:
    proc, base = start(
        {
            "MAILROOM_DATABASE": str(tmp_path / "mailroom.db"),
            "MAILROOM_API_KEYS": "docs-key-0123456789abcdef",
        }
    )
    try:
        yield base
    finally:
        stop(proc)


def offline_dom(url: str, profile: Path) -> str:
    """The DOM of ``url`` after it rendered, with every non-loopback host unreachable."""
    closed = free_port()  # a proxy that refuses: requests to literal IPs go nowhere either
    command = [
        chromium(),
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={profile}",
        # No name resolves but loopback's; anything else would go through a closed proxy
        # (Chromium always connects to loopback directly).
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--proxy-server=http://127.0.0.1:{closed}",
        f"--virtual-time-budget={RENDER_BUDGET_MS}",
        "--dump-dom",
        url,
    ]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_docs_render_every_operation_offline(service: str, tmp_path: Path) -> None:
    spec = httpx.get(f"{service}/docs/openapi.json").json()
    expected = {
        f"operations-{operation['tags'][0]}-{operation['operationId']}"
        for item in spec["paths"].values()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }
    assert len(expected) > 10
    # The OpenAPI 3.1 `webhooks` (the event payloads) render in a section of their own.
    webhooks = {
        f"operations-webhooks-{operation['operationId']}"
        for item in spec.get("webhooks", {}).values()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }
    assert webhooks
    expected |= webhooks

    page = httpx.get(f"{service}/docs/")
    assert page.status_code == 200
    # Every script, stylesheet and icon comes from this service.
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
    for asset in assets:
        served = httpx.get(service + asset)
        assert served.status_code == 200, asset
        assert served.content == (SWAGGER_UI_DIR / asset.rsplit("/", 1)[1]).read_bytes()

    dom = offline_dom(f"{service}/docs/", tmp_path / "chromium")
    rendered = set(re.findall(r'id="(operations-[^"]+)"', dom)) - {
        f"operations-tag-{tag}" for tag in {op for op in re.findall(r"operations-tag-(\w+)", dom)}
    }
    assert rendered == expected
    assert "Mailroom" in dom


def test_vendored_swagger_ui_is_unchanged() -> None:
    sums = (SWAGGER_UI_DIR / "SHA256SUMS").read_text().splitlines()
    assert sums
    for line in sums:
        digest, name = line.split()
        assert hashlib.sha256((SWAGGER_UI_DIR / name).read_bytes()).hexdigest() == digest, name
    assert re.fullmatch(r"\d+\.\d+\.\d+", SWAGGER_UI_VERSION)
    assert "Apache License" in (SWAGGER_UI_DIR / "LICENSE").read_text()
