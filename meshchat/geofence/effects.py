"""The geofence worker's blocking side: the directory, signing, and the worker's files.

`WorkerFiles` runs on the worker's one thread: it reads a `DirectoryView` (sites, who may be
auto-joined, devices and their signing keys, OwnTracks keys, settings), holds the worker's
telemetry reader key and signs its certificate, applies due batches in the directory, and signs
the site roster and the notices of every batch that changed something (`AppliedBatch`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from meshchat.directory import Directory, Permission, Site, UserStatus, rbac
from meshchat.directory.policy import GEOFENCE_SERVICE, SERVICE_PREFIX
from meshchat.directory.signing import GEOFENCE_SIGNER, OrgKeys
from meshchat.e2ee import BoxKeyPair, Notice, NoticeKind, Roster, sign_notice
from meshchat.envelope import encode
from meshchat.errors import ConfigError
from meshchat.geofence.batch import Due
from meshchat.geofence.geometry import Circle, Polygon
from meshchat.geofence.rules import (
    DEFAULT_DWELL_S,
    DEFAULT_EXIT_DWELL_S,
    DEFAULT_HYSTERESIS_M,
    SiteRule,
)
from meshchat.geofence.store import (
    GeofenceStore,
    OwnTracksDevice,
    StoredSettings,
    owntracks_key_stamps,
    owntracks_keys,
)
from meshchat.topics import SITES_DEPARTMENT, GroupTopic, InboxTopic

__all__ = [
    "GEOFENCE_ACTOR",
    "AppliedBatch",
    "DirectoryView",
    "WorkerFiles",
    "site_rule",
    "site_timing",
]

logger = logging.getLogger(__name__)

GEOFENCE_ACTOR: Final = f"{SERVICE_PREFIX}{GEOFENCE_SERVICE}"
"""Who the audit log names for the worker's changes."""

_KeySource = tuple[tuple[OwnTracksDevice, ...], tuple[tuple[int, int, int] | None, ...]]
"""What the OwnTracks keys were read from: the devices' records and their key files' stamps."""


def site_timing(site: Site) -> dict[str, float]:
    """A site's dwell times and hysteresis, the defaults where none is set.

    The keys are `SiteRule`'s (``dwell_s``, ``exit_dwell_s``, ``hysteresis_m``); unlike
    `site_rule` it checks nothing, so a site the geofence leaves out can still be shown.
    """
    return {
        "dwell_s": DEFAULT_DWELL_S if site.dwell_s is None else site.dwell_s,
        "exit_dwell_s": DEFAULT_EXIT_DWELL_S if site.exit_dwell_s is None else site.exit_dwell_s,
        "hysteresis_m": DEFAULT_HYSTERESIS_M if site.hysteresis_m is None else site.hysteresis_m,
    }


def site_rule(site: Site) -> SiteRule:
    """The state machine's view of a directory site (default timing where none is set).

    Raises:
        ConfigError: the site's shape is not usable (a crossing polygon, a pole).
        ValueError: its timing is out of range.
    """
    shape: Circle | Polygon
    if site.polygon:
        shape = Polygon(site.polygon)
    elif site.lat is not None and site.lon is not None and site.radius_m is not None:
        shape = Circle(site.lat, site.lon, site.radius_m)
    else:
        raise ConfigError(f"site {site.name} has no shape")
    return SiteRule(site.name, shape, **site_timing(site))


@dataclass(frozen=True, slots=True)
class DirectoryView:
    """What the worker needs of the directory and its own file, read at one moment.

    Attributes:
        org: the org.
        sites: the sites by name.
        rules: the sites the geofence can use (a site with an unusable fence is left out).
        autojoin: active users whose role allows auto-join.
        device_owner: active devices and their owners (for GPS telemetry).
        presence: the members the geofence made, by site.
        owntracks: the registered OwnTracks devices.
        settings: the stored settings.
        keys: OwnTracks keys by (user, device).
        device_signing: active devices' Ed25519 keys (what their key records list), by name:
            key shares are verified against them.
    """

    org: str
    sites: Mapping[str, Site]
    rules: tuple[SiteRule, ...]
    autojoin: frozenset[str]
    device_owner: Mapping[str, str]
    presence: Mapping[str, frozenset[str]]
    owntracks: tuple[OwnTracksDevice, ...]
    settings: StoredSettings
    keys: Mapping[tuple[str, str], bytes] = field(repr=False)
    device_signing: Mapping[str, bytes] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class AppliedBatch:
    """One site's batch after it was written and signed.

    Attributes:
        site: the site.
        added: users added to its channel.
        removed: users removed from it.
        roster_topic: where the roster goes (retained).
        roster: the signed roster, encoded.
        notices: (inbox topic, encoded signed notice) for every device told.
    """

    site: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    roster_topic: str
    roster: bytes
    notices: tuple[tuple[str, bytes], ...]


