"""Sites and fixes as the geofence state machine sees them (sans-IO value objects).

`Fix` is one position report, `SiteRule` a site's fence and timing, `Change` a user entering or
leaving a site, and `SubjectState` what the worker persists of one device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from meshchat.geofence.geometry import Shape, Zone

__all__ = [
    "DEFAULT_ACCURACY_M",
    "DEFAULT_DWELL_S",
    "DEFAULT_EXIT_DWELL_S",
    "DEFAULT_HYSTERESIS_M",
    "MAX_DWELL_S",
    "MAX_HYSTERESIS_M",
    "MAX_TIMESTAMP",
    "Change",
    "Fix",
    "SiteRule",
    "SubjectState",
]

DEFAULT_ACCURACY_M: Final = 50.0
"""The accuracy assumed for a fix that reports none, or zero or less."""
DEFAULT_DWELL_S: Final = 30.0
DEFAULT_EXIT_DWELL_S: Final = 120.0
DEFAULT_HYSTERESIS_M: Final = 10.0
MAX_DWELL_S: Final = 86_400.0
MAX_HYSTERESIS_M: Final = 10_000.0
MAX_TIMESTAMP: Final = 2.0**33
"""Fix timestamps are unix seconds before the year 2242."""


@dataclass(frozen=True, slots=True)
class Fix:
    """One position report.

    Attributes:
        ts: when the position was measured (unix seconds), by the device's clock.
        lat: latitude in degrees.
        lon: longitude in degrees.
        acc: accuracy radius in metres; None, zero or less means unknown.
    """

    ts: float
    lat: float
    lon: float
    acc: float | None = None

    def __post_init__(self) -> None:
        """Check the ranges (also refuses NaN).

        Raises:
            ValueError: a value is out of range or not finite.
        """
        if not 0.0 < self.ts < MAX_TIMESTAMP:
            raise ValueError(f"fix timestamp {self.ts} is not unix seconds")
        if not (-90.0 <= self.lat <= 90.0 and -180.0 <= self.lon <= 180.0):
            raise ValueError(f"fix position ({self.lat}, {self.lon}) is out of range")
        if self.acc is not None and not math.isfinite(self.acc):
            raise ValueError(f"fix accuracy {self.acc} is not a finite number")

    @property
    def accuracy(self) -> float:
        """The accuracy in metres, `DEFAULT_ACCURACY_M` when unknown."""
        acc = self.acc
        return acc if acc is not None and acc > 0.0 else DEFAULT_ACCURACY_M


@dataclass(frozen=True, slots=True)
class SiteRule:
    """A site as the state machine sees it: its fence and timing.

    Attributes:
        name: the site's name (its channel is ``sites/{name}``).
        shape: the fence.
        dwell_s: seconds a subject must be inside before it enters.
        exit_dwell_s: seconds a subject must be wholly outside before it leaves.
        hysteresis_m: metres the fence grows by for the exit test.
    """

    name: str
    shape: Shape
    dwell_s: float = DEFAULT_DWELL_S
    exit_dwell_s: float = DEFAULT_EXIT_DWELL_S
    hysteresis_m: float = DEFAULT_HYSTERESIS_M
    radius_m: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check the timing and cache the radius.

        Raises:
            ValueError: a dwell or the hysteresis is out of range.
        """
        for what, value, top in (
            ("dwell", self.dwell_s, MAX_DWELL_S),
            ("exit dwell", self.exit_dwell_s, MAX_DWELL_S),
            ("hysteresis", self.hysteresis_m, MAX_HYSTERESIS_M),
        ):
            if not 0.0 <= value <= top:
                raise ValueError(f"{what} {value} is outside 0..{top:g}")
        object.__setattr__(self, "radius_m", self.shape.radius_m)

    def zone(self, fix: Fix) -> Zone:
        """Where `fix` is relative to this site."""
        acc = fix.accuracy
        if acc > self.radius_m:
            return Zone.IGNORED
        return self.shape.zone(fix.lat, fix.lon, acc, self.hysteresis_m)

    def bbox(self) -> tuple[float, float, float, float]:
        """The box outside of which every usable fix is ``OUTSIDE``."""
        # A usable fix is at most as inaccurate as the radius.
        return self.shape.bbox(self.hysteresis_m + self.radius_m)


@dataclass(frozen=True, slots=True)
class Change:
    """A user entered or left a site.

    Attributes:
        user: the user (the owner of the subjects).
        site: the site's name.
        entered: True for an enter, False for a leave.
        ts: the timestamp of the fix that decided it.
    """

    user: str
    site: str
    entered: bool
    ts: float


@dataclass(frozen=True, slots=True)
class SubjectState:
    """What to persist of one subject so a restart continues exactly where it stopped.

    Attributes:
        owner: the user the subject belongs to.
        base_ts: the checkpoint: fixes at or before it are folded into `tracks`.
        tracks: (site, inside, dwell start) at the checkpoint.
        fixes: the fixes after the checkpoint, oldest first.
    """

    owner: str
    base_ts: float
    tracks: tuple[tuple[str, bool, float | None], ...]
    fixes: tuple[Fix, ...]
