"""Sites: the geofences, and the channel ``sites/NAME`` whose members the geofence keeps.

`SitesMixin` is one of the domain mixins that make up `meshchat.directory.store.Directory`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, Literal

from meshchat.directory import rbac
from meshchat.directory._core import DirectoryCore
from meshchat.directory._groups import DEFAULT_POST_ROLES
from meshchat.directory.model import GroupKind, Permission, Site, User
from meshchat.errors import AlreadyExistsError, DirectoryError, NotFoundError
from meshchat.topics import SITES_DEPARTMENT, validate_name

__all__: list[str] = []  # internal: `meshchat.directory.store.Directory` is the public face

GEOFENCE_VIA: Final = "geofence"
"""``members.via`` of the site-channel memberships the geofence worker made."""
MAX_SITE_LATITUDE: Final = 85.0
"""The geofence's local projection serves sites between 85 degrees south and north."""
MAX_SITE_CORNERS: Final = 1000
MAX_SITE_DWELL_S: Final = 86_400.0
MAX_SITE_HYSTERESIS_M: Final = 10_000.0


class SitesMixin(DirectoryCore):
    """Sites of `Directory`, their channels and the geofence's presence in them."""

    if TYPE_CHECKING:  # what this domain uses of the others; `Directory` brings them together

        def users(self, *, dept: str | None = None, include_revoked: bool = False) -> list[User]:
            """Users by name (`UsersMixin.users`)."""

        def _actor(self, name: str) -> User: ...

        def _group_row(self, dept: str, name: str) -> dict[str, Any] | None: ...

        def _insert_group(self, actor: str, dept: str, name: str, **policy: Any) -> None: ...  # noqa: ANN401  # column values

    @staticmethod
    def _check_site_timing(
        dwell_s: float | None, exit_dwell_s: float | None, hysteresis_m: float | None
    ) -> None:
        for what, value, top in (
            ("dwell", dwell_s, MAX_SITE_DWELL_S),
            ("exit dwell", exit_dwell_s, MAX_SITE_DWELL_S),
            ("hysteresis", hysteresis_m, MAX_SITE_HYSTERESIS_M),
        ):
            if value is not None and not 0 <= value <= top:
                raise DirectoryError(f"the {what} must be between 0 and {top:,g}")

    def add_site(
        self,
        actor: str,
        name: str,
        *,
        lat: float | None = None,
        lon: float | None = None,
        radius_m: float | None = None,
        polygon: list[tuple[float, float]] | None = None,
        dwell_s: float | None = None,
        exit_dwell_s: float | None = None,
        hysteresis_m: float | None = None,
    ) -> Site:
        """Add a site (a circle or a polygon of (lat, lon) points) and its channel group.

        Args:
            actor: who adds it.
            name: the site's name; its channel is ``sites/{name}``.
            lat: a circle's centre latitude.
            lon: a circle's centre longitude.
            radius_m: a circle's radius in metres.
            polygon: or the corners of a polygon, as (lat, lon).
            dwell_s: seconds inside before the geofence adds someone (None: its default).
            exit_dwell_s: seconds wholly outside before it removes them (None: its default).
            hysteresis_m: metres the fence grows by for the exit test (None: its default).

        Raises:
            PermissionDeniedError: `actor` lacks ``site.manage``.
            DirectoryError: neither or both shapes, coordinates or timing out of range.
        """
        validate_name(name, "site name")
        circle = lat is not None and lon is not None and radius_m is not None
        if circle == (polygon is not None):
            raise DirectoryError("a site is a circle (--lat, --lon, --radius) or a polygon")
        points = [(lat, lon)] if circle else list(polygon or [])
        for point_lat, point_lon in points:
            assert point_lat is not None
            assert point_lon is not None
            if not (-90 <= point_lat <= 90 and -180 <= point_lon <= 180):
                raise DirectoryError(f"coordinates ({point_lat}, {point_lon}) are out of range")
            if abs(point_lat) > MAX_SITE_LATITUDE:
                raise DirectoryError(
                    f"latitude {point_lat} is beyond {MAX_SITE_LATITUDE:g} degrees: sites must "
                    f"lie between {MAX_SITE_LATITUDE:g} S and {MAX_SITE_LATITUDE:g} N"
                )
        if circle and not (radius_m is not None and 0 < radius_m <= 100_000):
            raise DirectoryError("the radius must be between 0 and 100,000 metres")
        if polygon is not None and not 3 <= len(polygon) <= MAX_SITE_CORNERS:
            raise DirectoryError(f"a polygon needs 3 to {MAX_SITE_CORNERS} points")
        self._check_site_timing(dwell_s, exit_dwell_s, hysteresis_m)
        timing = {"dwell_s": dwell_s, "exit_dwell_s": exit_dwell_s, "hysteresis_m": hysteresis_m}
        with self._write():
            rbac.require(self._actor(actor), Permission.SITE_MANAGE)
            if list(self.db.table("sites").rows_where("name = ?", [name])):
                raise AlreadyExistsError(f"site {name!r} already exists")
            self.db.table("sites").insert(
                {
                    "name": name,
                    "lat": lat,
                    "lon": lon,
                    "radius_m": radius_m,
                    "polygon": json.dumps(polygon) if polygon is not None else None,
                    "created_at": float(self._clock()),
                    **timing,
                }
            )
            given = {key: value for key, value in timing.items() if value is not None}
            self._audit(actor, "site.add", name, circle=circle, **given)
            # A site removed earlier left its (empty) channel: the channel comes back, and its
            # roster's epochs go on from where they were (clients refuse a rollback).
            if self._group_row(SITES_DEPARTMENT, name) is None:
                self._insert_group(
                    actor,
                    SITES_DEPARTMENT,
                    name,
                    kind=GroupKind.PUBLIC,
                    expires_at=None,
                    retention_days=None,
                    compliance=False,
                    announcement=False,
                    post_roles=DEFAULT_POST_ROLES,
                )
        return self.site(name)

    def remove_site(self, actor: str, name: str) -> list[str]:
        """Remove a site: its fence and every member of its channel, in one transaction.

        The channel group ``sites/{name}`` stays, empty, with a key rotation pending: its next
        roster (signed by the geofence key, as every site roster) lists nobody, so the broker
        lets nobody read or post there and every sender's old key is retired; its history
        stays in the archive under its retention. Adding the site again brings the channel
        back. The geofence worker drops the site when it next reads the directory.

        Returns:
            The users who were in the channel (geofence-made and admin-made memberships).

        Raises:
            PermissionDeniedError: `actor` lacks ``site.manage``.
            NotFoundError: no such site.
        """
        with self._write():
            rbac.require(self._actor(actor), Permission.SITE_MANAGE)
            self.site(name)
            row = self._group_row(SITES_DEPARTMENT, name)
            members: list[str] = []
            if row is not None:
                members = sorted(
                    user
                    for (user,) in self.db.conn.execute(
                        "SELECT user FROM members WHERE group_id = ?", (row["id"],)
                    )
                )
                self.db.conn.execute("DELETE FROM members WHERE group_id = ?", (row["id"],))
                if members:
                    self.db.conn.execute(
                        "UPDATE groups SET rotation_pending = 1 WHERE id = ?", (row["id"],)
                    )
            self.db.conn.execute("DELETE FROM sites WHERE name = ?", (name,))
            self._audit(actor, "site.remove", name, members=members)
        return members

    def set_site(
        self,
        actor: str,
        name: str,
        *,
        dwell_s: float | Literal["keep"] | None = "keep",
        exit_dwell_s: float | Literal["keep"] | None = "keep",
        hysteresis_m: float | Literal["keep"] | None = "keep",
    ) -> Site:
        """Change a site's geofence timing; None goes back to the default, "keep" leaves it.

        Raises:
            PermissionDeniedError: `actor` lacks ``site.manage``.
            NotFoundError: no such site.
            DirectoryError: a value is out of range.
        """
        wanted = {"dwell_s": dwell_s, "exit_dwell_s": exit_dwell_s, "hysteresis_m": hysteresis_m}
        changes = {key: value for key, value in wanted.items() if value != "keep"}
        self._check_site_timing(
            *(None if isinstance(v, str) else v for v in wanted.values())  # "keep" is checked
        )
        with self._write():
            rbac.require(self._actor(actor), Permission.SITE_MANAGE)
            before = self.site(name)
            changes = {k: v for k, v in changes.items() if getattr(before, k) != v}
            if changes:
                self.db.table("sites").update(name, changes)
                self._audit(actor, "site.set", name, **changes)
        return self.site(name)

    def site(self, name: str) -> Site:
        """One site.

        Raises:
            NotFoundError: no such site.
        """
        rows = list(self.db.table("sites").rows_where("name = ?", [name]))
        if not rows:
            raise NotFoundError(f"no site {name!r}")
        return self._to_site(rows[0])

    @staticmethod
    def _to_site(row: dict[str, Any]) -> Site:
        polygon = json.loads(row["polygon"]) if row["polygon"] else None
        return Site(
            name=row["name"],
            lat=row["lat"],
            lon=row["lon"],
            radius_m=row["radius_m"],
            polygon=tuple((float(a), float(b)) for a, b in polygon) if polygon else None,
            created_at=row["created_at"],
            dwell_s=row.get("dwell_s"),
            exit_dwell_s=row.get("exit_dwell_s"),
            hysteresis_m=row.get("hysteresis_m"),
        )

    def sites(self) -> list[Site]:
        """Every site, by name."""
        return [self._to_site(row) for row in self.db.table("sites").rows_where(order_by="name")]

    def site_presence(self) -> dict[str, frozenset[str]]:
        """The users the geofence worker put in each site channel (not an admin), by site."""
        rows = self.db.conn.execute(
            "SELECT g.name, m.user FROM members m JOIN groups g ON g.id = m.group_id "
            "WHERE g.dept = ? AND m.via = ?",
            (SITES_DEPARTMENT, GEOFENCE_VIA),
        ).fetchall()
        found: dict[str, set[str]] = {}
        for site, user in rows:
            found.setdefault(site, set()).add(user)
        return {site: frozenset(users) for site, users in found.items()}

    def set_site_presence(
        self,
        actor: str,
        site: str,
        present: Iterable[str],
        *,
        add: bool = True,
        remove: bool = True,
    ) -> tuple[list[str], list[str]]:
        """The geofence worker's write: make a site channel's automatic members `present`.

        Only users whose role holds ``site.auto-join`` (and who are active) are added; only
        memberships the geofence made are removed, never one an admin made. A removal marks the
        channel for key rotation. One transaction and one audit row (``site.presence``) per call,
        so one roster epoch per batch.

        Args:
            actor: the service acting (``svc.geofence``); not checked against RBAC.
            site: the site.
            present: the users the geofence sees inside the site now.
            add: add those not in the channel yet.
            remove: remove the geofence's members who are not present.

        Returns:
            (added, removed) user names, sorted.

        Raises:
            NotFoundError: no such site.
        """
        wanted = set(present)
        with self._write():
            self.site(site)
            row = self._group_row(SITES_DEPARTMENT, site)
            if row is None:
                raise NotFoundError(f"site {site!r} has no channel")
            members = dict(
                self.db.conn.execute(
                    "SELECT user, via FROM members WHERE group_id = ?", (row["id"],)
                ).fetchall()
            )
            allowed = {
                user.name
                for user in self.users()
                if user.name in wanted and rbac.can(user, Permission.SITE_AUTOJOIN)
            }
            added = sorted(allowed - members.keys()) if add else []
            removed = (
                sorted(u for u, via in members.items() if via == GEOFENCE_VIA and u not in allowed)
                if remove
                else []
            )
            now = float(self._clock())
            self.db.conn.executemany(
                "INSERT INTO members (group_id, user, added_at, via) VALUES (?, ?, ?, ?)",
                [(row["id"], user, now, GEOFENCE_VIA) for user in added],
            )
            self.db.conn.executemany(
                "DELETE FROM members WHERE group_id = ? AND user = ?",
                [(row["id"], user) for user in removed],
            )
            if removed:
                self.db.conn.execute(
                    "UPDATE groups SET rotation_pending = 1 WHERE id = ?", (row["id"],)
                )
            if added or removed:
                self._audit(actor, "site.presence", site, joined=added, left=removed)
        return added, removed
