"""`meshchat device simulate`: a fleet of simulated devices on the real SDK, for demos and load.

Run on the server (it provisions its device accounts there): ``sim-1`` to ``sim-N`` in the
department ``sim`` by default, dispatch group ``sim/dispatch``, credential files in
``DATA/devices`` (made once, reused on the next run). Each device is a real `Device` (its own
paho connection and thread) driving a `SimulatedVehicle` around a site (its centre and radius,
or a default point): every interval it publishes a noisy GPS fix, every minute a status, and
it accepts every work order at once and reports it done after a while. Blocking: it runs until
its duration passes or `stop` is set.

Only admins and people of the devices' own department may read their telemetry at the broker
(the access policy's rule), so watch a simulation as an admin, or pass the dispatchers'
department with ``dept``. Many simulated devices in one dispatch group each follow every
member's key record when they start (they cannot tell people from devices before): N devices
cost N x N retained records once. Use a few dozen for demos; the device benchmark measures
1,000 devices without the SDK.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from meshchat.device import Device, DeviceCredentials, Order, SimulatedVehicle
from meshchat.directory import Directory
from meshchat.errors import AuthenticationError, MeshchatError, NotFoundError
from meshchat.fleet.provision import add_device

__all__ = ["DEFAULT_CENTRE", "SimulationStats", "run_simulation", "site_area"]

logger = logging.getLogger(__name__)

DEFAULT_CENTRE: Final = (48.137, 11.575)
DEFAULT_RADIUS_M: Final = 2000.0
STATUS_EVERY_S: Final = 60.0
ACCOUNT_GRACE_S: Final = 10.0
"""How long a refused new account is retried while the server takes it in."""


@dataclass(slots=True)
class SimulationStats:
    """What a simulation did (it changes while it runs)."""

    devices: int = 0
    online: int = 0
    fixes: int = 0
    statuses: int = 0
    orders: int = 0
    done: int = 0
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)


def site_area(directory: Directory, site: str | None) -> tuple[tuple[float, float], float]:
    """(centre, radius in metres) of a site, or of the default area without one.

    Raises:
        NotFoundError: no such site.
    """
    if site is None:
        return DEFAULT_CENTRE, DEFAULT_RADIUS_M
    found = directory.site(site)
    if found.lat is not None and found.lon is not None and found.radius_m is not None:
        return (found.lat, found.lon), found.radius_m
    corners = found.polygon or ()
    if not corners:
        raise NotFoundError(f"site {site!r} has no shape")
    lat = sum(c[0] for c in corners) / len(corners)
    lon = sum(c[1] for c in corners) / len(corners)
    scale = math.cos(math.radians(lat))
    radius = max(
        math.hypot((c[0] - lat) * 111_320, (c[1] - lon) * 111_320 * scale) for c in corners
    )
    return (lat, lon), radius


def _credentials(
    directory: Directory,
    data_path: Path,
    *,
    actor: str,
    name: str,
    dept: str,
    group: str,
    broker: str,
) -> Path:
    path = data_path / "devices" / f"{name}.json"
    if path.exists():
        return path
    try:
        directory.user(name)
    except NotFoundError:
        add_device(
            directory,
            data_path,
            actor=actor,
            name=name,
            dept=dept,
            kind="vehicle",
            broker=broker,
            out=path,
            group=group,
        )
        return path
    raise MeshchatError(
        f"{name} exists but {path} does not: remove it (`meshchat device remove {name}`) or "
        "choose another --prefix"
    )


def run_simulation(
    directory: Directory,
    data_path: Path,
    *,
    actor: str,
    count: int,
    broker: str,
    site: str | None = None,
    dept: str = "sim",
    prefix: str = "sim",
    interval: float = 5.0,
    duration: float | None = None,
    work_s: float = 30.0,
    stop: threading.Event | None = None,
    progress: Callable[[SimulationStats], object] | None = None,
    seed: int | None = None,
) -> SimulationStats:
    """Provision (once) and run `count` simulated devices until `duration` or `stop`.

    Args:
        directory: the org directory (device accounts are added to it when missing).
        data_path: the data directory (org keys; credential files in ``devices/``).
        actor: the admin who adds the accounts.
        count: how many devices.
        broker: the broker URL they connect to.
        site: drive around this site (default: a point in Munich, 2 km around).
        dept: their department (their dispatch group is ``DEPT/dispatch``).
        prefix: their names are ``PREFIX-1`` to ``PREFIX-N``.
        interval: seconds between two fixes of one device.
        duration: seconds to run; None runs until `stop` is set.
        work_s: seconds from accepting a work order to reporting it done.
        stop: set it to end the run.
        progress: called after every round with the running totals.
        seed: makes the movements reproducible.

    Raises:
        MeshchatError: a device cannot be provisioned, or the broker refuses one.
    """
    centre, radius = site_area(directory, site)
    group = f"{dept}/dispatch"
    names = [f"{prefix}-{n}" for n in range(1, count + 1)]
    paths = [
        _credentials(
            directory, data_path, actor=actor, name=n, dept=dept, group=group, broker=broker
        )
        for n in names
    ]
    rnd = random.Random(seed)  # noqa: S311  # movements, not secrets
    run = _Run(SimulationStats(devices=count, names=names), work_s)

    def make(path: Path) -> Device:
        return Device(
            DeviceCredentials.load(path),
            broker=broker,
            state_path=path.with_name(path.name + ".state"),
            on_order=run.on_order,
            alert_rules=(),
        )

    run.devices = [make(path) for path in paths]
    run.vehicles = [
        SimulatedVehicle(name, centre, radius, random.Random(rnd.random()))  # noqa: S311  # movements
        for name in names
    ]
    stop = stop or threading.Event()
    started = time.monotonic()
    try:
        for device in run.devices:
            device.start()
        for number, path in enumerate(paths):
            run.devices[number] = _connected(
                run.devices[number], functools.partial(make, path), stop
            )
        while not stop.is_set():
            now = time.monotonic()
            if duration is not None and now - started >= duration:
                break
            run.round(interval, now=now)
            run.stats.seconds = now - started
            if progress is not None:
                progress(run.stats)
            stop.wait(interval)
    finally:
        for device in run.devices:
            device.close()
    return run.stats


def _connected(device: Device, again: Callable[[], Device], stop: threading.Event) -> Device:
    """The device once connected; a refusal is retried for a few seconds.

    Accounts this run just added reach the broker's policy within about a second (the server
    polls the directory): until then the broker refuses them.
    """
    deadline = time.monotonic() + ACCOUNT_GRACE_S
    while True:
        try:
            device.wait_connected(10.0)
        except AuthenticationError:
            device.close()
            if time.monotonic() >= deadline or stop.wait(0.5):
                raise
            device = again()
            device.start()
        else:
            return device


@dataclass(slots=True)
class _Run:
    """The devices of one simulation and the orders they are working on."""

    stats: SimulationStats
    work_s: float
    devices: list[Device] = field(default_factory=list)
    vehicles: list[SimulatedVehicle] = field(default_factory=list)
    due: list[tuple[float, Order]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_status: float = -math.inf

    def on_order(self, order: Order) -> None:
        """Take every order at once (on the device's thread); done after `work_s`."""
        order.accept()
        with self.lock:
            self.stats.orders += 1
            self.due.append((time.monotonic() + self.work_s, order))

    def round(self, interval: float, *, now: float) -> None:
        """Every device drives `interval` seconds and reports; finished orders are done."""
        ts = int(time.time())
        send_status = now - self.last_status >= STATUS_EVERY_S
        for device, vehicle in zip(self.devices, self.vehicles, strict=True):
            vehicle.step(interval)
            device.publish_fix(vehicle.fix(ts))
            self.stats.fixes += 1
            if send_status:
                device.publish_status(vehicle.status(ts))
                self.stats.statuses += 1
        if send_status:
            self.last_status = now
        with self.lock:
            finished = [order for when, order in self.due if when <= now]
            self.due = [(when, order) for when, order in self.due if when > now]
        for order in finished:
            order.done()
            self.stats.done += 1
        self.stats.online = sum(device.online for device in self.devices)
