"""UTC time helpers: aware datetimes inside, ISO 8601 text in the database and on the wire."""

from __future__ import annotations

from datetime import UTC, datetime

_TEXT = "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}.{:06d}Z".format


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_text(value: datetime) -> str:
    """ISO 8601 in UTC with microseconds, so text order is time order."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    if value.year < 1000:  # strftime does not pad such years: keep its text for them
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # The same text as strftime("%Y-%m-%dT%H:%M:%S.%fZ") at a third of its cost (it is
    # called several times per stored message).
    return _TEXT(
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def from_text(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def opt_to_text(value: datetime | None) -> str | None:
    return None if value is None else to_text(value)


def opt_from_text(value: str | None) -> datetime | None:
    return None if value is None else from_text(value)
