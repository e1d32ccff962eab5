"""Site shapes in a local metric projection, and a grid index over many sites (sans-IO).

Distances are metres in a local equirectangular projection around each site: latitude scaled
by the metres of one degree, longitude by that times the cosine of the site's latitude. Over a
site's few kilometres that is accurate to well under a metre, and it costs two multiplications.
Sites nearer the poles than `MAX_LATITUDE` are refused: the projection degrades there, and no
factory stands on an ice cap.

Every shape answers one question about a fix (a centre and an accuracy radius), `Zone`:

- ``INSIDE``: the centre is inside the fence (circles tested exactly, polygons by ray casting);
- ``OUTSIDE``: the whole accuracy circle is outside the fence grown by the exit hysteresis.
  For a polygon that grown fence is its buffered outer shape (the polygon's Minkowski sum with
  a disc), whose membership is tested exactly as "distance to the polygon <= buffer";
- ``UNCERTAIN``: neither; the fix proves nothing either way.

`GridIndex` finds the few sites a fix can be anything but ``OUTSIDE`` for, so evaluating a fix
against 10,000 sites costs a dictionary lookup instead of 10,000 tests.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from meshchat.errors import ConfigError

__all__ = [
    "EARTH_RADIUS_M",
    "MAX_LATITUDE",
    "MAX_VERTICES",
    "METRES_PER_DEGREE",
    "Circle",
    "GridIndex",
    "Polygon",
    "Shape",
    "Zone",
    "check_polygon",
    "distance_m",
]

EARTH_RADIUS_M: Final = 6_371_008.8
"""The mean Earth radius (IUGG), metres."""
METRES_PER_DEGREE: Final = EARTH_RADIUS_M * math.pi / 180.0
MAX_LATITUDE: Final = 85.0
"""Sites must lie between 85 degrees south and north."""
MAX_VERTICES: Final = 1000
"""Corners a site polygon may have."""
MAX_CELLS_PER_SITE: Final = 4096
"""A site that would cover more grid cells than this is checked for every fix instead."""


class Zone(enum.IntEnum):
    """Where a fix is relative to one site (see the module docstring)."""

    INSIDE = 0
    UNCERTAIN = 1
    OUTSIDE = 2
    IGNORED = 3
    """The fix's accuracy is worse than the site's radius: it says nothing about this site."""


_INSIDE: Final = Zone.INSIDE
_UNCERTAIN: Final = Zone.UNCERTAIN
_OUTSIDE: Final = Zone.OUTSIDE
_M_PER_DEG: Final = METRES_PER_DEGREE
_floor: Final = math.floor


def _wrap(dlon: float) -> float:
    """A longitude difference folded into -180..180 (sites across the antimeridian)."""
    if dlon > 180.0:
        return dlon - 360.0
    if dlon < -180.0:
        return dlon + 360.0
    return dlon


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (haversine); the tests' yardstick for the projection."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(_wrap(lon2 - lon1))
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def _check_point(lat: float, lon: float) -> None:
    if not (math.isfinite(lat) and math.isfinite(lon)):
        raise ConfigError(f"coordinates ({lat}, {lon}) are not finite numbers")
    if not -MAX_LATITUDE <= lat <= MAX_LATITUDE:
        raise ConfigError(
            f"latitude {lat} is beyond {MAX_LATITUDE} degrees; sites must lie between "
            f"{MAX_LATITUDE} S and {MAX_LATITUDE} N"
        )
    if not -180.0 <= lon <= 180.0:
        raise ConfigError(f"longitude {lon} is outside -180..180")


@dataclass(frozen=True, slots=True)
class Circle:
    """A circular fence.

    Attributes:
        lat: centre latitude (degrees).
        lon: centre longitude (degrees).
        radius_m: radius in metres.
    """

    lat: float
    lon: float
    radius_m: float
    _kx: float = field(init=False, repr=False, compare=False)
    _r2: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check the values and precompute the projection.

        Raises:
            ConfigError: the centre is out of range or the radius is not positive.
        """
        _check_point(self.lat, self.lon)
        if not (math.isfinite(self.radius_m) and self.radius_m > 0):
            raise ConfigError(f"radius {self.radius_m} must be a positive number of metres")
        object.__setattr__(self, "_kx", METRES_PER_DEGREE * math.cos(math.radians(self.lat)))
        object.__setattr__(self, "_r2", self.radius_m * self.radius_m)

    @property
    def centre(self) -> tuple[float, float]:
        """(lat, lon) of the centre."""
        return self.lat, self.lon

    @property
    def reach_m(self) -> float:
        """The farthest any point of the fence is from the centre."""
        return self.radius_m

    def zone(self, lat: float, lon: float, acc: float, margin: float) -> Zone:
        """Where a fix at (lat, lon) with accuracy `acc` is; `margin` is the exit hysteresis."""
        # The hot path of the geofence: no calls, no enum lookups.
        dlon = lon - self.lon
        if dlon > 180.0:
            dlon -= 360.0
        elif dlon < -180.0:
            dlon += 360.0
        dx = dlon * self._kx
        dy = (lat - self.lat) * _M_PER_DEG
        d2 = dx * dx + dy * dy
        if d2 <= self._r2:
            return _INSIDE
        out = self.radius_m + margin + acc
        return _OUTSIDE if d2 > out * out else _UNCERTAIN

    def bbox(self, margin_m: float) -> tuple[float, float, float, float]:
        """(south, west, north, east) of the fence grown by `margin_m`; east may exceed 180."""
        return _bbox_around(self.lat, self.lon, self.radius_m + margin_m)


