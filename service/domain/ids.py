"""Opaque, time-ordered identifiers and pagination cursors.

Ids are a prefix plus a ULID-like body (48-bit milliseconds + 80 random bits, Crockford
base32), so ordering by id is ordering by creation time: lists page by id with no extra
index, and "newest first" is ``ORDER BY id DESC``.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_last_ms = 0
_last_random = 0
_lock = threading.Lock()
# Unique, not secret: ids, request ids and Message-IDs need bits no other process draws,
# not bits nobody can guess. A generator seeded from the OS (again in a forked child) gives
# them without a system call per id: ``os.urandom`` lets go of the GIL, and on a busy
# event loop each call could wait up to a switch interval (5 ms) to get it back.
_bits = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _bits.seed(os.urandom(32)))


def random_bits(count: int) -> int:
    """``count`` random bits, unique across processes (seeded from the OS), not secret."""
    return _bits.getrandbits(count)


def random_hex(octets: int) -> str:
    """``2 * octets`` lower-case hex digits of :func:`random_bits`."""
    return f"{_bits.getrandbits(octets * 8):0{octets * 2}x}"


def new_id(prefix: str) -> str:
    """A new id such as ``acc_01hz3…``; monotonic within this process (from any thread:
    the SQLite writer's thread makes webhook delivery ids)."""
    global _last_ms, _last_random
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= _last_ms:
            # Same millisecond (or the clock stepped back): keep order by incrementing.
            now_ms = _last_ms
            random_part = (_last_random + 1) & ((1 << 80) - 1)
        else:
            random_part = random_bits(80)
        _last_ms, _last_random = now_ms, random_part
    value = (now_ms << 80) | random_part
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


class InvalidCursor(ValueError):
    """A cursor that this service did not issue."""


# A cursor is a version tag and the id to continue after. Every string of this form is a
# valid position (a page after it, possibly empty), so the OpenAPI pattern and the server
# accept exactly the same cursors.
CURSOR_VERSION = "c1."
MAX_CURSOR_KEY = 64  # ids are far shorter; as long as an id path parameter may be
CURSOR_PATTERN = rf"^c1\.[a-z0-9_]{{1,{MAX_CURSOR_KEY}}}$(?!\n)"
_CURSOR_RE = re.compile(CURSOR_PATTERN)


def encode_cursor(last_id: str) -> str:
    """The cursor of the page after ``last_id``."""
    return CURSOR_VERSION + last_id


def decode_cursor(cursor: str) -> str:
    """The id a cursor continues after; ``InvalidCursor`` for one not of the documented form."""
    if not _CURSOR_RE.match(cursor):
        raise InvalidCursor("cursor is not one this service issued")
    return cursor[len(CURSOR_VERSION) :]
