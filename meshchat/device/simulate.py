"""Simulated devices, sans-IO: vehicles that drive around a point and report noisy GPS fixes.

Each `SimulatedVehicle` drives at a walking-to-van speed, turning gently, and stays within a
radius of its home point (it turns back when it strays). Its fixes carry realistic GPS noise: a
horizontal error drawn from a normal distribution whose spread matches the reported accuracy
(3 to 25 m, worse now and then), and, rarely, a multipath outlier some tens of metres off with an
accuracy that admits it. Its battery drains, its temperature wanders. `meshchat device
simulate` drives many of them through the real SDK.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Final

from meshchat.device.telemetry import GpsFix, Status

__all__ = ["EARTH_RADIUS_M", "SimulatedVehicle", "move"]

EARTH_RADIUS_M: Final = 6_371_008.8
OUTLIER_RATE: Final = 0.02
"""Share of fixes that are multipath outliers."""


def move(lat: float, lon: float, north_m: float, east_m: float) -> tuple[float, float]:
    """The point `north_m` and `east_m` metres from (lat, lon), in a local flat projection."""
    dlat = math.degrees(north_m / EARTH_RADIUS_M)
    dlon = math.degrees(east_m / (EARTH_RADIUS_M * max(math.cos(math.radians(lat)), 1e-6)))
    return max(-90.0, min(90.0, lat + dlat)), (lon + dlon + 180.0) % 360.0 - 180.0


@dataclass(slots=True)
class SimulatedVehicle:
    """One simulated device: where it truly is, and what it reports.

    Attributes:
        name: the device's name.
        home: (lat, lon) it drives around.
        radius_m: how far from home it roams.
        rnd: its own random source (seed it for a reproducible run).
    """

    name: str
    home: tuple[float, float]
    radius_m: float
    rnd: random.Random = field(default_factory=random.Random)
    north_m: float = 0.0
    east_m: float = 0.0
    heading: float = 0.0
    speed: float = 0.0
    battery: float = 100.0
    temperature: float = 20.0
    uptime: float = 0.0

    def __post_init__(self) -> None:
        """Start somewhere within the radius, heading anywhere, at a random speed."""
        distance = self.radius_m * math.sqrt(self.rnd.random())
        angle = self.rnd.uniform(0, 2 * math.pi)
        self.north_m, self.east_m = distance * math.cos(angle), distance * math.sin(angle)
        self.heading = self.rnd.uniform(0, 360)
        self.speed = self.rnd.uniform(1.0, 14.0)
        self.battery = self.rnd.uniform(40, 100)
        self.temperature = self.rnd.uniform(12, 30)

    @property
    def position(self) -> tuple[float, float]:
        """Where it truly is."""
        return move(*self.home, self.north_m, self.east_m)

    def step(self, seconds: float) -> None:
        """Drive for `seconds`: turn a little, change speed a little, turn back at the edge."""
        self.heading = (self.heading + self.rnd.gauss(0, 15)) % 360
        if math.hypot(self.north_m, self.east_m) > self.radius_m:
            home_bearing = math.degrees(math.atan2(-self.east_m, -self.north_m)) % 360
            self.heading = (home_bearing + self.rnd.gauss(0, 20)) % 360
        self.speed = min(25.0, max(0.0, self.speed + self.rnd.gauss(0, 1.0)))
        distance = self.speed * seconds
        self.north_m += distance * math.cos(math.radians(self.heading))
        self.east_m += distance * math.sin(math.radians(self.heading))
        self.battery = max(0.0, self.battery - seconds * self.rnd.uniform(0.0, 0.01))
        self.temperature += self.rnd.gauss(0, 0.05 * math.sqrt(max(seconds, 0.0)))
        self.uptime += seconds

    def fix(self, ts: int) -> GpsFix:
        """A noisy fix of where it is now."""
        accuracy = self.rnd.uniform(3, 12) if self.rnd.random() < 0.8 else self.rnd.uniform(12, 25)
        sigma = accuracy / 2
        north, east = self.rnd.gauss(0, sigma), self.rnd.gauss(0, sigma)
        if self.rnd.random() < OUTLIER_RATE:
            north += self.rnd.choice((-1, 1)) * self.rnd.uniform(30, 80)
            accuracy = max(accuracy, 50.0)
        lat, lon = move(*self.home, self.north_m + north, self.east_m + east)
        return GpsFix(
            ts,
            lat,
            lon,
            accuracy=round(accuracy),
            speed=round(self.speed, 2),
            heading=round(self.heading) % 360,
            battery=round(self.battery),
        )

    def status(self, ts: int) -> Status:
        """Its status: battery, temperature, uptime, whether it moves."""
        return Status(
            ts,
            battery=round(self.battery),
            temperature=round(self.temperature, 1),
            uptime=int(self.uptime),
            state="moving" if self.speed > 0.5 else "parked",
        )
