"""Smoke checks against a running Mailroom container (used by scripts/container_test.sh).

Talks to the server over loopback with the standard library only, and inspects the
server process through /proc on the host (buildah's chroot isolation shares the
host's process and network namespaces).

    smoke.py serve  --port P --api-key K --data DIR --uid U --runner-pid PID --pid-file F
    smoke.py image  --inspect JSON --uid U
    smoke.py rootfs --root DIR --pyproject FILE --uid U
    smoke.py db     --data DIR
    smoke.py postgres --port P --api-key K --data DIR --uid U --runner-pid PID --pid-file F
                      --out JSON   (MAILROOM_DATABASE=postgresql://...; writes what it created)

Every check prints one "ok: ..." line; the first failure prints "FAIL: ..." and
exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import stat
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn


def ok(msg: str) -> None:
    print(f"  ok: {msg}", flush=True)


def fail(msg: str) -> NoReturn:
    print(f"  FAIL: {msg}", flush=True)
    sys.exit(1)


def check(cond: object, msg: str, detail: str = "") -> None:
    if cond:
        ok(msg)
    else:
        fail(f"{msg}{': ' + detail if detail else ''}")


# --------------------------------------------------------------------------- http
def request(
    port: int, method: str, path: str, body: Any = None, key: str | None = None
) -> tuple[int, bytes, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (http://127.0.0.1 only)
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def listener_pid(port: int) -> int | None:
    """PID of the process holding the TCP listening socket on 0.0.0.0/:: port."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


def proc_ids(pid: int) -> tuple[list[int], list[int]]:
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M)
    assert uids and gids
    return [int(x) for x in uids.group(1).split()], [int(x) for x in gids.group(1).split()]


ACCOUNT = {
    "name": "container-smoke",
    "email": "smoke@example.com",
    "incoming": {
        "protocol": "pop3",
        "host": "127.0.0.1",
        "security": "none",
        "username": "smoke",
        "password": "smoke-password",
    },
    "outgoing": {"host": "127.0.0.1", "security": "none"},
}


def wait_up(a: argparse.Namespace) -> dict[str, Any]:
    """/health then /ready answer 200 within --timeout; returns the /ready body."""
    deadline = time.monotonic() + a.timeout
    status = None
    while time.monotonic() < deadline:
        if not alive(a.runner_pid):
            fail("the container's command exited before /health answered")
        try:
            status, body, _ = request(a.port, "GET", "/health")
            if status == 200:
                break
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.25)
    check(status == 200, f"GET /health -> 200 within {a.timeout:.0f}s", f"last status {status}")
    try:
        json.loads(body)
        ok("/health body is JSON")
    except ValueError:
        fail(f"/health body is not JSON: {body[:200]!r}")

    status = None
    while time.monotonic() < deadline:
        status, body, _ = request(a.port, "GET", "/ready")
        if status == 200:
            break
        time.sleep(0.25)
    check(status == 200, "GET /ready -> 200", f"status {status}: {body[:200]!r}")
    ready = json.loads(body)
    return ready if isinstance(ready, dict) else {}


def create_account(a: argparse.Namespace) -> dict[str, Any]:
    status, body, _ = request(a.port, "POST", "/v1/accounts", ACCOUNT)
    check(status == 401, "POST /v1/accounts without a key -> 401", f"status {status}")
    status, body, _ = request(a.port, "POST", "/v1/accounts", ACCOUNT, key=a.api_key)
    check(
        status == 201, "POST /v1/accounts with the key -> 201", f"status {status}: {body[:300]!r}"
    )
    created = json.loads(body)
    check(isinstance(created, dict) and created.get("id"), "created account has an id")
    check("smoke-password" not in body.decode(), "the password is not echoed back")
    return dict(created)


def check_server_process(a: argparse.Namespace) -> None:
    """Find the process listening on --port, record its pid, check its uid/gid."""
    pid = listener_pid(a.port)
    check(pid is not None, f"found the process listening on port {a.port} (pid {pid})")
    assert pid is not None
    Path(a.pid_file).write_text(f"{pid}\n")
    uids, gids = proc_ids(pid)
    check(
        set(uids) == {a.uid} and set(gids) == {a.uid},
        f"server process runs as uid/gid {a.uid} (real, effective, saved, fs)",
        f"Uid {uids} Gid {gids}",
    )


