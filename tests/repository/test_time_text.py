"""The stored time text: the fast formatting gives strftime's exact text, so text order
stays time order and rows written before and after the change compare alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from service.domain.time import from_text, to_text

STRFTIME = "%Y-%m-%dT%H:%M:%S.%fZ"
ZONES = st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-23 * 60, 23 * 60)
)


@given(
    st.datetimes(
        min_value=datetime(2, 1, 1),  # an offset must not carry it out of datetime's range
        max_value=datetime(9998, 12, 31),
        timezones=st.just(UTC) | ZONES,
    )
)
def test_to_text_is_strftime_text(value: datetime) -> None:
    assert to_text(value) == value.astimezone(UTC).strftime(STRFTIME)


def test_edges_and_round_trip() -> None:
    for value in (
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # strftime's unpadded year
        datetime(1000, 1, 1, tzinfo=UTC),
        datetime(2026, 11, 29, 15, 0, 0, 0, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ):
        assert to_text(value) == value.strftime(STRFTIME)
    now = datetime(2026, 11, 29, 15, 0, 0, 123_456, tzinfo=UTC)
    assert from_text(to_text(now)) == now
