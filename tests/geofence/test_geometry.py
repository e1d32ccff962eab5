"""Fences in a local metric projection, against great-circle distances; the grid index."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshchat.errors import ConfigError
from meshchat.geofence import Circle, GridIndex, Polygon, Zone, check_polygon, distance_m, offset

lats = st.floats(min_value=-80.0, max_value=80.0)
lons = st.floats(min_value=-180.0, max_value=180.0)
radii = st.floats(min_value=20.0, max_value=5000.0)


@given(lat=lats, lon=lons, radius=radii, east=st.floats(-8000, 8000), north=st.floats(-8000, 8000))
def test_a_circle_agrees_with_the_great_circle_distance(
    lat: float, lon: float, radius: float, east: float, north: float
) -> None:
    circle = Circle(lat, lon, radius)
    point_lat, point_lon = offset(lat, lon, east, north)
    point_lon = (point_lon + 180.0) % 360.0 - 180.0
    true = distance_m(lat, lon, point_lat, point_lon)
    zone = circle.zone(point_lat, point_lon, 30.0, 10.0)
    # The local projection errs by far less than a metre per kilometre at these sizes.
    slack = 0.5 + true * 2e-3
    if true < radius - slack:
        assert zone is Zone.INSIDE
    elif true > radius + 40.0 + slack:
        assert zone is Zone.OUTSIDE
    elif radius + slack < true < radius + 40.0 - slack:
        assert zone is Zone.UNCERTAIN


def test_leaving_needs_the_whole_accuracy_circle_outside_the_grown_fence() -> None:
    circle = Circle(48.137, 11.575, 100.0)

    def at(metres: float) -> tuple[float, float]:
        return offset(48.137, 11.575, metres, 0.0)

    assert circle.zone(*at(99.0), 50.0, 10.0) is Zone.INSIDE
    assert circle.zone(*at(101.0), 0.5, 10.0) is Zone.UNCERTAIN
    assert circle.zone(*at(155.0), 50.0, 10.0) is Zone.UNCERTAIN  # 155 - 50 < 110
    assert circle.zone(*at(165.0), 50.0, 10.0) is Zone.OUTSIDE


def test_a_site_across_the_antimeridian_is_one_site() -> None:
    circle = Circle(-17.0, 179.999, 500.0)
    assert circle.zone(-17.0, -179.999, 10.0, 0.0) is Zone.INSIDE
    square = Polygon(((-17.01, 179.99), (-17.01, -179.99), (-16.99, -179.99), (-16.99, 179.99)))
    assert square.zone(-17.0, 180.0, 10.0, 0.0) is Zone.INSIDE
    assert square.zone(-17.0, 179.995, 10.0, 0.0) is Zone.INSIDE
    assert square.zone(-17.0, 179.9, 10.0, 0.0) is Zone.OUTSIDE


YARD = ((48.0, 11.0), (48.0, 11.002), (48.001, 11.002), (48.001, 11.0))


def test_a_polygon_exits_through_its_buffered_outer_shape() -> None:
    yard = Polygon(YARD)
    east_edge = 11.002
    assert yard.zone(48.0005, 11.001, 20.0, 10.0) is Zone.INSIDE
    # 50 m east of the east edge: outside, but a 45 m accuracy circle plus 10 m reach the fence.
    lat, lon = offset(48.0005, east_edge, 50.0, 0.0)
    assert yard.zone(lat, lon, 45.0, 10.0) is Zone.UNCERTAIN
    assert yard.zone(lat, lon, 35.0, 10.0) is Zone.OUTSIDE
    # Beyond a corner the buffer is round: 30 m east and 30 m north is 42.4 m from the corner,
    # outside a 40 m buffer although each axis alone is within it.
    lat, lon = offset(48.001, east_edge, 30.0, 30.0)
    assert yard.zone(lat, lon, 30.0, 10.0) is Zone.OUTSIDE
    assert yard.zone(lat, lon, 35.0, 10.0) is Zone.UNCERTAIN
    assert yard.radius_m == pytest.approx(math.sqrt(yard.area_m2 / math.pi))


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (((48.0, 11.0), (48.0, 11.1)), "3 to 1000"),
        (((48.0, 11.0), (48.0, 11.1), (48.0, 11.2)), "area"),
        (((48.0, 11.0), (48.1, 11.1), (48.1, 11.0), (48.0, 11.1)), "cross"),
        (((86.0, 11.0), (86.1, 11.1), (86.0, 11.2)), "85"),
    ],
)
def test_unusable_polygons_are_refused_with_the_reason(
    points: tuple[tuple[float, float], ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_polygon(points)


@given(
    sites=st.lists(st.tuples(lats, lons, radii), min_size=1, max_size=30),
    cell=st.sampled_from([None, 0.001, 0.05, 1.0]),
    picks=st.lists(
        st.tuples(st.integers(0, 29), st.floats(-12000, 12000), st.floats(-12000, 12000)),
        min_size=1,
        max_size=20,
    ),
)
def test_the_grid_index_never_misses_a_site_a_fix_can_be_near(
    sites: list[tuple[float, float, float]],
    cell: float | None,
    picks: list[tuple[int, float, float]],
) -> None:
    circles = [Circle(lat, lon, radius) for lat, lon, radius in sites]
    margin = 10.0
    index = GridIndex(
        ((i, c.bbox(margin + c.radius_m)) for i, c in enumerate(circles)), cell_deg=cell
    )
    for pick, east, north in picks:
        base = circles[pick % len(circles)]
        lat, lon = offset(base.lat, base.lon, east, north)
        lon = (lon + 180.0) % 360.0 - 180.0
        found = set(index.candidates(lat, lon))
        for i, circle in enumerate(circles):
            # Any usable accuracy (at most the radius) that is not OUTSIDE must be a candidate.
            if circle.zone(lat, lon, circle.radius_m, margin) is not Zone.OUTSIDE:
                assert i in found