def _bbox_around(lat: float, lon: float, reach: float) -> tuple[float, float, float, float]:
    dlat = reach / METRES_PER_DEGREE
    south, north = lat - dlat, lat + dlat
    # The narrowest parallel of the box decides how many degrees of longitude `reach` spans.
    cos_min = math.cos(math.radians(min(89.9, max(abs(south), abs(north)))))
    dlon = min(180.0, reach / (METRES_PER_DEGREE * cos_min))
    return south, lon - dlon, north, lon + dlon


def check_polygon(points: Sequence[tuple[float, float]]) -> None:
    """Check that (lat, lon) corners make a usable site fence.

    Raises:
        ConfigError: fewer than 3 or more than `MAX_VERTICES` corners, a corner out of range,
            no area, wider than 180 degrees of longitude, or edges that cross each other.
    """
    Polygon(tuple(points))


@dataclass(frozen=True, slots=True)
class Polygon:
    """A polygonal fence: corners as (lat, lon), the ring closed implicitly.

    Attributes:
        points: the corners in order (either orientation).
    """

    points: tuple[tuple[float, float], ...]
    _lat0: float = field(init=False, repr=False, compare=False)
    _lon0: float = field(init=False, repr=False, compare=False)
    _kx: float = field(init=False, repr=False, compare=False)
    _xs: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _ys: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _box: tuple[float, float, float, float] = field(init=False, repr=False, compare=False)
    _area: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check the ring and project it around its centre.

        Raises:
            ConfigError: see `check_polygon`.
        """
        points = self.points
        if not 3 <= len(points) <= MAX_VERTICES:
            raise ConfigError(
                f"a site polygon needs 3 to {MAX_VERTICES} corners, not {len(points)}"
            )
        for lat, lon in points:
            _check_point(lat, lon)
        # Unwrap longitudes next to the first corner, so a site across 180 degrees stays whole.
        first_lon = points[0][1]
        lons = [first_lon + _wrap(lon - first_lon) for _, lon in points]
        if max(lons) - min(lons) >= 180.0:
            raise ConfigError("a site polygon may not span 180 degrees of longitude or more")
        lat0 = sum(lat for lat, _ in points) / len(points)
        lon0 = sum(lons) / len(lons)
        kx = METRES_PER_DEGREE * math.cos(math.radians(lat0))
        xs = tuple((lon - lon0) * kx for lon in lons)
        ys = tuple((lat - lat0) * METRES_PER_DEGREE for lat, _ in points)
        crossing = _first_crossing(xs, ys)
        if crossing is not None:
            i, j = crossing
            raise ConfigError(
                f"the site polygon's edges {i + 1} and {j + 1} cross; corners must go round the "
                "site in order"
            )
        area = abs(_shoelace(xs, ys))
        if area < 1.0:
            raise ConfigError("a site polygon must enclose an area (its corners are collinear)")
        object.__setattr__(self, "_lat0", lat0)
        object.__setattr__(self, "_lon0", lon0)
        object.__setattr__(self, "_kx", kx)
        object.__setattr__(self, "_xs", xs)
        object.__setattr__(self, "_ys", ys)
        object.__setattr__(self, "_box", (min(xs), min(ys), max(xs), max(ys)))
        object.__setattr__(self, "_area", area)

    @property
    def centre(self) -> tuple[float, float]:
        """(lat, lon) of the projection's origin (the mean of the corners)."""
        return self._lat0, _wrap(self._lon0)

    @property
    def area_m2(self) -> float:
        """The enclosed area in square metres."""
        return self._area

    @property
    def radius_m(self) -> float:
        """The radius of the circle of equal area: the polygon's "site radius"."""
        return math.sqrt(self._area / math.pi)

    @property
    def reach_m(self) -> float:
        """The farthest corner's distance from the centre (a circle around the whole fence)."""
        return max(math.hypot(x, y) for x, y in zip(self._xs, self._ys, strict=True))

    def contains(self, x: float, y: float) -> bool:
        """Whether the projected point is inside the ring (even-odd rule)."""
        xs, ys = self._xs, self._ys
        inside = False
        j = len(xs) - 1
        for i in range(len(xs)):
            yi, yj = ys[i], ys[j]
            if (yi > y) != (yj > y) and x < (xs[j] - xs[i]) * (y - yi) / (yj - yi) + xs[i]:
                inside = not inside
            j = i
        return inside

    def distance2(self, x: float, y: float) -> float:
        """Squared distance in metres from the projected point to the ring's nearest edge."""
        xs, ys = self._xs, self._ys
        best = math.inf
        j = len(xs) - 1
        for i in range(len(xs)):
            ax, ay, bx, by = xs[j], ys[j], xs[i], ys[i]
            ex, ey = bx - ax, by - ay
            length2 = ex * ex + ey * ey
            t = ((x - ax) * ex + (y - ay) * ey) / length2 if length2 else 0.0
            t = 0.0 if t < 0.0 else min(t, 1.0)
            dx, dy = x - (ax + t * ex), y - (ay + t * ey)
            d2 = dx * dx + dy * dy
            best = min(best, d2)
            j = i
        return best

    def project(self, lat: float, lon: float) -> tuple[float, float]:
        """(x, y) metres east and north of the centre."""
        return _wrap(lon - self._lon0) * self._kx, (lat - self._lat0) * METRES_PER_DEGREE

    def zone(self, lat: float, lon: float, acc: float, margin: float) -> Zone:
        """Where a fix at (lat, lon) with accuracy `acc` is; `margin` is the exit hysteresis."""
        x = _wrap(lon - self._lon0) * self._kx
        y = (lat - self._lat0) * METRES_PER_DEGREE
        reach = margin + acc
        minx, miny, maxx, maxy = self._box
        if x < minx - reach or x > maxx + reach or y < miny - reach or y > maxy + reach:
            return _OUTSIDE
        if self.contains(x, y):
            return _INSIDE
        return _OUTSIDE if self.distance2(x, y) > reach * reach else _UNCERTAIN

    def bbox(self, margin_m: float) -> tuple[float, float, float, float]:
        """(south, west, north, east) of the fence grown by `margin_m`; east may exceed 180."""
        minx, miny, maxx, maxy = self._box
        south = self._lat0 + (miny - margin_m) / METRES_PER_DEGREE
        north = self._lat0 + (maxy + margin_m) / METRES_PER_DEGREE
        cos_min = math.cos(math.radians(min(89.9, max(abs(south), abs(north)))))
        per_degree = METRES_PER_DEGREE * cos_min
        west = max(self._lon0 + minx / self._kx - margin_m / per_degree, self._lon0 - 180.0)
        east = min(self._lon0 + maxx / self._kx + margin_m / per_degree, self._lon0 + 180.0)
        return south, west, north, east


