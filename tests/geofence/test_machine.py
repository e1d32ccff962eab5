"""The state machine: dwell on fix time, accuracy, hysteresis, reordering, restarts, noise."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.geofence import (
    Change,
    Circle,
    Fix,
    Polygon,
    SiteRule,
    Tracker,
    offset,
    simulate,
)

CENTRE = (48.137, 11.575)
T0 = 1_767_254_400.0
PLANT = SiteRule("plant-3", Circle(*CENTRE, 100.0), dwell_s=30, exit_dwell_s=120)


def at(metres_east: float, ts: float, acc: float | None = 10.0) -> Fix:
    lat, lon = offset(*CENTRE, metres_east, 0.0)
    return Fix(ts, lat, lon, acc)


def feed(tracker: Tracker, fixes: list[Fix], subject: str = "carol/phone") -> list[Change]:
    changes = []
    for fix in fixes:
        changes += tracker.observe(subject, "carol", fix)
    return changes


def test_a_worker_joins_once_the_dwell_has_passed_on_the_fixes_own_clock() -> None:
    tracker = Tracker([PLANT])
    assert feed(tracker, [at(0, T0), at(0, T0 + 29)]) == []
    assert feed(tracker, [at(0, T0 + 30)]) == [Change("carol", "plant-3", entered=True, ts=T0 + 30)]
    assert tracker.members("plant-3") == {"carol"}


def test_a_fix_with_its_centre_outside_breaks_the_dwell() -> None:
    tracker = Tracker([PLANT])
    assert feed(tracker, [at(0, T0), at(120, T0 + 20), at(0, T0 + 40)]) == []
    assert feed(tracker, [at(0, T0 + 69)]) == []
    assert [c.entered for c in feed(tracker, [at(0, T0 + 70)])] == [True]


@pytest.mark.parametrize("acc", [None, 0.0, -1.0])
def test_unknown_accuracy_counts_as_50_metres(acc: float | None) -> None:
    small = SiteRule("kiosk", Circle(*CENTRE, 40.0), dwell_s=0)
    big = SiteRule("yard", Circle(*CENTRE, 60.0), dwell_s=0)
    tracker = Tracker([small, big])
    changes = feed(tracker, [at(0, T0, acc)])
    # 50 m is worse than the kiosk's 40 m radius: that fix says nothing about the kiosk.
    assert [(c.site, c.entered) for c in changes] == [("yard", True)]


def test_a_fix_less_accurate_than_the_radius_is_ignored() -> None:
    tracker = Tracker([PLANT])
    feed(tracker, [at(0, T0), at(0, T0 + 30)])
    # A 300 m fix far away would be a leave; worse than the 100 m radius, it is ignored.
    assert feed(tracker, [at(2000, T0 + 60 + i * 60, acc=300) for i in range(10)]) == []
    assert tracker.members("plant-3") == {"carol"}


def test_leaving_needs_the_exit_dwell_of_wholly_outside_fixes() -> None:
    tracker = Tracker([PLANT])
    feed(tracker, [at(0, T0), at(0, T0 + 30)])
    # 150 m out with 50 m accuracy: the circle still touches the fence grown by 10 m.
    assert feed(tracker, [at(150, T0 + 100 + i * 30, acc=50) for i in range(20)]) == []
    out = [at(400, T0 + 1000 + i * 30) for i in range(4)]  # 0, 30, 60, 90 s: not yet
    assert feed(tracker, out) == []
    # One uncertain fix restarts the exit dwell.
    assert feed(tracker, [at(150, T0 + 1100, acc=50)]) == []
    assert feed(tracker, [at(400, T0 + 1130), at(400, T0 + 1249)]) == []
    assert feed(tracker, [at(400, T0 + 1250)]) == [
        Change("carol", "plant-3", entered=False, ts=T0 + 1250)
    ]


def test_a_user_stays_while_any_of_their_devices_is_inside() -> None:
    tracker = Tracker([PLANT.__class__("plant-3", PLANT.shape, dwell_s=0, exit_dwell_s=0)])
    assert len(tracker.observe("phone", "carol", at(0, T0))) == 1
    assert tracker.observe("tablet", "carol", at(0, T0)) == []
    assert tracker.observe("phone", "carol", at(1000, T0 + 10)) == []
    assert [c.entered for c in tracker.observe("tablet", "carol", at(1000, T0 + 10))] == [False]


def test_a_polygon_site_uses_its_buffered_outer_shape_to_leave() -> None:
    corners = tuple(
        offset(*CENTRE, east, north) for east, north in ((-50, -50), (50, -50), (50, 50), (-50, 50))
    )
    tracker = Tracker([SiteRule("yard", Polygon(corners), dwell_s=0, exit_dwell_s=0)])
    assert [c.entered for c in feed(tracker, [at(0, T0, acc=20)])] == [True]
    assert feed(tracker, [at(75, T0 + 10, acc=20)]) == []  # 25 m out, 20 + 10 m buffer
    assert [c.entered for c in feed(tracker, [at(85, T0 + 20, acc=20)])] == [False]


def test_changing_the_sites_reevaluates_and_a_removed_site_is_left() -> None:
    tracker = Tracker([PLANT])
    feed(tracker, [at(0, T0), at(0, T0 + 10)])
    assert tracker.members("plant-3") == set()
    # A shorter dwell applies to the fixes already kept.
    faster = SiteRule("plant-3", PLANT.shape, dwell_s=10)
    assert [c.entered for c in tracker.set_sites([faster])] == [True]
    assert tracker.set_sites([]) == []
    assert tracker.membership() == {}
    assert tracker.inside("carol/phone") == set()


def test_a_fix_older_than_the_checkpoint_is_dropped_as_late() -> None:
    tracker = Tracker([PLANT], reorder_window=300)
    # T0 + 500 is more than 300 s older than T0 + 1000: folded into the checkpoint.
    feed(tracker, [at(0, T0), at(0, T0 + 500), at(0, T0 + 1000)])
    assert feed(tracker, [at(0, T0 + 10)]) == []
    assert tracker.stats.late == 1
    assert feed(tracker, [at(0, T0 + 900)]) == []
    assert tracker.stats.reordered == 1


# -- noise: the scenarios, with GPS noise (simulate.py) ----------------------------


@pytest.mark.parametrize("seed", range(1, 6))
def test_a_worker_10m_inside_never_leaves_over_an_8_hour_shift(seed: int) -> None:
    report = simulate(workers=12, hours=8, seed=seed, rule=PLANT, kinds=("fence-sitter",))
    assert report.fixes > 8000
    assert (report.joins, report.leaves, report.spurious) == (12, 0, 0)


@pytest.mark.parametrize("seed", range(1, 6))
def test_walking_in_joins_once_and_walking_out_leaves_once(seed: int) -> None:
    report = simulate(workers=12, hours=4, seed=seed, rule=PLANT, kinds=("visitor",))
    assert (report.joins, report.leaves) == (12, 12)
    assert (report.spurious, report.missed) == (0, 0)
    assert report.join_delay_s[1] < 600


# -- properties: arrival order, duplicates, restarts ----------------------------------------

shifts = st.lists(
    st.tuples(
        st.floats(min_value=1.0, max_value=90.0),  # seconds since the previous fix
        st.floats(min_value=-400.0, max_value=400.0),  # metres east of the centre
        st.one_of(st.none(), st.floats(min_value=-5.0, max_value=150.0)),  # accuracy
        st.integers(0, 1),  # which of carol's devices
    ),
    min_size=1,
    max_size=60,
)


def _fixes(steps: list[tuple[float, float, float | None, int]]) -> list[tuple[str, Fix]]:
    ts, out = T0, []
    for gap, east, acc, device in steps:
        ts += gap
        out.append((f"carol/{device}", at(east, ts, acc)))
    return out


def _run(tracker: Tracker, fixes: list[tuple[str, Fix]]) -> list[Change]:
    changes = []
    for subject, fix in fixes:
        changes += tracker.observe(subject, "carol", fix)
    return changes


@settings(max_examples=150)
@given(steps=shifts, seed=st.integers(0, 2**32 - 1), delay=st.floats(0.0, 299.0))
def test_delayed_and_replayed_fixes_give_the_same_answer(
    steps: list[tuple[float, float, float | None, int]], seed: int, delay: float
) -> None:
    fixes = _fixes(steps)
    in_order = Tracker([PLANT])
    _run(in_order, fixes)
    # Every fix arrives up to `delay` seconds of fix time late, some twice (QoS 1 redelivery).
    rnd = random.Random(seed)
    arrivals = [(fix.ts + rnd.uniform(0.0, delay), i) for i, (_, fix) in enumerate(fixes)]
    arrivals += [(t + rnd.uniform(0.0, 10.0), i) for t, i in arrivals if rnd.random() < 0.2]
    shuffled = Tracker([PLANT])
    _run(shuffled, [fixes[i] for _, i in sorted(arrivals)])
    assert shuffled.membership() == in_order.membership()
    for subject in in_order.subjects():
        assert shuffled.inside(subject) == in_order.inside(subject)
    assert shuffled.stats.late == 0


@settings(max_examples=150)
@given(steps=shifts, cut=st.integers(0, 60))
def test_a_restart_gives_the_same_membership(
    steps: list[tuple[float, float, float | None, int]], cut: int
) -> None:
    fixes = _fixes(steps)
    cut = min(cut, len(fixes))
    running = Tracker([PLANT])
    before = _run(running, fixes[:cut])
    saved = {s: running.export(s) for s in running.subjects()}
    restarted = Tracker([PLANT])
    for subject, state in saved.items():
        assert state is not None
        restarted.restore(subject, state)
    assert restarted.membership() == running.membership()
    # From here on both decide the same, change for change.
    assert _run(restarted, fixes[cut:]) == _run(running, fixes[cut:])
    assert restarted.membership() == running.membership()
    assert len(before) <= cut


@settings(max_examples=60)
@given(
    sites=st.lists(
        st.tuples(st.floats(-3000, 3000), st.floats(-3000, 3000), st.floats(30, 400)),
        min_size=1,
        max_size=25,
    ),
    steps=shifts,
)
def test_the_index_decides_like_a_scan_of_every_site(
    sites: list[tuple[float, float, float]], steps: list[tuple[float, float, float | None, int]]
) -> None:
    rules = [
        SiteRule(f"s{i}", Circle(*offset(*CENTRE, east, north), radius), dwell_s=20)
        for i, (east, north, radius) in enumerate(sites)
    ]
    tracker = Tracker(rules)
    fixes = _fixes(steps)
    _run(tracker, fixes)
    # One tracker per site, each with a single site, sees the same: the index drops nothing.
    for rule in rules:
        alone = Tracker([rule])
        _run(alone, fixes)
        assert alone.members(rule.name) == tracker.members(rule.name)


# A statistical property of a noise model: fixed examples keep the suite deterministic (with a
# 90 s exit dwell, about 2 shifts in 1,000 do flap; from the default 120 s none did in 1,000).
@settings(max_examples=25, derandomize=True)
@given(
    seed=st.integers(0, 2**31),
    depth=st.floats(min_value=10.0, max_value=60.0),
    radius=st.floats(min_value=100.0, max_value=400.0),
    exit_dwell=st.floats(min_value=120.0, max_value=600.0),
)
def test_gps_noise_at_the_fence_never_makes_a_worker_flap(
    seed: int, depth: float, radius: float, exit_dwell: float
) -> None:
    rule = SiteRule("yard", Circle(*CENTRE, radius), dwell_s=30, exit_dwell_s=exit_dwell)
    report = simulate(
        workers=2, hours=8, seed=seed, rule=rule, kinds=("fence-sitter",), sitter_depth_m=depth
    )
    assert report.leaves == 0
    assert report.joins == 2
