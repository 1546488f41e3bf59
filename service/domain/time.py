"""UTC time helpers: aware datetimes inside, ISO 8601 text in the database and on the wire."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_text(value: datetime) -> str:
    """ISO 8601 in UTC with microseconds, so text order is time order."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def from_text(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def opt_to_text(value: datetime | None) -> str | None:
    return None if value is None else to_text(value)


def opt_from_text(value: str | None) -> datetime | None:
    return None if value is None else from_text(value)
