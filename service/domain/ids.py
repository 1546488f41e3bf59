"""Opaque, time-ordered identifiers and pagination cursors.

Ids are a prefix plus a ULID-like body (48-bit milliseconds + 80 random bits, Crockford
base32), so ordering by id is ordering by creation time: lists page by id with no extra
index, and "newest first" is ``ORDER BY id DESC``.
"""

from __future__ import annotations

import base64
import binascii
import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_last_ms = 0
_last_random = 0


def new_id(prefix: str) -> str:
    """A new id such as ``acc_01hz3…``; monotonic within this process."""
    global _last_ms, _last_random
    now_ms = time.time_ns() // 1_000_000
    if now_ms <= _last_ms:
        # Same millisecond (or the clock stepped back): keep order by incrementing.
        now_ms = _last_ms
        random_part = (_last_random + 1) & ((1 << 80) - 1)
    else:
        random_part = int.from_bytes(os.urandom(10), "big")
    _last_ms, _last_random = now_ms, random_part
    value = (now_ms << 80) | random_part
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


class InvalidCursor(ValueError):
    """A cursor that this service did not issue."""


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"c1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidCursor("cursor is not one this service issued") from None
    if not text.startswith("c1:") or not text[3:].isprintable() or len(text) > 200:
        raise InvalidCursor("cursor is not one this service issued")
    return text[3:]