def cmd_serve(a: argparse.Namespace) -> None:
    wait_up(a)
    create_account(a)
    check_server_process(a)

    data = Path(a.data)
    db = data / "mailroom.db"
    check(db.is_file(), "the database was created in the /data volume")
    bad = [f"{p.name} (uid {p.stat().st_uid})" for p in data.iterdir() if p.stat().st_uid != a.uid]
    check(not bad, f"every file in /data belongs to uid {a.uid}", ", ".join(bad))
    loose = [
        f"{p.name} ({stat.filemode(p.stat().st_mode)})"
        for p in data.iterdir()
        if p.is_file() and "key" in p.name and p.stat().st_mode & 0o077
    ]
    if loose:  # /data itself is 0700, so this is advice rather than a failure
        print(f"  warn: key file readable by group/others: {', '.join(loose)}", flush=True)
    else:
        ok("no key file in /data is readable by group/others")


# --------------------------------------------------------------------------- postgres
def cmd_postgres(a: argparse.Namespace) -> None:
    """The same image run with MAILROOM_DATABASE=postgresql://...: /ready is a database
    round trip, an account is written, read back and listed, and nothing lands in /data."""
    ready = wait_up(a)
    version = ready.get("schema_version")
    check(
        ready.get("status") == "ready"
        and isinstance(version, int)
        and version == ready.get("expected_schema_version"),
        f"/ready: the PostgreSQL schema is migrated (version {version})",
        json.dumps(ready),
    )
    created = create_account(a)
    account_id = str(created["id"])
    path = f"/v1/accounts/{account_id}"
    status, body, _ = request(a.port, "GET", path, key=a.api_key)
    check(status == 200, f"GET {path} -> 200", f"status {status}: {body[:300]!r}")
    got = json.loads(body)
    check(
        got == created,
        "the account reads back exactly as created",
        f"created {created}, read {got}",
    )
    check(
        got["incoming"].get("password_set") is True,
        "incoming.password_set is true (stored, not shown)",
    )
    status, body, _ = request(a.port, "GET", "/v1/accounts?limit=10", key=a.api_key)
    check(status == 200, "GET /v1/accounts -> 200", f"status {status}: {body[:300]!r}")
    page = json.loads(body)
    ids = [item.get("id") for item in page.get("items") or []]
    check(
        ids == [account_id] and page.get("next_cursor") is None,
        "the list holds exactly the new account",
        f"ids {ids}, next_cursor {page.get('next_cursor')!r}",
    )
    status, _, _ = request(a.port, "GET", "/v1/accounts", key="not-" + a.api_key)
    check(status == 401, "GET /v1/accounts with a wrong key -> 401", f"status {status}")
    check_server_process(a)
    left = sorted(p.name for p in Path(a.data).iterdir())
    check(
        not left,
        "nothing was written to /data (no SQLite file, no generated key)",
        ", ".join(left),
    )
    Path(a.out).write_text(
        json.dumps({"account_id": account_id, "schema_version": version, "account": ACCOUNT})
    )


# --------------------------------------------------------------------------- image
def cmd_image(a: argparse.Namespace) -> None:
    info = json.loads(Path(a.inspect).read_text())
    cfg = (info.get("Docker") or {}).get("config") or {}
    env = dict(e.split("=", 1) for e in cfg.get("Env") or [])
    labels = cfg.get("Labels") or {}
    user = cfg.get("User") or ""
    check(
        user.split(":")[0] == str(a.uid) and user.split(":")[0] != "0",
        f"USER is numeric non-root ({user})",
    )
    check("8080/tcp" in (cfg.get("ExposedPorts") or {}), "EXPOSE 8080")
    check("/data" in (cfg.get("Volumes") or {}), "VOLUME /data")
    check(env.get("MAILROOM_HOST") == "0.0.0.0", "ENV MAILROOM_HOST=0.0.0.0")
    check(env.get("MAILROOM_DATABASE") == "/data/mailroom.db", "ENV MAILROOM_DATABASE=/data/...")
    check(cfg.get("StopSignal") == "SIGTERM", "STOPSIGNAL SIGTERM")
    test = (cfg.get("Healthcheck") or {}).get("Test") or []
    check(test[:1] == ["CMD"] and "/health" in " ".join(test), "HEALTHCHECK probes /health")
    missing = [
        k
        for k in ("title", "description", "version", "revision", "created", "licenses")
        if not labels.get(f"org.opencontainers.image.{k}")
    ]
    check(not missing, "OCI labels org.opencontainers.image.*", f"missing {missing}")
    check(cfg.get("Cmd") or cfg.get("Entrypoint"), f"command {cfg.get('Cmd')}")


