"""Carry the host's pip configuration into a container build.

The build container has no pip configuration of its own, so a build on a machine
that reaches its package index through local configuration (a mirror, a private
index, a CA bundle, a local wheel directory ...) would fail. This helper reads the
host's effective configuration with ``python3 -m pip config list`` (every config
file plus the ``PIP_*`` environment variables), writes it to ONE pip.conf, and
rewrites every local path it mentions to a path under a mount prefix (``/mnt`` by
default) that the build bind-mounts read-only.

Everything is mounted under a directory that already exists in every Debian-based
image, with the mount points pre-created on the host side, so the build leaves no
mount-point stubs behind in the image (buildah keeps the stubs of ``-v`` targets
it had to create).

Output (stdout), one mount per line: ``SOURCE<TAB>TARGET<TAB>ro``; the first
line mounts the output directory itself on the prefix. The generated pip.conf may
hold credentials: it is written with mode 0600 and its values are never printed;
stderr gets only the setting names and the mounted local paths.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Settings that describe the host's install locations or logging, not the index.
SKIP = {
    "cache-dir",
    "log",
    "log-file",
    "python",
    "target",
    "prefix",
    "root",
    "src",
    "user",
    "require-virtualenv",
    "config-file",
}


def host_config() -> dict[str, dict[str, str]]:
    """Effective host configuration as {section: {name: value}}; env vars last."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    files: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or "." not in key:
            continue
        section, _, name = key.rpartition(".")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if not isinstance(value, str) or name in SKIP:
            continue
        if section == ":env:":
            env[name] = value
        else:
            files.setdefault(section, {})[name] = value
    # PIP_* variables override every file section, as they do in pip itself.
    for name, value in env.items():
        for options in files.values():
            options.pop(name, None)
        files.setdefault("global", {})[name] = value
    return files


class Mounts:
    def __init__(self, outdir: Path, prefix: str) -> None:
        self.outdir = outdir
        self.prefix = prefix.rstrip("/")
        self.by_source: dict[str, str] = {}
        self.lines: list[str] = []

    def add(self, source: Path) -> str:
        key = str(source)
        if key not in self.by_source:
            name = f"m{len(self.by_source)}"
            stub = self.outdir / name
            if source.is_dir():
                stub.mkdir()
            else:
                stub.touch()
            target = f"{self.prefix}/{name}"
            self.by_source[key] = target
            self.lines.append(f"{source}\t{target}\tro")
        return self.by_source[key]

    def rewrite_token(self, token: str) -> str:
        """Map a local path or file: URL to its in-build location."""
        if token.startswith("file:"):
            parts = urlsplit(token)
            path = Path(unquote(parts.path))
            if not path.is_absolute() or not path.exists():
                return token
            # Index roots link to their files relatively ("../../files/x.whl"),
            # so mount the directory that contains the referenced path.
            base = path.parent
            target = self.add(base)
            rel = path.relative_to(base).as_posix()
            return f"file://{target}/{rel}" + (f"#{parts.fragment}" if parts.fragment else "")
        if token.startswith("/"):
            path = Path(token)
            if path.exists():
                return self.add(path)
        return token

    def rewrite(self, value: str) -> str:
        # Multi-valued settings (extra-index-url, find-links ...) are whitespace-separated.
        return " ".join(self.rewrite_token(t) for t in value.split())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outdir", required=True, type=Path, help="empty directory to fill")
    ap.add_argument("--prefix", default="/mnt", help="mount point inside the build")
    args = ap.parse_args()

    outdir: Path = args.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    outdir.chmod(0o755)
    mounts = Mounts(outdir, args.prefix)

    config = host_config()
    parser = configparser.RawConfigParser()
    for section, options in config.items():
        parser.add_section(section)
        for name, value in options.items():
            parser.set(section, name, mounts.rewrite(value))
    conf = outdir / "pip.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        parser.write(fh)

    names = sorted({f"{s}.{n}" for s, o in config.items() for n in o})
    print(f"pip config for the build: {', '.join(names) or '(none)'}", file=sys.stderr)
    for line in mounts.lines:
        source, target, mode = line.split("\t")
        print(f"  mount {source} -> {target} ({mode})", file=sys.stderr)
    print(f"{outdir}\t{mounts.prefix}\tro")
    for line in mounts.lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
