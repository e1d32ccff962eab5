"""Simulated vehicles, sans-IO: they roam near home and report fixes with believable noise."""

from __future__ import annotations

import math
import random

import pytest

from meshchat.device.simulate import SimulatedVehicle, move

HOME = (48.137, 11.575)


def metres(a: tuple[float, float], b: tuple[float, float]) -> float:
    north = (b[0] - a[0]) * 111_195
    east = (b[1] - a[1]) * 111_195 * math.cos(math.radians(a[0]))
    return math.hypot(north, east)


def test_move_goes_the_distance_asked_for() -> None:
    assert metres(HOME, move(*HOME, 300.0, 400.0)) == pytest.approx(500.0, rel=1e-3)


def test_a_vehicle_roams_near_home_and_its_fixes_scatter_like_gps() -> None:
    vehicle = SimulatedVehicle("sim-1", HOME, 500.0, random.Random(7))
    errors, farthest, battery = [], 0.0, vehicle.battery
    for second in range(0, 3600, 5):
        vehicle.step(5.0)
        truth = vehicle.position
        farthest = max(farthest, metres(HOME, truth))
        fix = vehicle.fix(1_800_000_000 + second)
        assert fix.accuracy is not None
        errors.append((metres(truth, (fix.lat, fix.lon)), fix.accuracy))
        assert 0 <= (fix.heading or 0) < 360
    assert farthest < 500.0 + 25 * 5 * 3  # it turns back at the edge within a few steps
    within = sum(error <= 2 * accuracy for error, accuracy in errors) / len(errors)
    assert within > 0.9  # most fixes lie within twice their stated accuracy
    assert any(error > 30 for error, _ in errors)  # now and then a multipath outlier
    assert vehicle.battery < battery
    status = vehicle.status(1_800_000_000)
    assert status.state in {"moving", "parked"}
    assert status.uptime == 3600