class WorkerFiles:
    """The worker's blocking side: directory, key and file work, from one thread only."""

    def __init__(self, data: Path) -> None:
        """Open the org keys, the directory and ``geofence.db`` of a data directory.

        Raises:
            ConfigError: the org keys or the geofence key are missing.
            DirectoryError: the directory cannot be used.
        """
        self.data = data
        self.keys = OrgKeys.open(data)
        if not self.keys.has_geofence_key:
            raise ConfigError(
                f"the geofence worker needs its key {OrgKeys.keys_path(data)}/geofence.key"
            )
        # Devices seal their fixes-only telemetry key shares to it (made on first use).
        reader = self.keys.geofence_reader(create=True)
        assert reader is not None  # made when missing
        self.reader: BoxKeyPair = reader
        self.directory = Directory.in_data_dir(data)
        try:
            self.store = GeofenceStore.in_data_dir(data)
        except BaseException:
            self.directory.close()
            raise
        self.org = self.keys.org
        self.versions = (-1, -1)
        # Times the OwnTracks key files were read (the worker's stats show it).
        self.key_loads = 0
        self._keys: dict[tuple[str, str], bytes] = {}
        self._keys_read_from: _KeySource | None = None
        self._warned: set[str] = set()

    def close(self) -> None:
        """Close the files."""
        self.store.close()
        self.directory.close()

    def changed(self) -> bool:
        """Whether the directory or ``geofence.db`` changed since the last call.

        Call it before `view` (once per poll): what `view` reads then is the baseline for the
        next call, and a commit in between shows in it.
        """
        versions = (self.directory.data_version(), self.store.data_version())
        changed, self.versions = versions != self.versions, versions
        return changed

    def view(self) -> DirectoryView:
        """Read what the worker needs (OwnTracks keys only when they may have changed)."""
        directory = self.directory
        sites = {site.name: site for site in directory.sites()}
        rules = []
        for site in sites.values():
            try:
                rules.append(site_rule(site))
            except (ConfigError, ValueError) as exc:
                if site.name not in self._warned:  # once, not on every directory change
                    self._warned.add(site.name)
                    logger.warning("site %s is left out of the geofence: %s", site.name, exc)
        users = directory.users()
        devices = directory.devices()
        owntracks = tuple(self.store.owntracks_devices())
        return DirectoryView(
            org=self.org,
            sites=sites,
            rules=tuple(rules),
            autojoin=frozenset(u.name for u in users if rbac.can(u, Permission.SITE_AUTOJOIN)),
            device_owner={d.name: d.owner for d in devices if d.status is UserStatus.ACTIVE},
            presence=directory.site_presence(),
            owntracks=owntracks,
            settings=self.store.settings(),
            keys=self._owntracks_keys(owntracks),
            device_signing={
                d.name: d.signing_public
                for d in devices
                if d.status is UserStatus.ACTIVE and d.signing_public is not None
            },
        )

    def _owntracks_keys(
        self, devices: tuple[OwnTracksDevice, ...]
    ) -> Mapping[tuple[str, str], bytes]:
        """The devices' keys, read again only when their records or key files changed."""
        # The stamps before the read: a file written in between is read again next time.
        source = (devices, owntracks_key_stamps(self.data, devices))
        if source != self._keys_read_from:
            self._keys = owntracks_keys(self.data, list(devices))
            self._keys_read_from = source
            self.key_loads += 1
        return self._keys

    def reader_cert(self, now: float) -> bytes:
        """The reader key's certificate, signed by the geofence key (devices check it)."""
        return self.keys.reader_cert(self.reader, now)

    def apply(self, work: list[tuple[Due, frozenset[str]]], now: float) -> list[AppliedBatch]:
        """Write each due batch, sign the roster and the notices of the sites that changed."""
        applied = []
        for due, present in work:
            site = due.site
            added, removed = self.directory.set_site_presence(
                GEOFENCE_ACTOR, site, present, add=due.joins, remove=due.leaves
            )
            if not added and not removed:
                continue
            signed = self.keys.roster(
                self.directory, f"{SITES_DEPARTMENT}/{site}", now, signer=GEOFENCE_SIGNER
            )
            epoch = Roster.decode(signed.payload).epoch
            topic = GroupTopic.site(self.org, site)
            notices = [
                self._notice(topic, user, kind, epoch, now)
                for kind, users in ((NoticeKind.JOINED, added), (NoticeKind.LEFT, removed))
                for user in users
            ]
            applied.append(
                AppliedBatch(
                    site,
                    tuple(added),
                    tuple(removed),
                    topic.roster.topic,
                    encode(signed),
                    tuple(item for items in notices for item in items),
                )
            )
        return applied

    def _notice(
        self, topic: GroupTopic, user: str, kind: NoticeKind, epoch: int, now: float
    ) -> list[tuple[str, bytes]]:
        verb = "joined" if kind is NoticeKind.JOINED else "left"
        text = f"You {verb} the {topic.group} channel ({SITES_DEPARTMENT}/{topic.group})."
        out = []
        for device in self.directory.devices(owner=user):
            if device.status is not UserStatus.ACTIVE or not device.has_keys:
                continue
            notice = Notice(device.name, user, kind, topic.topic, epoch, int(now), text)
            signed = sign_notice(notice, self.keys.geofence_key, GEOFENCE_SIGNER)
            out.append((InboxTopic(self.org, device.name).topic, encode(signed)))
        return out

    def site_rosters(self, now: float) -> dict[str, bytes]:
        """Every site channel's signed roster (renewed when near expiry), by roster topic."""
        out = {}
        for site in self.directory.sites():
            signed = self.keys.roster(
                self.directory, f"{SITES_DEPARTMENT}/{site.name}", now, signer=GEOFENCE_SIGNER
            )
            out[GroupTopic.site(self.org, site.name).roster.topic] = encode(signed)
        return out
