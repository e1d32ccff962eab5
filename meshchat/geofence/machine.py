"""The geofence state machine (sans-IO): fixes in, who stands in which site out.

One `Tracker` follows every subject (a phone, a tracker: anything that reports fixes) against
every site. Per subject and site it keeps one small state, and the rules are those of DESIGN.md
section 6:

- a fix whose accuracy is worse than the site's radius says nothing about that site; a missing
  or non-positive accuracy counts as about 50 m (`rules.DEFAULT_ACCURACY_M`);
- a subject enters when its fixes put the centre inside the fence for `SiteRule.dwell_s`
  seconds in a row (the first such fix starts the dwell, a later one ends it); any fix whose
  centre is outside breaks the run;
- it leaves only when its fixes put the whole accuracy circle outside the fence grown by the
  hysteresis for `SiteRule.exit_dwell_s` seconds in a row; any other fix breaks that run;
- dwell is measured on the fixes' own timestamps, never on the clock of arrival.

A user is in a site while any of their subjects is. The result does not depend on the order in
which fixes arrive, as long as none arrives more than `reorder_window` seconds of fix time after
a newer one of the same subject: a subject keeps its fixes of that window, sorted, on top of a
checkpoint, and replays them when an older fix slips in. Fixes older than the checkpoint are
dropped (counted as late), an identical fix twice is dropped (a QoS 1 redelivery).

State is level-triggered: `Tracker.members` is who is in a site now, whatever the history of
edges; `SubjectState` is what to persist so that a restarted worker continues with exactly the
same memberships.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from meshchat.geofence.geometry import GridIndex, Zone
from meshchat.geofence.rules import (
    DEFAULT_ACCURACY_M,
    MAX_DWELL_S,
    Change,
    Fix,
    SiteRule,
    SubjectState,
)

__all__ = ["DEFAULT_REORDER_WINDOW_S", "MAX_PENDING_FIXES", "Tracker", "TrackerStats"]

DEFAULT_REORDER_WINDOW_S: Final = 300.0
MAX_PENDING_FIXES: Final = 64
"""Fixes a subject keeps for reordering; older ones are folded into its checkpoint."""

_floor: Final = math.floor
_INSIDE: Final = Zone.INSIDE
_OUTSIDE: Final = Zone.OUTSIDE
_EMPTY: Final[Mapping[str, Zone]] = MappingProxyType({})

Track = tuple[bool, float | None]
"""Per subject and site: (inside, start of the current dwell or None)."""


@dataclass(slots=True)
class TrackerStats:
    """Counters for logs, the simulator and benchmarks."""

    fixes: int = 0
    late: int = 0
    duplicates: int = 0
    reordered: int = 0


_Key = tuple[float, float, float, float]
_Candidate = tuple[str, float, Callable[[float, float, float, float], Zone], float]
"""A site as the grid index holds it: name, radius, its shape's zone test, hysteresis."""
_Entry = tuple[Fix, Mapping[str, Zone], Mapping[str, Track]]
"""A kept fix: the fix, its zones, and the subject's tracks after it."""
_NO_TRACKS: Final[Mapping[str, Track]] = MappingProxyType({})


class _Subject:
    __slots__ = ("base", "base_ts", "current", "owner", "pending")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.base: Mapping[str, Track] = _NO_TRACKS
        self.base_ts = -math.inf
        self.pending: list[_Entry] = []
        self.current: dict[str, Track] = {}


def _key(fix: Fix) -> _Key:
    return (fix.ts, fix.lat, fix.lon, -1.0 if fix.acc is None else fix.acc)


def _entry_key(entry: _Entry) -> _Key:
    return _key(entry[0])


def _inside(tracks: Mapping[str, Track]) -> frozenset[str]:
    return frozenset(name for name, (inside, _) in tracks.items() if inside)