# --------------------------------------------------------------------------- rootfs
def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def dist_name(req: str) -> str:
    return norm(re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0])


def cmd_rootfs(a: argparse.Namespace) -> None:
    root = Path(a.root)
    venv = root / "opt/venv"
    check((venv / "bin/python").exists(), "/opt/venv/bin/python exists")
    site = sorted(venv.glob("lib/python3*/site-packages"))
    check(len(site) == 1, "one site-packages in /opt/venv")
    sp = site[0]
    check((sp / "service/__init__.py").is_file(), "the service package is installed in the venv")
    metas = {norm(p.name.split("-")[0]): p for p in sp.glob("*.dist-info")}
    installed = set(metas)
    project = tomllib.loads(Path(a.pyproject).read_text())["project"]
    runtime = {dist_name(r) for r in project.get("dependencies", [])}
    missing = sorted(runtime - installed)
    check(not missing, "every runtime dependency is installed", f"missing {missing}")
    # Anything some installed distribution requires is legitimately there (litestar
    # needs httpx, say); a test extra that nothing requires must not be.
    required = set(runtime)
    for meta in metas.values():
        try:
            text = (meta / "METADATA").read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                required.add(dist_name(line.split(":", 1)[1]))
    extras = project.get("optional-dependencies", {})
    test_only = {dist_name(r) for reqs in extras.values() for r in reqs} - required
    leaked = sorted(installed & test_only)
    check(not leaked, "no test/dev-only dependency in the venv", f"found {leaked}")
    check(not installed & {"pip", "setuptools", "wheel"}, "no pip/setuptools/wheel in the venv")
    tools = [
        str(p.relative_to(root))
        for pattern in ("usr/bin/*gcc*", "usr/bin/cc", "usr/bin/c++", "usr/bin/make", "usr/bin/ld")
        for p in root.glob(pattern)
    ]
    check(not tools, "no compilers or build tools", ", ".join(tools))
    leftovers = [
        str(p.relative_to(root))
        for p in (root / "root/.cache", root / "wheels", root / "src", root / "opt/build")
        if p.exists()
    ]
    leftovers += [
        str(p.relative_to(root))
        for d in ("tmp", "mnt", "data")
        if (root / d).is_dir()
        for p in (root / d).iterdir()
    ]
    check(
        not leftovers,
        "no caches, wheels, sources or build mounts left in the image",
        ", ".join(leftovers),
    )
    st = (root / "data").stat()
    check(
        st.st_uid == a.uid and stat.S_IMODE(st.st_mode) == 0o700,
        f"/data is owned by uid {a.uid}, mode 0700",
        f"uid {st.st_uid} mode {oct(stat.S_IMODE(st.st_mode))}",
    )
    tests = list(sp.glob("tests")) + list(sp.glob("bench"))
    check(not tests, "no tests/bench packages installed", ", ".join(map(str, tests)))


def cmd_db(a: argparse.Namespace) -> None:
    db = Path(a.data) / "mailroom.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        result = con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()
    check(result == "ok", "database integrity_check after shutdown", result)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--api-key", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--uid", type=int, required=True)
    s.add_argument("--runner-pid", type=int, required=True)
    s.add_argument("--pid-file", required=True)
    s.add_argument("--timeout", type=float, default=60.0)
    i = sub.add_parser("image")
    i.add_argument("--inspect", required=True)
    i.add_argument("--uid", type=int, required=True)
    r = sub.add_parser("rootfs")
    r.add_argument("--root", required=True)
    r.add_argument("--pyproject", required=True)
    r.add_argument("--uid", type=int, required=True)
    d = sub.add_parser("db")
    d.add_argument("--data", required=True)
    p = sub.add_parser("postgres")
    for name in ("--api-key", "--data", "--pid-file", "--out"):
        p.add_argument(name, required=True)
    for name in ("--port", "--uid", "--runner-pid"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args()
    commands = {
        "serve": cmd_serve,
        "image": cmd_image,
        "rootfs": cmd_rootfs,
        "db": cmd_db,
        "postgres": cmd_postgres,
    }
    commands[a.cmd](a)


if __name__ == "__main__":
    main()
