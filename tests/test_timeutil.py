"""Instants as people write them for --since and --until."""

from __future__ import annotations

import pytest

from meshchat.errors import ConfigError
from meshchat.timeutil import parse_instant

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2d", NOW - 2 * 86400),
        (" 90s ", NOW - 90),
        ("1714521600", 1714521600.0),
        ("1714521600.5", 1714521600.5),
        ("2024-05-01", 1714521600.0),  # a date without a zone is UTC
        ("2024-05-01T08:00:00", 1714550400.0),
        ("2024-05-01T08:00:00+02:00", 1714543200.0),
        ("2024-05-01T06:00:00Z", 1714543200.0),
    ],
)
def test_durations_iso_times_and_unix_seconds_are_read(text: str, expected: float) -> None:
    assert parse_instant(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "soon", "2 days", "-5", "nan", "2024-13-01", "1e9"])
def test_anything_else_is_a_config_error_that_shows_the_forms(text: str) -> None:
    with pytest.raises(ConfigError, match="write a duration back from now"):
        parse_instant(text, now=NOW)
