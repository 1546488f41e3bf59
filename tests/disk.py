"""A disk that really fills: a small tmpfs mounted for one test, and a file that takes
every free byte of it. Mounting needs root (CI runs as root); elsewhere the tests that use
it are skipped (``pytestmark`` below, imported by those modules).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None,
    reason="mounting a small tmpfs (a disk that can really fill) needs root",
)

DISK_SIZE = "24m"
FILL_CHUNK = 4096  # tmpfs allocates pages of this size


class Disk:
    """A mounted tmpfs and a filler file that takes every free byte."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    @property
    def database(self) -> str:
        return str(self.root / "data" / "mailroom.db")

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * FILL_CHUNK)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
        assert shutil.disk_usage(self.root).free < FILL_CHUNK

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    root = tmp_path / "disk"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0755", "tmpfs", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield Disk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
