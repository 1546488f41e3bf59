"""Schemathesis with every check and every phase, against the real process.

The run a user would make from outside (`st run --checks all --phases
examples,coverage,fuzzing,stateful`) over the committed OpenAPI document: schema-valid
requests must be accepted, schema-violating ones refused, no 5xx, every response (status,
content type, headers, body) as documented, OPTIONS `Allow` headers complete, and the
stateful phase follows the document's links from created resources. Bounded by a fixed
number of examples per operation and a fixed seed, so CI runs are repeatable
(`MAILROOM_FUZZ_SEED` picks another seed, `MAILROOM_FUZZ_EXAMPLES` more examples).

The service runs with its configurable limits at their highest accepted values: the document
can only state those (e.g. `max_message_bytes` up to 2**31), not what one deployment chose.
Rules no JSON Schema can state are listed in ``schemathesis.toml`` beside this file.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process import start, stop

HERE = Path(__file__).resolve().parent
SPEC = HERE.parents[1] / "openapi" / "openapi.json"
CONFIG = HERE / "schemathesis.toml"
KEY = "fuzz-key-0123456789abcdef"
EXAMPLES_PER_OPERATION = int(os.environ.get("MAILROOM_FUZZ_EXAMPLES", "30"))
SEED = os.environ.get("MAILROOM_FUZZ_SEED", "1")
RUN_TIMEOUT_S = 900  # the run takes well under a minute here; this only stops a hang
HIGHEST_LIMIT = str(1 << 31)  # the highest value the size settings accept


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("fuzz")
    proc, base = start(
        {
            "MAILROOM_DATABASE": str(directory / "mailroom.db"),
            "MAILROOM_API_KEYS": KEY,
            "MAILROOM_ALLOWED_NETWORKS": str(ipaddress.ip_network("127.0.0.0/8")),
            "MAILROOM_MAX_MESSAGE_BYTES": HIGHEST_LIMIT,
            # Generated accounts point at hosts that do not answer: keep each try short.
            "MAILROOM_VERIFY_TIMEOUT": "2",
        }
    )
    try:
        yield base
    finally:
        stop(proc)


def test_every_check_every_phase_finds_nothing(live: str, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(CONFIG),
        "run",
        str(SPEC),
        "--url",
        live,
        "--header",
        f"Authorization: Bearer {KEY}",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(EXAMPLES_PER_OPERATION),
        "--seed",
        SEED,
        "--workers",
        "1",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    run = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={**os.environ, "NO_COLOR": "1"},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    # A run that tested nothing would also exit 0: every phase must have run.
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in output, output
