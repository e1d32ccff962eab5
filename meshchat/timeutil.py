"""Durations and instants as people write them on the command line: ``7d``, ``2024-05-01``."""

from __future__ import annotations

import datetime as dt
import re
from typing import Final

from meshchat.errors import ConfigError

__all__ = ["DAY", "parse_days", "parse_duration", "parse_instant"]

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_PATTERN: Final = re.compile(r"\A(\d{1,9})([smhdwy])\Z")
DAY: Final = 86400
"""Seconds in a day."""


def parse_duration(text: str) -> int:
    """Seconds in a duration such as ``7d``.

    Raises:
        ConfigError: not a positive whole number followed by one of s, m, h, d, w, y.
    """
    match = _PATTERN.match(text.strip())
    if match is None or int(match[1]) == 0:
        raise ConfigError(
            f"duration {text!r} is not understood; write a positive number and a unit, "
            "for example 90s, 15m, 12h, 7d, 2w or 3y"
        )
    return int(match[1]) * _UNITS[match[2]]


def parse_days(text: str) -> int:
    """Whole days in a duration such as ``30d``, ``2w`` or ``3y``.

    Raises:
        ConfigError: not a duration, or not a whole number of days.
    """
    seconds = parse_duration(text)
    if seconds % DAY:
        raise ConfigError(f"duration {text!r} must be whole days (d, w or y)")
    return seconds // DAY


def parse_instant(text: str, *, now: float) -> float:
    """Unix seconds of an instant: a duration back from `now`, an ISO date or time, or a number.

    ``2d`` is two days before `now`; ``2024-05-01`` and ``2024-05-01T08:00`` are UTC unless they
    name a zone (``+02:00``, ``Z``); ``1714521600`` is unix seconds.

    Raises:
        ConfigError: none of these.
    """
    text = text.strip()
    if _PATTERN.match(text):
        return now - parse_duration(text)
    try:
        return float(text) if text.replace(".", "", 1).isdigit() else _iso(text)
    except ValueError:
        raise ConfigError(
            f"time {text!r} is not understood; write a duration back from now (2d), an ISO "
            "date or time (2024-05-01, 2024-05-01T08:00:00+02:00; UTC unless a zone is "
            "given) or unix seconds"
        ) from None


def _iso(text: str) -> float:
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()