def _step(track: Track | None, zone: Zone, ts: float, rule: SiteRule) -> Track | None:  # noqa: PLR0911  # a decision table returns at each rule
    """One subject's track at one site after one fix; None: no track (outside, not entering)."""
    if track is None:
        # Only a subject inside or on its way in has a track.
        if zone is not _INSIDE:
            return None
        return (True, None) if rule.dwell_s <= 0.0 else (False, ts)
    inside, since = track
    if not inside:
        if zone is not _INSIDE:
            return None  # the run of inside fixes is broken
        if since is not None and ts - since >= rule.dwell_s:
            return (True, None)
        return track
    if zone is _OUTSIDE:
        start = ts if since is None else since
        return None if ts - start >= rule.exit_dwell_s else (True, start)
    return track if since is None else (True, None)  # not wholly outside: start again


def _start(
    tracks: dict[str, Track], rules: Mapping[str, SiteRule], ts: float, near: Mapping[str, Zone]
) -> list[tuple[str, bool]] | None:
    """`_apply` for a subject with no track yet: only an inside fix does anything."""
    moved: list[tuple[str, bool]] | None = None
    for name, zone in near.items():
        rule = rules.get(name)
        if zone is _INSIDE and rule is not None:
            if rule.dwell_s > 0.0:
                tracks[name] = (False, ts)
            else:
                tracks[name] = (True, None)
                moved = moved or []
                moved.append((name, True))
    return moved


def _apply(
    tracks: dict[str, Track],
    rules: Mapping[str, SiteRule],
    ts: float,
    acc: float,
    near: Mapping[str, Zone],
) -> list[tuple[str, bool]] | None:
    """Advance one subject's tracks by one fix (`near`: zones that are not OUTSIDE/IGNORED).

    Returns the sites the subject entered (True) or left (False), or None when none.
    """
    if not tracks:
        return _start(tracks, rules, ts, near)
    moved: list[tuple[str, bool]] | None = None
    if not tracks.keys() <= near.keys():
        # Sites the subject is tracked at but the fix is not near: wholly outside, or ignored.
        far = [name for name in tracks if name not in near]
        moved = _outside(tracks, rules, ts, acc, far)
    for name, zone in near.items():
        old = tracks.get(name)
        if old is not None and old[0] and old[1] is None:
            continue  # inside and not wholly outside (near holds no OUTSIDE): nothing changes
        rule = rules.get(name)
        new = None if rule is None else _step(old, zone, ts, rule)
        if new is not None:
            tracks[name] = new
        elif old is not None:
            del tracks[name]
        entered = new is not None and new[0]
        if (old is not None and old[0]) != entered:
            moved = moved or []
            moved.append((name, entered))
    return moved


def _outside(
    tracks: dict[str, Track],
    rules: Mapping[str, SiteRule],
    ts: float,
    acc: float,
    far: list[str],
) -> list[tuple[str, bool]] | None:
    """`_apply` for tracked sites the fix is not near: wholly outside them, or ignored."""
    moved: list[tuple[str, bool]] | None = None
    for name in far:
        rule = rules.get(name)
        if rule is not None and acc > rule.radius_m:
            continue  # says nothing about this site
        old = tracks[name]
        new = None if rule is None else _step(old, _OUTSIDE, ts, rule)
        if new is not None:
            tracks[name] = new
            continue
        del tracks[name]
        if old[0]:
            moved = moved or []
            moved.append((name, False))
    return moved


