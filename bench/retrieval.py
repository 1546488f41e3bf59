"""Retrieval benchmark: Mailroom end to end vs fetchmail and mpop, same Dovecot mailbox.

Run from the repository root: ``.venv/bin/python bench/retrieval.py [--messages 2000]``.
Needs Debian's dovecot-pop3d, fetchmail and mpop. Each tool downloads the same mailbox
(2,000 messages of about 10 KB, kept on the server) from a fresh state, 5 times; medians
and ratios are printed. The contenders take turns (one run of each per round), so load
from other work on the machine weighs on all of them alike; the last line also gives the
worst round's ratios. An untimed mpop run first lets Dovecot index the new mailbox, a
cost no contender should carry. All three use plain POP3 on loopback (no TLS) so the comparison
is of the clients, not of the ciphers. Then the service retrieves 10,000 such messages
and its peak RSS (VmHWM) is read from /proc.

(a) Mailroom: POST a retrieval over HTTP, long-poll (``?wait=``) until it has ended, then list every
    message (pages of 500) to prove they are all queryable. A fresh database each run.
(b) fetchmail: keep, fetchall, written to one BSMTP file (no MDA process per message).
(c) mpop: keep, to an mbox, a fresh UIDL file each run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.process import start, stop
from tests.servers.dovecot import Mailbox, running_dovecot

KEY = "bench-key-0123456789abcdef"
REPEATS = 5
MESSAGE_BYTES = 10 * 1024
RSS_MESSAGES = 10_000
PAGE = 500
WAIT_S = 60  # the service's bound for GET .../retrievals/{id}?wait=


def make_message(i: int) -> bytes:
    head = (
        f"From: Sender {i} <sender{i}@example.com>\nTo: you@example.com\n"
        f"Subject: Benchmark message {i}\nMessage-ID: <{i}@bench.example>\n"
        "Date: Thu, 26 Nov 2026 07:00:00 +0000\n\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\n"
    body = line * ((MESSAGE_BYTES - len(head)) // len(line))
    return head + body


def fill(mailbox: Mailbox, count: int) -> None:
    mailbox.deliver_many(make_message(i) for i in range(count))


def run_service(dovecot_host: str, port: int, mailbox: Mailbox, expect: int) -> tuple[float, int]:
    """Seconds from trigger to all messages listable, and the process's peak RSS (KiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "MAILROOM_DATABASE": f"{tmp}/mailroom.db",
            "MAILROOM_API_KEYS": KEY,
            "MAILROOM_ALLOWED_NETWORKS": "127.0.0.0/8",
        }
        proc, base = start(env)
        try:
            client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"})
            account = client.post(
                "/v1/accounts",
                json={
                    "name": "bench",
                    "email": "bench@example.com",
                    "incoming": {
                        "host": dovecot_host,
                        "port": port,
                        "security": "none",
                        "username": mailbox.user,
                        "password": mailbox.password,
                    },
                    "outgoing": {"host": dovecot_host, "port": 25, "security": "none"},
                },
            ).json()["id"]
            started = time.perf_counter()
            retrieval = client.post(f"/v1/accounts/{account}/retrievals").json()["id"]
            while True:
                # A long poll: the answer comes when the retrieval ends (no busy polling).
                state = client.get(
                    f"/v1/accounts/{account}/retrievals/{retrieval}",
                    params={"wait": WAIT_S},
                    timeout=WAIT_S + 10,
                ).json()
                if state["status"] in ("succeeded", "failed", "cancelled"):
                    break
            if state["status"] != "succeeded":
                raise SystemExit(f"retrieval failed: {state}")
            listed, cursor = 0, None
            while True:
                params: dict[str, str | int] = {"limit": PAGE}
                if cursor:
                    params["cursor"] = cursor
                page = client.get(f"/v1/accounts/{account}/messages", params=params).json()
                listed += len(page["items"])
                cursor = page["next_cursor"]
                if not cursor:
                    break
            elapsed = time.perf_counter() - started
            if listed != expect:
                raise SystemExit(f"listed {listed} messages, expected {expect}")
            peak = _peak_rss_kib(proc.pid)
        finally:
            stop(proc)
    return elapsed, peak


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_fetchmail(host: str, port: int, mailbox: Mailbox, expect: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        rc = Path(tmp) / "fetchmailrc"
        out = Path(tmp) / "out.bsmtp"
        rc.write_text(
            f"set no bouncemail\npoll {host} protocol pop3 port {port} timeout 60\n"
            f'  user "{mailbox.user}" password "{mailbox.password}" is "bench" here\n'
            f"  keep fetchall sslproto '' bsmtp {out}\n"
        )
        rc.chmod(0o600)
        env = {**os.environ, "HOME": tmp, "FETCHMAILHOME": tmp}
        started = time.perf_counter()
        result = subprocess.run(
            ["fetchmail", "-f", str(rc), "--nodetach", "--silent", "-i", f"{tmp}/ids"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        elapsed = time.perf_counter() - started
        if result.returncode not in (0, 1):
            raise SystemExit(f"fetchmail failed ({result.returncode}): {result.stderr}")
        count = out.read_bytes().count(b"\nDATA\r\n") + out.read_bytes().startswith(b"DATA")
        if count != expect:
            raise SystemExit(f"fetchmail wrote {count} messages, expected {expect}")
    return elapsed


def run_mpop(host: str, port: int, mailbox: Mailbox, expect: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mpoprc"
        mbox = Path(tmp) / "out.mbox"
        mbox.touch()
        conf.write_text(
            f"account bench\nhost {host}\nport {port}\ntls off\nauth user\n"
            f"user {mailbox.user}\npassword {mailbox.password}\nkeep on\n"
            f"only_new off\nuidls_file {tmp}/uidls\ndelivery mbox {mbox}\n"
            "account default : bench\n"
        )
        conf.chmod(0o600)
        started = time.perf_counter()
        result = subprocess.run(
            ["mpop", "-C", str(conf), "-q", "bench"], capture_output=True, text=True, check=False
        )
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"mpop failed ({result.returncode}): {result.stderr}")
        count = mbox.read_bytes().count(b"\nFrom ") + mbox.read_bytes().startswith(b"From ")
        if count != expect:
            raise SystemExit(f"mpop wrote {count} messages, expected {expect}")
    return elapsed


def interleaved(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each contender once per round, round after round: load from other work on the
    machine then weighs on every contender alike, and each round's ratios are fair."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(fn())
        print(
            f"round {round_ + 1}: "
            + "  ".join(f"{name} {values[-1]:.3f} s" for name, values in times.items())
        )
    for name, values in times.items():
        print(
            f"{name:<10} median {statistics.median(values):.3f} s"
            f"   runs: {', '.join(f'{t:.3f}' for t in values)}"
        )
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--rss-messages", type=int, default=RSS_MESSAGES)
    args = parser.parse_args()
    for tool in ("fetchmail", "mpop"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian package {tool})")
    with running_dovecot(ssl="no") as dovecot:
        mailbox = dovecot.add_user()
        fill(mailbox, args.messages)
        host, port, n = dovecot.host, dovecot.pop3_port, args.messages
        print(f"mailbox: {n} messages of about {MESSAGE_BYTES // 1024} KB, Dovecot on loopback")
        # A first pass Dovecot pays once per mailbox (it indexes the new Maildir) is
        # nobody's: a warm-up retrieval, untimed.
        run_mpop(host, port, mailbox, n)
        times = interleaved(
            {
                "mailroom": lambda: run_service(host, port, mailbox, n)[0],
                "fetchmail": lambda: run_fetchmail(host, port, mailbox, n),
                "mpop": lambda: run_mpop(host, port, mailbox, n),
            },
            args.repeats,
        )
        service_s, fetchmail_s, mpop_s = (
            statistics.median(times[name]) for name in ("mailroom", "fetchmail", "mpop")
        )
        # The worst round: the one where the service did least well against each tool.
        worst_fetchmail = min(
            f / s for f, s in zip(times["fetchmail"], times["mailroom"], strict=True)
        )
        worst_mpop = min(m / s for m, s in zip(times["mpop"], times["mailroom"], strict=True))

        big = dovecot.add_user()
        fill(big, args.rss_messages)
        rss_s, peak_kib = run_service(host, port, big, args.rss_messages)
        peak_mb = peak_kib / 1024
        print(f"mailroom, {args.rss_messages} messages: {rss_s:.3f} s, peak RSS {peak_mb:.1f} MB")
    print(
        f"retrieval: service_s={service_s:.3f} fetchmail_s={fetchmail_s:.3f} mpop_s={mpop_s:.3f}"
        f" vs_fetchmail={fetchmail_s / service_s:.2f} vs_mpop={mpop_s / service_s:.2f}"
        f" worst_round_vs_fetchmail={worst_fetchmail:.2f} worst_round_vs_mpop={worst_mpop:.2f}"
        f" peak_rss_mb={peak_mb:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
