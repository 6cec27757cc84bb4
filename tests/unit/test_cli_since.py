"""``aeventor runs --since``: a time before now (``30m``, ``2h``, ``7d``) or an ISO date."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta, timezone

import pytest

from aeventor.cli.runs import parse_since


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("45s", timedelta(seconds=45)),
        ("30m", timedelta(minutes=30)),
        ("2h", timedelta(hours=2)),
        ("7d", timedelta(days=7)),
        ("1w", timedelta(weeks=1)),
        (" 2H ", timedelta(hours=2)),
        ("0m", timedelta(0)),
    ],
)
def test_a_time_before_now(text: str, expected: timedelta) -> None:
    assert parse_since(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
        ("2026-12-01T08:30", datetime(2026, 12, 1, 8, 30, tzinfo=UTC)),
        ("2026-12-01 08:30:15", datetime(2026, 12, 1, 8, 30, 15, tzinfo=UTC)),
        (
            "2026-12-01T08:30+02:00",
            datetime(2026, 12, 1, 8, 30, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("2026-12-01T08:30Z", datetime(2026, 12, 1, 8, 30, tzinfo=UTC)),
    ],
)
def test_an_iso_date_or_time_is_utc_unless_it_names_a_zone(text: str, expected: datetime) -> None:
    since = parse_since(text)
    assert since == expected
    assert isinstance(since, datetime) and since.tzinfo is not None


@pytest.mark.parametrize("text", ["", "yesterday", "2h30m", "-2h", "3y", "h", "2026-13-01"])
def test_anything_else_says_both_forms(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"write a time before now as 30m"):
        parse_since(text)
