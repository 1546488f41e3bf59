"""``scripts/venv.sh`` (run by ``scripts/run.sh`` on every start) installs only when
``pyproject.toml``, the extra or the installed version changed, so a restart needs no
package index. Run on a copy of the project whose ``.venv/bin/python`` records pip calls."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.process import ROOT, free_port

FAKE_PYTHON = """#!/usr/bin/env bash
# -c: a real interpreter (without site-packages) that sees only the fake installed
# distribution; anything else (pip) is
# recorded and "installs" by writing that distribution.
if [ "$1" = "-c" ]; then PYTHONPATH="$FAKE_SITE" exec "$REAL_PYTHON" -S "$@"; fi
echo "$*" >> "$CALLS"
case "$*" in *"install -q -e"*)
    mkdir -p "$FAKE_SITE/mailroom-$FAKE_VERSION.dist-info"
    printf 'Metadata-Version: 2.1\\nName: mailroom\\nVersion: %s\\n' "$FAKE_VERSION" \\
        > "$FAKE_SITE/mailroom-$FAKE_VERSION.dist-info/METADATA";;
esac
"""


def make_project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "venv.sh", project / "scripts" / "venv.sh")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    python = project / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    env = {
        **os.environ,
        "REAL_PYTHON": sys.executable,
        "FAKE_SITE": str(tmp_path / "site"),
        "FAKE_VERSION": "0.1.0",
        "CALLS": str(tmp_path / "calls.log"),
        # Any index request would fail: nothing listens there.
        "PIP_INDEX_URL": f"http://127.0.0.1:{free_port()}/simple",
    }
    return project, env


def run(project: Path, env: dict[str, str], *args: str) -> list[str]:
    """Run venv.sh; return the pip commands it ran."""
    calls = Path(env["CALLS"])
    calls.unlink(missing_ok=True)
    result = subprocess.run(
        ["bash", "scripts/venv.sh", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return calls.read_text().splitlines() if calls.exists() else []


def test_installs_only_when_something_changed(tmp_path: Path) -> None:
    project, env = make_project(tmp_path)
    first = run(project, env, "test")
    assert any("install -q -e .[test]" in call for call in first), first
    # Restarts: nothing changed, nothing installed (with or without the extra).
    assert run(project, env, "test") == []
    assert run(project, env) == []
    # Another extra was never installed.
    assert any("install -q -e .[docs]" in call for call in run(project, env, "docs"))
    # pyproject.toml changed: install again.
    with (project / "pyproject.toml").open("a") as file:
        file.write("\n# a new dependency\n")
    assert any("install -q -e ." in call for call in run(project, env))
    assert run(project, env) == []
    # The installed version is not the one stamped (another one installed by hand), or
    # the project is not installed at all.
    metadata = tmp_path / "site" / "mailroom-0.1.0.dist-info" / "METADATA"
    metadata.write_text(metadata.read_text().replace("0.1.0", "0.0.9"))
    assert any("install -q -e ." in call for call in run(project, env))
    assert run(project, env) == []
    shutil.rmtree(tmp_path / "site")
    assert any("install -q -e ." in call for call in run(project, env))
    assert run(project, env) == []
    # Forced.
    env["MAILROOM_FORCE_INSTALL"] = "1"
    assert any("install -q -e ." in call for call in run(project, env))
