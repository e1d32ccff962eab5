"""A geofence simulator (sans-IO): workers with realistic GPS noise walking in and out of sites.

It drives a `Tracker` with the fixes a shift of workers would send and counts what the state
machine decided against what really happened. Three kinds of workers walk:

- visitors walk in from 400 m outside, work inside for a few hours, and walk out again: exactly
  one join and one leave each;
- fence sitters stand 10 m inside the fence for the whole shift: one join, never a leave;
- passers-by walk along the fence 30 m outside it: never a join.

The GPS noise (`NoiseModel`) is what phones show on a factory yard: a reported accuracy of
20-80 m with an error to match, a slowly wandering bias (multipath), some fixes indoors with
100-300 m accuracy, and rare outliers that jump about 300 m while claiming a good accuracy.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

from meshchat.geofence.geometry import METRES_PER_DEGREE, Circle
from meshchat.geofence.machine import Tracker
from meshchat.geofence.rules import Change, Fix, SiteRule

__all__ = [
    "GpsNoise",
    "NoiseModel",
    "SimulationReport",
    "WorkerKind",
    "offset",
    "simulate",
]

WorkerKind = Literal["visitor", "fence-sitter", "passer-by"]
WALKING_SPEED: Final = 1.3
"""Metres per second."""
START: Final = 1_767_254_400.0
"""2026-01-01 08:00 UTC, when every simulated shift starts."""


def offset(lat: float, lon: float, east_m: float, north_m: float) -> tuple[float, float]:
    """The point `east_m` east and `north_m` north of (lat, lon)."""
    return (
        lat + north_m / METRES_PER_DEGREE,
        lon + east_m / (METRES_PER_DEGREE * math.cos(math.radians(lat))),
    )


@dataclass(frozen=True, slots=True)
class NoiseModel:
    """How wrong a phone's fixes are, and how often it sends one.

    Attributes:
        acc_min: smallest reported accuracy of a normal fix (metres).
        acc_max: largest reported accuracy of a normal fix.
        poor_rate: share of fixes taken indoors, reporting 100-300 m.
        outlier_rate: share of fixes that jump `outlier_m` while claiming a normal accuracy.
        outlier_m: how far an outlier jumps.
        drift_m: standard deviation of the slowly wandering bias, per axis.
        drift_tau_s: how long the bias takes to forget itself (seconds).
        interval_s: the shortest and longest time between two fixes.
    """

    acc_min: float = 20.0
    acc_max: float = 80.0
    poor_rate: float = 0.05
    outlier_rate: float = 0.01
    outlier_m: float = 300.0
    drift_m: float = 5.0
    drift_tau_s: float = 120.0
    interval_s: tuple[float, float] = (15.0, 45.0)


class GpsNoise:
    """Turns true positions into the fixes a phone would report (seeded, reproducible)."""

    def __init__(self, model: NoiseModel | None = None, *, seed: int = 0) -> None:
        """Start with no bias."""
        self.model = model or NoiseModel()
        self._random = random.Random(seed)  # noqa: S311  # a reproducible simulation, not a secret
        self._bias = (0.0, 0.0)
        self._last: float | None = None

    def interval(self) -> float:
        """Seconds until the next fix."""
        low, high = self.model.interval_s
        return self._random.uniform(low, high)

    def fix(self, ts: float, lat: float, lon: float) -> Fix:
        """A noisy fix of the true position (lat, lon) at `ts`."""
        model, rnd = self.model, self._random
        # Bias: an Ornstein-Uhlenbeck process, so consecutive fixes err alike.
        keep = 0.0 if self._last is None else math.exp(-(ts - self._last) / model.drift_tau_s)
        spread = model.drift_m * math.sqrt(1.0 - keep * keep)
        self._bias = (
            self._bias[0] * keep + rnd.gauss(0.0, spread),
            self._bias[1] * keep + rnd.gauss(0.0, spread),
        )
        self._last = ts
        draw = rnd.random()
        if draw < model.outlier_rate:
            acc = rnd.uniform(model.acc_min, model.acc_max)
            angle = rnd.uniform(0.0, 2.0 * math.pi)
            east, north = model.outlier_m * math.cos(angle), model.outlier_m * math.sin(angle)
        else:
            poor = draw < model.outlier_rate + model.poor_rate
            acc = rnd.uniform(100.0, 300.0) if poor else rnd.uniform(model.acc_min, model.acc_max)
            # A reported accuracy is a 68% radius: per axis sigma = acc / 1.51.
            sigma = acc / 1.51
            east, north = rnd.gauss(0.0, sigma), rnd.gauss(0.0, sigma)
        east += self._bias[0]
        north += self._bias[1]
        fix_lat, fix_lon = offset(lat, lon, east, north)
        return Fix(ts, max(-90.0, min(90.0, fix_lat)), fix_lon, round(acc, 1))


@dataclass(slots=True)
class _Walker:
    name: str
    kind: WorkerKind
    entered_at: float | None = None
    left_at: float | None = None
    joins: list[float] = field(default_factory=list)
    leaves: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SimulationReport:
    """What the state machine decided, against what really happened.

    Attributes:
        workers: workers simulated (of every kind).
        fixes: fixes evaluated.
        joins: joins decided.
        leaves: leaves decided.
        expected_joins: joins that really happened (visitors and fence sitters).
        expected_leaves: leaves that really happened (visitors).
        spurious_joins: joins beyond those.
        spurious_leaves: leaves beyond those.
        missed: real joins or leaves never decided.
        join_delay_s: median and largest seconds from really walking in to the join.
        leave_delay_s: median and largest seconds from really walking out to the leave.
    """

    workers: int
    fixes: int
    joins: int
    leaves: int
    expected_joins: int
    expected_leaves: int
    spurious_joins: int
    spurious_leaves: int
    missed: int
    join_delay_s: tuple[float, float]
    leave_delay_s: tuple[float, float]

    @property
    def spurious(self) -> int:
        """Every transition that did not really happen."""
        return self.spurious_joins + self.spurious_leaves


def _track(
    walker: _Walker,
    *,
    centre: tuple[float, float],
    rule: SiteRule,
    hours: float,
    model: NoiseModel,
    seed: int,
    sitter_depth_m: float = 10.0,
) -> Iterator[tuple[float, float, float]]:
    """(ts, lat, lon): the true positions of one walker, one per fix time."""
    rnd = random.Random(seed)  # noqa: S311  # a reproducible simulation, not a secret
    low, high = model.interval_s
    radius = rule.radius_m
    end = START + hours * 3600.0
    angle = rnd.uniform(0.0, 2.0 * math.pi)
    ts = START
    if walker.kind == "fence-sitter":
        walker.entered_at = START
        inset = radius - sitter_depth_m
        spot = offset(*centre, inset * math.cos(angle), inset * math.sin(angle))
        while ts < end:
            yield ts, *spot
            ts += rnd.uniform(low, high)
        return
    if walker.kind == "passer-by":
        distance = radius + 30.0
        while ts < end:
            yield ts, *offset(*centre, distance * math.cos(angle), distance * math.sin(angle))
            step = rnd.uniform(low, high)
            ts += step
            angle += WALKING_SPEED * step / distance
        return
    # A visitor: in along one ray, work inside, out along another.
    far = radius + 400.0
    work = rnd.uniform(0.0, 0.6 * radius)
    arrive = START + rnd.uniform(0.0, 0.1 * hours * 3600.0)
    stay = rnd.uniform(0.4, 0.6) * hours * 3600.0
    out_angle = rnd.uniform(0.0, 2.0 * math.pi)
    walk = (far - work) / WALKING_SPEED
    walker.entered_at = arrive + (far - radius) / WALKING_SPEED
    depart = arrive + walk + stay
    walker.left_at = depart + (radius - work) / WALKING_SPEED
    while ts < end:
        if ts < arrive:
            distance, bearing = far, angle
        elif ts < arrive + walk:
            distance, bearing = far - (ts - arrive) * WALKING_SPEED, angle
        elif ts < depart:
            distance, bearing = work, angle
        elif ts < depart + walk:
            distance, bearing = work + (ts - depart) * WALKING_SPEED, out_angle
        else:
            distance, bearing = far, out_angle
        yield ts, *offset(*centre, distance * math.cos(bearing), distance * math.sin(bearing))
        ts += rnd.uniform(low, high)


def simulate(
    *,
    workers: int = 30,
    hours: float = 8.0,
    seed: int = 1,
    rule: SiteRule | None = None,
    noise: NoiseModel | None = None,
    kinds: tuple[WorkerKind, ...] = ("visitor", "fence-sitter", "passer-by"),
    sitter_depth_m: float = 10.0,
) -> SimulationReport:
    """Simulate a shift of `workers` (taking turns among `kinds`) at one site.

    Args:
        workers: how many workers.
        hours: length of the shift.
        seed: makes the run reproducible.
        rule: the site (default: a 100 m circle with the default timing).
        noise: the GPS noise (default: `NoiseModel()`).
        kinds: the kinds of workers, assigned in turn.
        sitter_depth_m: how far inside the fence the fence sitters stand (for circles).
    """
    if hours < 1.0:
        raise ValueError("a simulated shift lasts at least one hour")
    if workers < 1:
        raise ValueError("simulate at least one worker")
    rule = rule or SiteRule("plant", Circle(48.137, 11.575, 100.0))
    model = noise or NoiseModel()
    centre = (rule.shape.centre[0], rule.shape.centre[1])
    tracker = Tracker([rule])
    walkers = [_Walker(f"w{i}", kinds[i % len(kinds)]) for i in range(workers)]
    # Interleave every walker's fixes in time order, as a broker would deliver them.
    events: list[tuple[float, int, Fix]] = []
    for number, walker in enumerate(walkers):
        gps = GpsNoise(model, seed=seed * 100_003 + number)
        for ts, lat, lon in _track(
            walker,
            centre=centre,
            rule=rule,
            hours=hours,
            model=model,
            seed=seed * 7919 + number,
            sitter_depth_m=sitter_depth_m,
        ):
            events.append((ts, number, gps.fix(ts, lat, lon)))
    events.sort(key=lambda item: (item[0], item[1]))
    for _, number, fix in events:
        walker = walkers[number]
        change: Change
        for change in tracker.observe(walker.name, walker.name, fix):
            (walker.joins if change.entered else walker.leaves).append(change.ts)
    expected_joins = sum(1 for w in walkers if w.entered_at is not None)
    expected_leaves = sum(1 for w in walkers if w.left_at is not None)
    spurious_joins = spurious_leaves = missed = 0
    join_delays: list[float] = []
    leave_delays: list[float] = []
    for walker in walkers:
        want_join = int(walker.entered_at is not None)
        want_leave = int(walker.left_at is not None)
        spurious_joins += max(0, len(walker.joins) - want_join)
        spurious_leaves += max(0, len(walker.leaves) - want_leave)
        missed += max(0, want_join - len(walker.joins)) + max(0, want_leave - len(walker.leaves))
        if walker.entered_at is not None and walker.joins:
            join_delays.append(max(0.0, walker.joins[0] - walker.entered_at))
        if walker.left_at is not None and walker.leaves:
            leave_delays.append(max(0.0, walker.leaves[-1] - walker.left_at))
    return SimulationReport(
        workers=workers,
        fixes=len(events),
        joins=sum(len(w.joins) for w in walkers),
        leaves=sum(len(w.leaves) for w in walkers),
        expected_joins=expected_joins,
        expected_leaves=expected_leaves,
        spurious_joins=spurious_joins,
        spurious_leaves=spurious_leaves,
        missed=missed,
        join_delay_s=_median_max(join_delays),
        leave_delay_s=_median_max(leave_delays),
    )


def _median_max(values: list[float]) -> tuple[float, float]:
    if not values:
        return (0.0, 0.0)
    return (round(statistics.median(values), 1), round(max(values), 1))
