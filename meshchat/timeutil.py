"""Durations as people write them on the command line: ``90s``, ``15m``, ``12h``, ``7d``, ``2w``."""

from __future__ import annotations

import re
from typing import Final

from meshchat.errors import ConfigError

__all__ = ["parse_days", "parse_duration"]

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_PATTERN: Final = re.compile(r"\A(\d{1,9})([smhdwy])\Z")
_DAY: Final = 86400


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
    if seconds % _DAY:
        raise ConfigError(f"duration {text!r} must be whole days (d, w or y)")
    return seconds // _DAY