Shape = Circle | Polygon


def _shoelace(xs: Sequence[float], ys: Sequence[float]) -> float:
    total = 0.0
    j = len(xs) - 1
    for i in range(len(xs)):
        total += (xs[j] + xs[i]) * (ys[j] - ys[i])
        j = i
    return total / 2.0


Point = tuple[float, float]


def _orientation(a: Point, b: Point, c: Point) -> int:
    value = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    return 0 if abs(value) < 1e-9 else (1 if value > 0 else -1)


def _on_segment(a: Point, b: Point, p: Point) -> bool:
    return min(a[0], b[0]) <= p[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= p[1] <= max(a[1], b[1])


def _segments_cross(first: tuple[Point, Point], second: tuple[Point, Point]) -> bool:
    a, b = first
    c, d = second
    o1, o2 = _orientation(a, b, c), _orientation(a, b, d)
    o3, o4 = _orientation(c, d, a), _orientation(c, d, b)
    if o1 != o2 and o3 != o4:
        return True
    return (
        (o1 == 0 and _on_segment(a, b, c))
        or (o2 == 0 and _on_segment(a, b, d))
        or (o3 == 0 and _on_segment(c, d, a))
        or (o4 == 0 and _on_segment(c, d, b))
    )


def _first_crossing(xs: Sequence[float], ys: Sequence[float]) -> tuple[int, int] | None:
    """The first pair of non-adjacent edges that touch or cross (edge i joins corner i, i+1)."""
    n = len(xs)
    edges = [((xs[i], ys[i]), (xs[(i + 1) % n], ys[(i + 1) % n])) for i in range(n)]
    boxes = [(min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1])) for a, b in edges]
    for i in range(n):
        bi = boxes[i]
        for j in range(i + 2, n):
            if i == 0 and j == n - 1:
                continue  # neighbours share a corner
            bj = boxes[j]
            if bi[2] < bj[0] or bj[2] < bi[0] or bi[3] < bj[1] or bj[3] < bi[1]:
                continue
            if _segments_cross(edges[i], edges[j]):
                return i, j
    return None


