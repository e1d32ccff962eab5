"""The geofence worker: fixes from MQTT in, site-channel memberships, rosters and notices out.

It subscribes to OwnTracks phones (``owntracks/+/+`` for locations, ``owntracks/+/+/event`` for
transitions) and, when given a decoder, to meshchat GPS telemetry (``mc/{org}/_t/+/gps``). Every
fix goes through the `Tracker`; each change (a user entered or left a site) waits in the
`Batcher`, and when a site's batch is due the worker, in one directory transaction per site:

1. makes the site channel's automatic members match who stands in the site (only users whose
   role allows auto-join; never removing a member an admin added);
2. re-signs the channel's roster with its site-scoped key and publishes it retained (the broker's
   ACL follows the directory; senders rotate when they see a member gone);
3. tells each of the user's devices in its inbox, with a `Notice` signed by the same key.

It is level-triggered: on start it loads the subjects it persisted in ``geofence.db`` and makes
every site channel match them; users it has no fix of at all keep what the directory says.

meshchat's own GPS telemetry (devices, `meshchat.device`): the worker is a reader of every
device's ``gps`` key only. On start it publishes its reader certificate retained on
``mc/{org}/_s/geofence`` (its X25519 key, signed by the geofence key the trust bundle
certifies; devices check it before they seal a key share to it), subscribes to the shares
devices leave on ``mc/{org}/_s/geofence/{device}`` (retained) and to ``mc/{org}/_t/+/gps``,
and opens both through a `GpsIntake` (`meshchat.geofence.gps`: signature checks against the
directory's device keys, a bounded wait for a fix whose share has not come, rotated keys). A
fix of a device registered to a person counts as that person's (subject ``device:{name}``); a
device account's own role may not be auto-joined, so its fixes change no channel. The keyring
is not persisted: after a restart the broker hands the retained shares back.

Two hooks remain for fixes decoded elsewhere: pass ``telemetry=`` a `TelemetryDecoder` (called
with the parsed topic and the raw payload; return a `Fix`, or None to drop it) to replace the
built-in reader, or call `GeofenceWorker.submit`.

All SQLite, signing and key-file work runs on one worker thread; the state machine runs on the
event loop (microseconds per fix).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from meshchat.device.telemetry import GEOFENCE_READER
from meshchat.errors import ConfigError, MeshchatError, TopicError
from meshchat.geofence.batch import Batcher, Due
from meshchat.geofence.effects import DirectoryView, WorkerFiles
from meshchat.geofence.gps import GpsIntake, Intake
from meshchat.geofence.machine import DEFAULT_REORDER_WINDOW_S, Tracker
from meshchat.geofence.owntracks import (
    LastWill,
    Location,
    OwnTracksError,
    Region,
    Transition,
    encrypt_payload,
    parse_payload,
    region_id,
    set_waypoints,
)
from meshchat.geofence.rules import Change, Fix
from meshchat.topics import (
    OWNTRACKS_PREFIX,
    PREFIX,
    OwnTracksTopic,
    ServiceTopic,
    TelemetryTopic,
    parse_topic,
)

if TYPE_CHECKING:
    from meshchat.client.transport import Transport

__all__ = ["GeofenceSettings", "GeofenceWorker", "TelemetryDecoder", "WorkerStats"]

logger = logging.getLogger(__name__)

RETRY_S: Final = 5.0
"""Seconds before a batch that could not be applied is tried again."""
TelemetryDecoder = Callable[[TelemetryTopic, bytes], Fix | None]
"""Turns one meshchat GPS telemetry payload into a fix (None drops it)."""
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class GeofenceSettings:
    """How the worker runs. None takes the value an admin stored (`meshchat geofence config`).

    Attributes:
        join_delay_s: seconds joins may wait, to go into one roster epoch.
        leave_delay_s: seconds leaves may wait, to go into one roster epoch (one key rotation).
        push_waypoints: send site regions to OwnTracks phones.
        reorder_window_s: seconds of fix time within which late fixes are still put in order.
        max_clock_skew_s: fixes dated further ahead of this machine's clock are refused.
        max_devices_per_user: devices (subjects) tracked per user; more are refused.
        persist_interval_s: seconds between writes of the subjects' state.
        poll_interval_s: seconds between checks for directory and settings changes.
        refresh_interval_s: seconds between re-publications of site rosters (before expiry).
    """

    join_delay_s: float | None = None
    leave_delay_s: float | None = None
    push_waypoints: bool | None = None
    reorder_window_s: float = DEFAULT_REORDER_WINDOW_S
    max_clock_skew_s: float = 300.0
    max_devices_per_user: int = 8
    persist_interval_s: float = 1.0
    poll_interval_s: float = 0.5
    refresh_interval_s: float = 3600.0


@dataclass(slots=True)
class WorkerStats:
    """What the worker did since it started (for logs, `status` and tests)."""

    messages: int = 0
    fixes: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    joins: int = 0
    leaves: int = 0
    notices: int = 0
    pushes: int = 0
    shares: int = 0
    """Telemetry key shares opened (devices' gps keys)."""
    parked: int = 0
    """Fixes that arrived before their key share (they wait, bounded, in the keyring)."""
    key_loads: int = 0
    """Reads of the OwnTracks key files (at start, then only when their records or files change)."""


class GeofenceWorker:
    """Runs the geofence over a transport; `run` until cancelled."""

    def __init__(
        self,
        data_path: Path,
        transport: Transport,
        *,
        settings: GeofenceSettings | None = None,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], Awaitable[object]] | None = None,
        telemetry: TelemetryDecoder | None = None,
    ) -> None:
        """Serve the sites of `data_path` through `transport` (already entered).

        Args:
            data_path: the data directory (directory, org keys, ``geofence.db``).
            transport: a connected transport allowed to read OwnTracks (and telemetry) topics,
                and to publish site rosters, inbox notices and OwnTracks commands.
            settings: how to run (None: defaults and the stored settings).
            clock: the wall clock (batching deadlines; fixes from the future are refused).
            on_change: awaited after memberships changed and before rosters and notices go
                out, so the broker's ACL lets a joined user read the channel when told.
            telemetry: decodes meshchat GPS telemetry; None leaves telemetry alone.
        """
        self.data_path = data_path
        self.transport = transport
        self.settings = settings or GeofenceSettings()
        self._clock = clock
        self._on_change = on_change
        self._telemetry = telemetry
        self._gps: GpsIntake | None = None
        self.tracker = Tracker(reorder_window=self.settings.reorder_window_s)
        self.batcher = Batcher()
        self.stats = WorkerStats()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="meshchat[geofence]")
        self._files: WorkerFiles | None = None
        self._view: DirectoryView | None = None
        self._presence: dict[str, frozenset[str]] = {}
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._pushed: set[tuple[str, str]] = set()
        self._waypoints: bytes | None = None
        self._published: dict[str, bytes] = {}
        self._flushed = asyncio.Condition()
        self._flush_count = 0
        self._progress = asyncio.Event()

    async def _run(self, func: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func)

    @property
    def view(self) -> DirectoryView:
        """The directory as last read."""
        if self._view is None:
            raise ConfigError("the geofence worker is not running")
        return self._view

    @property
    def telemetry_reader(self) -> GpsIntake | None:
        """The built-in reader of devices' GPS telemetry (None with a `TelemetryDecoder`)."""
        return self._gps

    async def wait_ready(self) -> None:
        """Wait (callers bound it with `asyncio.timeout`) until the worker subscribed."""
        await self._ready.wait()

    async def wait_for(self, predicate: Callable[[WorkerStats], bool]) -> WorkerStats:
        """Wait (bounded by the caller) until the stats satisfy `predicate` (tests, tools)."""
        while not predicate(self.stats):
            self._progress.clear()
            await self._progress.wait()
        return self.stats

    async def wait_flushed(self, count: int) -> int:
        """Wait until at least `count` batches were applied since start; returns the number."""
        async with self._flushed:
            await self._flushed.wait_for(lambda: self._flush_count >= count)
        return self._flush_count

    # ----------------------------------------------------------------------------- running

    async def run(self) -> None:
        """Serve until cancelled.

        Raises:
            ConfigError: the org keys or the geofence key are missing.
            DirectoryError: the directory cannot be used.
        """
        try:
            self._files = await self._run(functools.partial(WorkerFiles, self.data_path))
            files = self._files
            if self._telemetry is None:
                self._gps = GpsIntake(files.reader)
            await self._run(files.changed)  # the poller's baseline: what is read next
            view = await self._read_view(files)
            saved = await self._run(files.store.load_subjects)
            self._install(view)
            for subject, state in saved.items():
                if state.owner in view.autojoin:
                    self.tracker.restore(subject, state)
            self.tracker.take_dirty()
            # Level-triggered: make every channel match what the restored fixes say.
            for site in self.tracker.sites:
                self.batcher.note(site, entered=True, now=-math.inf)
                self.batcher.note(site, entered=False, now=-math.inf)
            await self._flush(self.batcher.due(self._clock()))
            await self._publish_rosters()
            await self.transport.subscribe(f"{OWNTRACKS_PREFIX}/+/+")
            await self.transport.subscribe(f"{OWNTRACKS_PREFIX}/+/+/event")
            if self._gps is not None:
                # The certificate first, so a device that reads it finds the worker listening.
                shares = ServiceTopic(view.org, GEOFENCE_READER).topic
                await self.transport.subscribe(f"{shares}/+")
                cert = await self._run(functools.partial(files.reader_cert, self._clock()))
                self._publish(shares, cert, retain=True)
            await self.transport.subscribe(f"{PREFIX}/{view.org}/_t/+/gps")
            self._push_all()
            self._ready.set()
            logger.info("geofence: %d sites, %d subjects restored", len(view.rules), len(saved))
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._flusher(), name="meshchat[geofence].flush")
                tasks.create_task(self._persister(), name="meshchat[geofence].persist")
                tasks.create_task(self._poller(), name="meshchat[geofence].poll")
                tasks.create_task(self._refresher(), name="meshchat[geofence].refresh")
                async for message in self.transport.messages():
                    self._handle(message.topic, message.payload)
                    self._progress.set()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        files, self._files = self._files, None
        try:
            if files is not None:
                with contextlib.suppress(MeshchatError):
                    await self._save(files)
                await self._run(files.close)
        finally:
            self._executor.shutdown(wait=False)

    async def _read_view(self, files: WorkerFiles) -> DirectoryView:
        view = await self._run(files.view)
        self.stats.key_loads = files.key_loads
        return view

    def _install(self, view: DirectoryView) -> None:
        before = self._view
        was_pushing = before is not None and self._push_enabled()
        self._view = view
        self._waypoints = None  # the regions may have changed: built again on the next push
        self._presence = dict(view.presence)
        stored = view.settings
        chosen = self.settings
        self.batcher.join_delay = (
            stored.join_delay_s if chosen.join_delay_s is None else chosen.join_delay_s
        )
        self.batcher.leave_delay = (
            stored.leave_delay_s if chosen.leave_delay_s is None else chosen.leave_delay_s
        )
        now = self._clock()
        sites_changed = before is None or before.rules != view.rules
        if sites_changed:
            self._note(self.tracker.set_sites(view.rules), now)
        # Phones get the regions again when the sites change or pushing was just turned on.
        if before is not None and (sites_changed or not was_pushing):
            self._pushed.clear()
            self._push_all()
        # Users who may no longer be auto-joined: forget their devices, empty their channels.
        for subject in self.tracker.subjects():
            owner = self.tracker.owner(subject)
            if owner is not None and owner not in view.autojoin:
                self._note(self.tracker.forget(subject), now)
        for site, users in view.presence.items():
            if users - view.autojoin:
                self.batcher.note(site, entered=False, now=now)
        if self._gps is not None:
            self._take(self._gps.directory_changed(view.device_signing))
        self._wake.set()
        self._progress.set()

    def _note(self, changes: list[Change], now: float) -> None:
        for change in changes:
            self.batcher.note(change.site, entered=change.entered, now=now)
        if changes:
            self._wake.set()

    # ------------------------------------------------------------------------------ input

    def _refuse(self, reason: str) -> None:
        self.stats.refused[reason] += 1

    def _handle(self, topic: str, payload: bytes) -> None:
        self.stats.messages += 1
        try:
            parsed = parse_topic(topic)
        except TopicError:
            self._refuse("bad-topic")
            return
        if isinstance(parsed, OwnTracksTopic):
            if parsed.suffix in {None, "event"}:
                self._owntracks(topic, payload)
            return
        if isinstance(parsed, ServiceTopic | TelemetryTopic) and parsed.org == self.view.org:
            if self._gps is not None:
                self._telemetry_message(self._gps, parsed, payload)
            elif isinstance(parsed, TelemetryTopic) and parsed.kind == "gps":
                self._decode_hook(parsed, payload)

    def _telemetry_message(
        self, gps: GpsIntake, parsed: ServiceTopic | TelemetryTopic, payload: bytes
    ) -> None:
        """A key share or a fix for the built-in telemetry reader."""
        if isinstance(parsed, ServiceTopic):
            if parsed.service == GEOFENCE_READER and parsed.requester and not parsed.reply:
                self._take(gps.share(parsed.requester, payload))
        elif parsed.kind == "gps":
            dropped = gps.dropped
            self._take(gps.fix(parsed, payload))
            if gps.dropped > dropped:
                self.stats.refused["no-key"] += gps.dropped - dropped

    def _decode_hook(self, parsed: TelemetryTopic, payload: bytes) -> None:
        """A fix for the `TelemetryDecoder` the worker was given instead."""
        assert self._telemetry is not None
        if parsed.device not in self.view.device_owner:
            self._refuse("unknown-device")  # before decoding: a stranger's fix costs nothing
            return
        try:
            fix = self._telemetry(parsed, payload)
        except Exception as exc:  # noqa: BLE001  # a decoder's bug must not stop the worker
            logger.debug("dropped telemetry of %s: %s", parsed.device, exc)
            self._refuse("bad-telemetry")
            return
        if fix is not None:
            self._device_fix(parsed.device, fix)

    def _take(self, intake: Intake) -> None:
        """Count what the telemetry reader made of one message; submit its fixes."""
        if intake.refused is not None:
            self._refuse(intake.refused)
            return
        self.stats.shares += intake.shares
        if intake.parked:
            self.stats.parked += 1
        for device, fix in intake.fixes:
            self._device_fix(device, fix)

    def _device_fix(self, device: str, fix: Fix) -> None:
        """A device's fix counts for its owner (a person), or for itself (a device account)."""
        owner = self.view.device_owner.get(device)
        if owner is None:
            self._refuse("unknown-device")
            return
        self.submit(f"device:{device}", owner, fix)

    def _owntracks(self, topic: str, payload: bytes) -> None:
        keys = self.view.keys
        try:
            message = parse_payload(payload, topic, keys=lambda u, d: keys.get((u, d)))
        except OwnTracksError as exc:
            logger.debug("refused an OwnTracks message on %s: %s", topic, exc)
            self._refuse(exc.reason)
            return
        match message:
            case Location(fix=fix) | Transition(fix=fix) if fix is not None:
                subject = f"{OWNTRACKS_PREFIX}/{message.user}/{message.device}"
                if self.submit(subject, message.user, fix) is not None:
                    self._push_first(message.user, message.device)
            case Location() | Transition():
                self._refuse("no-fix")
            case LastWill():
                pass  # the phone went offline: it says nothing about where it is
            case _:
                pass

    def submit(self, subject: str, owner: str, fix: Fix) -> list[Change] | None:
        """The decoded-fix hook: take one fix of `subject` (a device of the user `owner`).

        Returns the changes it caused, or None when the fix was refused (the owner may not be
        auto-joined, the fix is from the future, or the owner has too many devices).
        """
        view = self.view
        if owner not in view.autojoin:
            self._refuse("no-auto-join")
            return None
        now = self._clock()
        if fix.ts > now + self.settings.max_clock_skew_s:
            self._refuse("future")
            return None
        if self.tracker.owner(subject) is None:
            if len(self.tracker.subjects(owner)) >= self.settings.max_devices_per_user:
                self._refuse("too-many-devices")
                return None
            # A device seen for the first time (or whose state was lost) starts from what the
            # directory says: it then leaves only by fixes wholly outside, after the exit dwell.
            believed = [site for site, users in self._presence.items() if owner in users]
            self._note(self.tracker.seed(subject, owner, believed), now)
        self.stats.fixes += 1
        changes = self.tracker.observe(subject, owner, fix)
        self._note(changes, now)
        return changes

    # ----------------------------------------------------------------------------- output

    def _present(self, site: str) -> frozenset[str]:
        present = set(self.tracker.members(site))
        # Users the worker has no fix of at all keep what the directory says.
        present |= {u for u in self._presence.get(site, ()) if not self.tracker.subjects(u)}
        return frozenset(present)

    async def _flusher(self) -> None:
        while True:
            due_at = self.batcher.next_due()
            delay = None if due_at is None else max(0.0, due_at - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            due = self.batcher.due(self._clock())
            if due:
                await self._flush(due)

    async def _flush(self, due: list[Due]) -> None:
        files = self._files
        assert files is not None
        work = [(item, self._present(item.site)) for item in due if item.site in self.tracker.sites]
        now = self._clock()
        try:
            applied = await self._run(functools.partial(files.apply, work, now))
        except MeshchatError:
            logger.exception("geofence: could not apply a batch; it is retried")
            retry = now + RETRY_S  # a locked or broken file: not in a tight loop
            for item, _ in work:
                if item.joins:
                    self.batcher.note(item.site, entered=True, now=retry)
                if item.leaves:
                    self.batcher.note(item.site, entered=False, now=retry)
            return
        for batch in applied:
            present = set(self._presence.get(batch.site, ())) | set(batch.added)
            self._presence[batch.site] = frozenset(present - set(batch.removed))
            self.stats.batches += 1
            self.stats.joins += len(batch.added)
            self.stats.leaves += len(batch.removed)
            logger.info(
                "site %s: joined %s, left %s",
                batch.site,
                ", ".join(batch.added) or "-",
                ", ".join(batch.removed) or "-",
            )
        if applied and self._on_change is not None:
            await self._on_change()
        for batch in applied:
            self._publish(batch.roster_topic, batch.roster, retain=True)
            self._published[batch.roster_topic] = batch.roster
            for topic, payload in batch.notices:
                self._publish(topic, payload)
                self.stats.notices += 1
        async with self._flushed:
            self._flush_count += len(applied)
            self._flushed.notify_all()
        self._progress.set()

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        try:
            self.transport.publish_nowait(topic, payload, retain=retain)
        except MeshchatError as exc:
            logger.warning("geofence: could not queue %s: %s", topic, exc)

    async def _publish_rosters(self) -> None:
        files = self._files
        assert files is not None
        rosters = await self._run(functools.partial(files.site_rosters, self._clock()))
        for topic, payload in rosters.items():
            if self._published.get(topic) != payload:
                self._publish(topic, payload, retain=True)
                self._published[topic] = payload

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval_s)
            try:
                await self._publish_rosters()
            except MeshchatError:
                logger.exception("geofence: could not refresh the site rosters")

    async def _persister(self) -> None:
        files = self._files
        assert files is not None
        while True:
            await asyncio.sleep(self.settings.persist_interval_s)
            try:
                await self._save(files)
            except MeshchatError:
                logger.exception("geofence: could not save the subjects' state")

    async def _save(self, files: WorkerFiles) -> None:
        dirty = self.tracker.take_dirty()
        if dirty:
            states = {subject: self.tracker.export(subject) for subject in dirty}
            await self._run(functools.partial(files.store.save_subjects, states))

    async def _poller(self) -> None:
        files = self._files
        assert files is not None
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                if await self._run(files.changed):
                    self._install(await self._read_view(files))
            except MeshchatError:
                logger.exception("geofence: could not read the directory; keeping the last view")

    # ---------------------------------------------------------------- OwnTracks regions

    def _push_enabled(self) -> bool:
        chosen = self.settings.push_waypoints
        return self.view.settings.push_waypoints if chosen is None else chosen

    def _regions(self) -> list[Region]:
        regions = []
        for rule in self.tracker.sites.values():
            site = self.view.sites.get(rule.name)
            lat, lon = rule.shape.centre
            regions.append(
                Region(
                    rule.name,
                    lat,
                    lon,
                    rule.shape.reach_m,
                    int(site.created_at) if site is not None else 0,
                    region_id(rule.name),
                )
            )
        return regions

    def _waypoints_command(self) -> bytes:
        """The regions' ``setWaypoints`` command, built once for every phone it goes to."""
        if self._waypoints is None:
            self._waypoints = set_waypoints(self._regions())
        return self._waypoints

    def _push(self, user: str, device: str) -> None:
        payload = self._waypoints_command()
        key = self.view.keys.get((user, device))
        if key is not None:
            payload = encrypt_payload(key, payload)
        # Retained: a phone that connects for the first time later still gets the regions.
        self._publish(OwnTracksTopic(user, device, "cmd").topic, payload, retain=True)
        self._pushed.add((user, device))
        self.stats.pushes += 1

    def _push_first(self, user: str, device: str) -> None:
        if self._push_enabled() and (user, device) not in self._pushed:
            self._push(user, device)

    def _push_all(self) -> None:
        if not self._push_enabled():
            return
        devices = {(d.user, d.device) for d in self.view.owntracks}
        for subject in self.tracker.subjects():
            parts = subject.split("/")
            if len(parts) == 3 and parts[0] == OWNTRACKS_PREFIX:
                devices.add((parts[1], parts[2]))
        for user, device in sorted(devices):
            if user in self.view.autojoin:
                self._push(user, device)