class Tracker:
    """Every subject against every site; see the module docstring for the rules."""

    def __init__(
        self,
        sites: Iterable[SiteRule] = (),
        *,
        reorder_window: float = DEFAULT_REORDER_WINDOW_S,
        max_pending: int = MAX_PENDING_FIXES,
        cell_deg: float | None = None,
    ) -> None:
        """Start with no subjects.

        Args:
            sites: the sites.
            reorder_window: seconds of fix time within which late fixes are put in order.
            max_pending: fixes kept per subject for reordering, at most.
            cell_deg: the grid index's cell size in degrees (default: from the sites).
        """
        if not 0.0 <= reorder_window <= MAX_DWELL_S:
            raise ValueError(f"reorder window {reorder_window} is outside 0..{MAX_DWELL_S:g}")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.reorder_window = reorder_window
        self.max_pending = max_pending
        self._cell_deg = cell_deg
        self._rules: dict[str, SiteRule] = {}
        self._index: GridIndex[_Candidate] = GridIndex(())
        self._table = self._index.table
        self._subjects: dict[str, _Subject] = {}
        self._by_owner: dict[str, set[str]] = {}
        # site -> user -> how many of the user's subjects are inside
        self._members: dict[str, dict[str, int]] = {}
        self._dirty: set[str] = set()
        self.stats = TrackerStats()
        self.set_sites(sites)

    # ---------------------------------------------------------------------------- sites

    @property
    def sites(self) -> Mapping[str, SiteRule]:
        """The sites by name."""
        return MappingProxyType(self._rules)

    @property
    def index(self) -> GridIndex[_Candidate]:
        """The grid index over the sites: (name, radius, zone test, hysteresis) per cell."""
        return self._index

    def set_sites(self, sites: Iterable[SiteRule]) -> list[Change]:
        """Replace the sites and re-evaluate every subject's kept fixes against them.

        Subjects leave sites that are gone; a changed fence or timing applies to the fixes kept
        for reordering and to every fix after.
        """
        rules = {rule.name: rule for rule in sites}
        self._rules = rules
        self._index = GridIndex(
            (
                ((rule.name, rule.radius_m, rule.shape.zone, rule.hysteresis_m), rule.bbox())
                for rule in rules.values()
            ),
            cell_deg=self._cell_deg,
        )
        self._table = self._index.table
        changes: list[Change] = []
        for subject, state in self._subjects.items():
            state.base = {name: track for name, track in state.base.items() if name in rules}
            state.pending = [(fix, self._near_fix(fix), _NO_TRACKS) for fix, _, _ in state.pending]
            changes += self._recompute(state)
            self._dirty.add(subject)
        for site in list(self._members):
            if site not in rules:
                del self._members[site]
        return changes

    def _near(self, lat: float, lon: float, acc: float) -> Mapping[str, Zone]:
        cells, columns, inv, always = self._table
        candidates = cells.get(_floor(lat * inv) * columns + _floor(lon * inv) % columns, always)
        if not candidates:
            return _EMPTY
        near: dict[str, Zone] | None = None
        for name, radius, zone_of, margin in candidates:
            if acc > radius:
                continue
            zone = zone_of(lat, lon, acc, margin)
            if zone is not _OUTSIDE:
                if near is None:
                    near = {}
                near[name] = zone
        return _EMPTY if near is None else near

    def _near_fix(self, fix: Fix) -> Mapping[str, Zone]:
        return self._near(fix.lat, fix.lon, fix.accuracy)

    # ------------------------------------------------------------------------- subjects

    def observe(self, subject: str, owner: str, fix: Fix) -> list[Change]:  # noqa: C901, PLR0912  # the budget's hot path, inlined on purpose
        """Take one fix of `subject` (a device of `owner`); returns the users' changes."""
        # The hot path (the budget is 100,000 fixes a second against 10,000 sites): in-order
        # fixes of a known subject take no call but the zone tests and `_apply`.
        stats = self.stats
        stats.fixes += 1
        state = self._subjects.get(subject)
        if state is None or state.owner != owner:
            return self._first(subject, owner, fix)
        ts = fix.ts
        if ts <= state.base_ts:
            stats.late += 1
            return []
        lat, lon, acc = fix.lat, fix.lon, fix.acc
        accuracy = acc if acc is not None and acc > 0.0 else DEFAULT_ACCURACY_M
        # `_near`, inlined: the grid cell's sites, and the zones that are not OUTSIDE.
        cells, columns, inv, always = self._table
        near: Mapping[str, Zone] = _EMPTY
        candidates = cells.get(_floor(lat * inv) * columns + _floor(lon * inv) % columns, always)
        if candidates:
            found: dict[str, Zone] | None = None
            for name, radius, zone_of, margin in candidates:
                if accuracy <= radius:
                    zone = zone_of(lat, lon, accuracy, margin)
                    if zone is not _OUTSIDE:
                        if found is None:
                            found = {}
                        found[name] = zone
            if found is not None:
                near = found
        pending = state.pending
        if pending:
            last = pending[-1][0]
            if ts < last.ts or (ts == last.ts and _key(fix) <= _key(last)):
                return self._insert(subject, state, fix, near)
        current = state.current
        changes: list[Change] = []
        if current:
            moved = _apply(current, self._rules, ts, accuracy, near)
        elif near:
            moved = _start(current, self._rules, ts, near)
        else:
            moved = None
        if moved is not None:
            changes = self._moved(state.owner, moved, ts)
        pending.append((fix, near, dict(current) if current else _NO_TRACKS))
        if len(pending) > self.max_pending or pending[0][0].ts < ts - self.reorder_window:
            self._fold(state)
        self._dirty.add(subject)
        return changes

    def _first(self, subject: str, owner: str, fix: Fix) -> list[Change]:
        """A subject's first fix (or its first since it changed hands)."""
        changes = self.forget(subject) if subject in self._subjects else []
        self._add(subject, owner)
        self.stats.fixes -= 1  # counted again below
        return changes + self.observe(subject, owner, fix)

    def _insert(
        self, subject: str, state: _Subject, fix: Fix, near: Mapping[str, Zone]
    ) -> list[Change]:
        """A fix older than the newest kept one: put it in order and replay."""
        pending = state.pending
        key = _key(fix)
        at = bisect.bisect_left(pending, key, key=_entry_key)
        if at < len(pending) and _key(pending[at][0]) == key:
            self.stats.duplicates += 1
            return []
        pending.insert(at, (fix, near, _NO_TRACKS))
        self.stats.reordered += 1
        changes = self._recompute(state)
        self._fold(state)
        self._dirty.add(subject)
        return changes

    def _add(self, subject: str, owner: str) -> _Subject:
        state = _Subject(owner)
        self._subjects[subject] = state
        self._by_owner.setdefault(owner, set()).add(subject)
        return state

    def _fold(self, state: _Subject) -> None:
        pending = state.pending
        limit = pending[-1][0].ts - self.reorder_window
        while pending and (pending[0][0].ts < limit or len(pending) > self.max_pending):
            fix, _, after = pending.pop(0)
            state.base = after  # the tracks after the fix are the new checkpoint
            state.base_ts = fix.ts

    def _recompute(self, state: _Subject) -> list[Change]:
        before = _inside(state.current)
        current = dict(state.base)
        rules = self._rules
        replayed = []
        for fix, near, _ in state.pending:
            _apply(current, rules, fix.ts, fix.accuracy, near)
            replayed.append((fix, near, dict(current) if current else _NO_TRACKS))
        state.pending = replayed
        state.current = current
        last = replayed[-1][0].ts if replayed else state.base_ts
        return self._diff(state, before, _inside(current), last)

    def _diff(
        self, state: _Subject, before: frozenset[str], after: frozenset[str], ts: float
    ) -> list[Change]:
        if before == after:
            return []
        moved = [(site, True) for site in sorted(after - before)]
        moved += [(site, False) for site in sorted(before - after)]
        return self._moved(state.owner, moved, ts)

    def _moved(self, owner: str, moved: list[tuple[str, bool]], ts: float) -> list[Change]:
        """Count a subject's enters and leaves per user; a user's first in or last out counts."""
        changes = []
        for site, entered in moved:
            if entered:
                counts = self._members.setdefault(site, {})
                counts[owner] = counts.get(owner, 0) + 1
                if counts[owner] == 1:
                    changes.append(Change(owner, site, entered=True, ts=ts))
                continue
            counts = self._members.get(site, {})
            left = counts.get(owner, 0) - 1
            if left > 0:
                counts[owner] = left
                continue
            counts.pop(owner, None)
            if site in self._rules:
                changes.append(Change(owner, site, entered=False, ts=ts))
        return changes

    def forget(self, subject: str) -> list[Change]:
        """Drop a subject (its device was revoked); its user leaves where no other subject is."""
        state = self._subjects.pop(subject, None)
        if state is None:
            return []
        owned = self._by_owner.get(state.owner)
        if owned is not None:
            owned.discard(subject)
            if not owned:
                del self._by_owner[state.owner]
        self._dirty.add(subject)
        last = state.pending[-1][0].ts if state.pending else state.base_ts
        return self._diff(state, _inside(state.current), frozenset(), last)

    def seed(self, subject: str, owner: str, sites: Iterable[str]) -> list[Change]:
        """Start a subject that is believed inside `sites` (after its state was lost).

        It then leaves only the way any subject leaves: by fixes wholly outside for the exit
        dwell. A subject that already exists is left as it is.
        """
        if subject in self._subjects:
            return []
        state = self._add(subject, owner)
        state.base = {site: (True, None) for site in sites if site in self._rules}
        state.current = dict(state.base)
        self._dirty.add(subject)
        return self._diff(state, frozenset(), _inside(state.current), -math.inf)

    # ------------------------------------------------------------------------ questions

    def members(self, site: str) -> frozenset[str]:
        """The users inside `site` now."""
        return frozenset(self._members.get(site, ()))

    def membership(self) -> dict[str, frozenset[str]]:
        """The users inside each site (sites with nobody are left out)."""
        return {site: frozenset(users) for site, users in self._members.items() if users}

    def inside(self, subject: str) -> frozenset[str]:
        """The sites a subject is inside now."""
        state = self._subjects.get(subject)
        return frozenset() if state is None else _inside(state.current)

    def subjects(self, owner: str | None = None) -> frozenset[str]:
        """Every subject, or those of one user."""
        if owner is None:
            return frozenset(self._subjects)
        return frozenset(self._by_owner.get(owner, ()))

    def owner(self, subject: str) -> str | None:
        """The user a subject belongs to, if it is tracked."""
        state = self._subjects.get(subject)
        return None if state is None else state.owner

    def last_fix(self, subject: str) -> Fix | None:
        """The newest fix kept for a subject."""
        state = self._subjects.get(subject)
        return None if state is None or not state.pending else state.pending[-1][0]

    # ---------------------------------------------------------------------- persistence

    def take_dirty(self) -> set[str]:
        """Subjects changed (or forgotten) since the last call."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def export(self, subject: str) -> SubjectState | None:
        """A subject's state to persist, or None when it is not tracked (forget it)."""
        state = self._subjects.get(subject)
        if state is None:
            return None
        return SubjectState(
            owner=state.owner,
            base_ts=state.base_ts,
            tracks=tuple(
                (site, inside, since) for site, (inside, since) in sorted(state.base.items())
            ),
            fixes=tuple(entry[0] for entry in state.pending),
        )

    def restore(self, subject: str, saved: SubjectState) -> list[Change]:
        """Load a persisted subject; returns the users' changes (enters, after a restart)."""
        changes = self.forget(subject) if subject in self._subjects else []
        state = self._add(subject, saved.owner)
        state.base_ts = saved.base_ts
        state.base = {
            site: (inside, since) for site, inside, since in saved.tracks if site in self._rules
        }
        entries = {}
        for fix in saved.fixes:
            if fix.ts > saved.base_ts:
                entries[_key(fix)] = fix
        state.pending = [
            (fix, self._near_fix(fix), _NO_TRACKS) for _, fix in sorted(entries.items())
        ]
        changes += self._recompute(state)
        return changes
