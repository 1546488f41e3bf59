"""Conversation threads: which thread a message belongs to, from its own headers.

A thread is named after its root, the first message of the conversation: the first id of
``References`` (RFC 5322 3.6.4: a reply keeps the root first), else ``In-Reply-To``, else
the message's own Message-ID. The name depends only on the root, so every message of a
conversation gets it whatever order the messages arrive in, and a received message and
a sent one compute it the same way. A message with no Message-ID and no references is a
thread of its own (named after its store id).

The stores refine this with what they hold: a message whose root the account has stored
or sent joins that root's thread (:func:`root_to_look_up`), and when a message is stored
in a thread other than the one named after itself, the messages already waiting in the
one named after it (they took it as their root) move to its thread. So a reply that
names only its parent (In-Reply-To, no References) joins the parent's thread whichever
of the two arrives first.

``thread_id = "thr_" + the first THREAD_DIGEST_HEX hex digits of SHA-256(root)``. The
stores compute the same value in SQL for rows written before threads existed (migration
13: SQLite through :func:`thread_id_of` registered as ``mailroom_thread_id``, PostgreSQL
with its own ``sha256``), so change neither without a migration.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

THREAD_PREFIX: Final = "thr_"
THREAD_DIGEST_HEX: Final = 24
# "$(?!\n)": Python's "$" would also accept a trailing newline (as the cursor's pattern).
THREAD_ID_PATTERN: Final = rf"^{THREAD_PREFIX}[0-9a-f]{{{THREAD_DIGEST_HEX}}}$(?!\n)"
THREAD_ID_RE: Final = re.compile(THREAD_ID_PATTERN)
# The SQL name of thread_id_of on SQLite connections (the migration's backfill uses it).
SQLITE_FUNCTION: Final = "mailroom_thread_id"


def thread_id_of(root: str) -> str:
    """The thread id of the conversation whose root message has Message-ID ``root``."""
    digest = hashlib.sha256(root.encode("utf-8", "replace")).hexdigest()
    return THREAD_PREFIX + digest[:THREAD_DIGEST_HEX]


def thread_root(
    message_id: str | None, in_reply_to: str | None, references: Sequence[str]
) -> str | None:
    """The root's Message-ID as this message's headers name it (None: it names none)."""
    if references:
        return references[0]
    return in_reply_to or message_id


def thread_id_for(
    message_id: str | None, in_reply_to: str | None, references: Sequence[str], own_id: str
) -> str:
    """The thread id from a message's own headers; ``own_id`` (its store id) names the
    thread of a message that has no Message-ID and no references."""
    return thread_id_of(thread_root(message_id, in_reply_to, references) or own_id)


def root_to_look_up(
    message_id: str | None, in_reply_to: str | None, references: Sequence[str]
) -> str | None:
    """The root whose stored thread a message joins when the account has it (stored or
    sent): its headers name a root other than itself. The root's thread is the one named
    after it, unless the root itself joined another (its own headers reach further back,
    e.g. a message that named only its parent): following it keeps chains of replies
    that carry In-Reply-To alone, and replies to them, together."""
    root = thread_root(message_id, in_reply_to, references)
    return root if root is not None and root != message_id else None


# Ids a reply or a forward keeps in its References (RFC 5322 3.6.4 allows trimming).
MAX_ANSWER_REFERENCES: Final = 20


def trimmed(ids: Sequence[str], limit: int) -> list[str]:
    """At most ``limit`` of ``ids``: the first (the thread's root, which names the thread
    here and in mail clients) and the newest."""
    if len(ids) <= limit:
        return list(ids)
    return [ids[0], *ids[len(ids) - limit + 1 :]] if limit > 1 else list(ids[:limit])


def answer_references(
    references: Sequence[str], in_reply_to: str | None, message_id: str | None
) -> list[str]:
    """The References of a reply to, or a forward of, a message with these (valid)
    threading headers: its References (else its In-Reply-To), then its own Message-ID,
    at most :data:`MAX_ANSWER_REFERENCES` with the root kept."""
    chain = list(references) or ([in_reply_to] if in_reply_to else [])
    own = [message_id] if message_id else []
    earlier = [i for i in chain if i != message_id]
    return [*trimmed(earlier, MAX_ANSWER_REFERENCES - len(own)), *own]


# Thread list positions count microseconds from the first representable time.
_ORIGIN: Final = datetime(1, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_LATEST: Final = (datetime.max.replace(tzinfo=UTC) - _ORIGIN) // _MICROSECOND
_BASE36: Final = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True, slots=True)
class ThreadPosition:
    """Where a thread list is ordered: oldest first by ``at`` (a received message's Date,
    else its retrieval time; a sent copy's acceptance time), then ``arrival`` (retrieved
    or accepted), then ``id``. A page continues after the last one it listed.

    As a cursor key: ``<at>_<arrival>_<id>``, times in base 36 microseconds (lower case,
    as every cursor key). Every key of the cursor's form is a position (:meth:`of_key`).
    """

    at: datetime
    arrival: datetime
    id: str

    def key(self) -> str:
        return f"{_base36(_micros(self.at))}_{_base36(_micros(self.arrival))}_{self.id}"

    @classmethod
    def of_key(cls, key: str) -> ThreadPosition:
        """The position a key names; a key this service did not issue names the end of
        every thread (its page is empty), never an error: the cursor's documented form
        is all a client can check."""
        at, _, rest = key.partition("_")
        arrival, _, ident = rest.partition("_")
        try:
            return cls(_time(int(at, 36)), _time(int(arrival, 36)), ident)
        except ValueError:
            return cls(_time(_LATEST), _time(_LATEST), "~")


def _micros(value: datetime) -> int:
    return (value.astimezone(UTC) - _ORIGIN) // _MICROSECOND


def _time(micros: int) -> datetime:
    return _ORIGIN + min(max(micros, 0), _LATEST) * _MICROSECOND


def _base36(number: int) -> str:
    digits = []
    while True:
        number, digit = divmod(number, 36)
        digits.append(_BASE36[digit])
        if not number:
            return "".join(reversed(digits))