T = TypeVar("T")


class GridIndex(Generic[T]):
    """Sites by grid cell: the candidates a fix must be tested against.

    Each item is entered in every cell its box (south, west, north, east in degrees) touches;
    a lookup returns the items of the fix's cell. An item whose box would cover more than
    `MAX_CELLS_PER_SITE` cells is returned for every lookup instead.
    """

    def __init__(
        self,
        items: Iterable[tuple[T, tuple[float, float, float, float]]],
        *,
        cell_deg: float | None = None,
    ) -> None:
        """Index `items`: pairs of an item and its box.

        Args:
            items: (item, (south, west, north, east)); east may exceed 180 (wrapping).
            cell_deg: the cell size in degrees; by default about the median box height.
        """
        entries = list(items)
        if cell_deg is None:
            heights = sorted(north - south for _, (south, _, north, _) in entries)
            median = heights[len(heights) // 2] if heights else 0.01
            cell_deg = min(1.0, max(0.001, median))
        # Whole cells around the globe, so that longitudes wrap onto the same columns.
        self._columns = math.ceil(360.0 / cell_deg)
        self.cell_deg = 360.0 / self._columns
        self._inv = 1.0 / self.cell_deg
        cells: dict[int, list[T]] = {}
        always: list[T] = []
        for item, (south, west, north, east) in entries:
            row0, row1 = math.floor(south * self._inv), math.floor(north * self._inv)
            col0, col1 = math.floor(west * self._inv), math.floor(east * self._inv)
            if (row1 - row0 + 1) * (col1 - col0 + 1) > MAX_CELLS_PER_SITE:
                always.append(item)
                continue
            for row in range(row0, row1 + 1):
                for col in range(col0, col1 + 1):
                    cells.setdefault(row * self._columns + col % self._columns, []).append(item)
        self._always = tuple(always)
        self._cells: dict[int, tuple[T, ...]] = {
            key: tuple(found) + self._always for key, found in cells.items()
        }
        self.size = len(entries)

    @property
    def cells(self) -> int:
        """Cells holding at least one item."""
        return len(self._cells)

    @property
    def table(self) -> tuple[Mapping[int, tuple[T, ...]], int, float, tuple[T, ...]]:
        """(cells, columns, 1 / cell size, always): for callers that inline `candidates`."""
        return self._cells, self._columns, self._inv, self._always

    def candidates(self, lat: float, lon: float) -> tuple[T, ...]:
        """The items whose boxes may hold (lat, lon)."""
        columns, inv = self._columns, self._inv
        return self._cells.get(
            _floor(lat * inv) * columns + _floor(lon * inv) % columns, self._always
        )
