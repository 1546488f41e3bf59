"""Benchmark: the ingest summary vs the full MIME parse, on 2,000 messages of about 10 KB.

Ingest calls ``summarize`` once per retrieved message; ``parse`` runs only when a caller
opens a message. The messages are generated in memory (a third each of plain text,
multipart/alternative text + HTML, and multipart/mixed with a base64 attachment), with
header sections of real-world size (Received chains, DKIM). Each function runs over the
whole set ``--repeat`` times; the medians of wall-clock and of process CPU time are
reported (CPU time is the steadier figure on a shared machine). The last line is
machine-readable (CPU time)::

    parse: summarize_s=... parse_s=... ratio=... summarize_us_per_msg=...

Run from the repository root: ``.venv/bin/python bench/parse.py [--messages N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import base64
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.mail.parse import parse, summarize

TARGET_BYTES = 10 * 1024
WORDS = "mail room message retrieval store summary header body parse ingest".split()


def headers(number: int, content_type: str) -> str:
    received = "".join(
        f"Received: from relay{hop}.example.net (relay{hop}.example.net [192.0.2.{hop}])\n"
        f"\tby mx.example.org with ESMTPS id {number:08x}{hop}\n"
        f"\tfor <user@example.org>; Tue, 14 Oct 2025 09:{hop:02d}:00 +0000\n"
        for hop in range(4)
    )
    return (
        received + f"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1; bh={'A' * 44};\n"
        f"\tb={'B' * 64}\n\t{'C' * 64}\n"
        f"From: =?utf-8?q?Exp=C3=A9diteur_{number}?= <sender{number}@example.com>\n"
        f"To: User <user@example.org>, other{number}@example.org\n"
        f"Cc: copy@example.org\n"
        f"Subject: =?utf-8?b?{base64.b64encode(f'Message n° {number}'.encode()).decode()}?=\n"
        f"Date: Tue, 14 Oct 2025 09:30:00 +0200\n"
        f"Message-ID: <bench-{number}@example.com>\n"
        f"MIME-Version: 1.0\n"
        f"Content-Type: {content_type}\n"
    )


def text_of(size: int, rng: random.Random) -> str:
    lines = []
    total = 0
    while total < size:
        line = " ".join(rng.choice(WORDS) for _ in range(10))
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines) + "\n"


def message(number: int, rng: random.Random) -> bytes:
    kind = number % 3
    if kind == 0:
        head = headers(number, "text/plain; charset=utf-8")
        body = text_of(TARGET_BYTES - len(head), rng)
    elif kind == 1:
        head = headers(number, 'multipart/alternative; boundary="alt"')
        half = (TARGET_BYTES - len(head)) // 2 - 100
        body = (
            "--alt\nContent-Type: text/plain; charset=utf-8\n\n"
            + text_of(half, rng)
            + "--alt\nContent-Type: text/html; charset=utf-8\n\n<html><body><p>"
            + text_of(half - 40, rng)
            + "</p></body></html>\n--alt--\n"
        )
    else:
        head = headers(number, 'multipart/mixed; boundary="mix"')
        blob = base64.encodebytes(rng.randbytes((TARGET_BYTES - len(head)) // 2)).decode()
        body = (
            "--mix\nContent-Type: text/plain; charset=utf-8\n\n"
            + text_of(TARGET_BYTES // 4, rng)
            + '--mix\nContent-Type: application/octet-stream; name="data.bin"\n'
            'Content-Disposition: attachment; filename="data.bin"\n'
            "Content-Transfer-Encoding: base64\n\n" + blob + "--mix--\n"
        )
    return (head + "\n" + body).replace("\n", "\r\n").encode()


def run(
    function: Callable[[bytes], object], messages: list[bytes], repeat: int
) -> tuple[float, float]:
    """Median wall-clock and CPU seconds for one pass over ``messages``."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        for raw in messages:
            function(raw)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--messages", type=int, default=2000)
    arguments.add_argument("--repeat", type=int, default=5)
    options = arguments.parse_args()

    rng = random.Random(4)  # the same messages on every run
    messages = [message(number, rng) for number in range(options.messages)]
    mean_kb = sum(map(len, messages)) / len(messages) / 1024
    print(f"{len(messages)} messages, {mean_kb:.1f} KB on average")

    summary_wall, summary_s = run(summarize, messages, options.repeat)
    parse_wall, parse_s = run(parse, messages, options.repeat)
    per_message_us = summary_s / len(messages) * 1e6
    for name, wall, cpu in (("summarize", summary_wall, summary_s), ("parse", parse_wall, parse_s)):
        print(
            f"{name:9}  wall {wall:.3f} s  cpu {cpu:.3f} s "
            f"({cpu / len(messages) * 1e6:.1f} us cpu per message)"
        )
    print(f"summarize costs 1/{parse_s / summary_s:.1f} of the full parse (cpu)")
    print(
        f"parse: summarize_s={summary_s:.4f} parse_s={parse_s:.4f} "
        f"ratio={parse_s / summary_s:.1f} summarize_us_per_msg={per_message_us:.1f}"
    )


if __name__ == "__main__":
    main()
