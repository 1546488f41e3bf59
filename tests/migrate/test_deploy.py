"""``deploy/compose.yaml``: PostgreSQL and two replicas of the repository's image.

No container engine runs here, so the file is checked for what it promises (two replicas
of one build, one database, shared keys, graceful stops) and its replica environment and
healthcheck are run for real: the service starts on PostgreSQL with exactly the variables
the file gives it (values filled in), and the healthcheck command passes against it.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import yaml

from service.config import database_kind
from tests.process import ROOT, start, stop

COMPOSE = ROOT / "deploy" / "compose.yaml"
REPLICAS = ("mailroom-1", "mailroom-2")
VARIABLE = re.compile(r"\$\{(?P<name>[A-Z_]+)(?::\?[^}]*)?\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def substitute(value: str, values: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: values[m.group("name")], value)


def test_two_replicas_of_the_repository_image_share_one_database_and_the_keys() -> None:
    services = compose()["services"]
    replicas = [services[name] for name in REPLICAS]
    for replica in replicas:
        build = replica["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
            ROOT / "Dockerfile"
        )
        env = replica["environment"]
        assert database_kind(env["MAILROOM_DATABASE"]) == "postgres"
        assert "@postgres:5432/" in env["MAILROOM_DATABASE"]
        assert env["MAILROOM_SECRET_KEY"].startswith("${MAILROOM_SECRET_KEY:?")
        assert env["MAILROOM_API_KEYS"].startswith("${MAILROOM_API_KEYS:?")
        assert "/ready" in " ".join(replica["healthcheck"]["test"])
        assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert replica["stop_grace_period"] == "30s"
    assert replicas[0]["environment"] == replicas[1]["environment"]
    assert replicas[0]["ports"] != replicas[1]["ports"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_a_replica_with_the_compose_environment_serves_and_passes_its_healthcheck(
    pg_database: str,
) -> None:
    target = urlsplit(pg_database)
    replica = compose()["services"]["mailroom-1"]
    values = {
        "POSTGRES_PASSWORD": "unused-with-trust-auth",
        "MAILROOM_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "MAILROOM_API_KEYS": "compose-test-key-0123456789",
    }
    env = {name: substitute(str(value), values) for name, value in replica["environment"].items()}
    # The compose network's host name and user become this machine's test server.
    env["MAILROOM_DATABASE"] = env["MAILROOM_DATABASE"].replace(
        "mailroom:unused-with-trust-auth@postgres:5432/mailroom",
        f"{target.username}@{target.hostname}:{target.port}{target.path}",
    )
    assert env["MAILROOM_DATABASE"] == pg_database
    proc, base = start(env)
    try:
        command = list(replica["healthcheck"]["test"][1:])
        assert command[0] == "/opt/venv/bin/python"  # the image's interpreter
        command[0] = sys.executable
        command[-1] = command[-1].replace("127.0.0.1:8080", base.removeprefix("http://"))
        check = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        assert check.returncode == 0, check.stderr
    finally:
        stop(proc)
    # And it fails where nothing is ready (the check is not a formality).
    check = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode != 0
