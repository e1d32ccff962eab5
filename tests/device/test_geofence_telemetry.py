"""Device GPS telemetry into the geofence, end to end through a real site server.

A tracker registered to carol runs the real device SDK (paho, its own thread): it learns the
geofence worker's reader key from the signed certificate, leaves its key share, and its
encrypted fixes put carol in and out of a site's channel, which her real client then can and
cannot read.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshchat.broker import BrokerSettings
from meshchat.client import Client, DeviceProfile
from meshchat.client.core import GroupsChanged, Message
from meshchat.client.login import login
from meshchat.datadir import DataDir
from meshchat.device import Device
from meshchat.device.credentials import DeviceCredentials
from meshchat.directory import Directory, Role
from meshchat.directory.signing import OrgKeys
from meshchat.e2ee import BoxKeyPair, SigningKeyPair
from meshchat.fleet import add_device, remove_device
from meshchat.geofence import GeofenceStore, GeofenceWorker, offset
from meshchat.server import SiteServer

WAIT = 20.0
PLANT = (48.137, 11.575)
CHANNEL = "sites/plant-3"
PASSWORDS = {"bob": "bob password", "carol": "carol password"}


@dataclass(frozen=True)
class Template:
    data: Path
    tracker: DeviceCredentials


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """An org with a site and carol's tracker, made once (org keys take a second)."""
    data = tmp_path_factory.mktemp("geofence-gps") / "data"
    DataDir(data).ensure()
    with Directory.in_data_dir(data) as directory:
        directory.init_org("acme", admin="root", password="root password")
        directory.add_user("root", "bob", dept="ops", role=Role.MANAGER, password=PASSWORDS["bob"])
        directory.add_user("root", "carol", dept="ops", password=PASSWORDS["carol"])
        directory.add_site(
            "root", "plant-3", lat=PLANT[0], lon=PLANT[1], radius_m=100, dwell_s=30, exit_dwell_s=30
        )
        directory.add_members("root", CHANNEL, ["bob"])
        directory.create_group("root", "ops/line1")
        directory.add_members("root", "ops/line1", ["bob", "carol"])
        # A tracker registered to carol: it logs in as carol with its own token.
        token = directory.add_device("root", "carol-tracker", owner="carol", kind="tracker")
        signing, box = SigningKeyPair.generate(), BoxKeyPair.generate()
        directory.set_device_keys("carol-tracker", signing.public, box.public, actor="root")
        keys = OrgKeys.create(data, "acme", "a root passphrase")
        keys.ensure_identities(directory)
    with GeofenceStore.in_data_dir(data) as store:
        store.set_settings(join_delay_s=0, leave_delay_s=0)
    tracker = DeviceCredentials(
        org="acme",
        device="carol-tracker",
        dept="ops",
        kind="tracker",
        broker="mqtt://127.0.0.1:1883",
        group="ops/dispatch",
        token=token,
        signing=signing,
        box=box,
        trust=keys.trust,
        geofence=None,  # it learns the worker's key from the signed certificate
    )
    return Template(data, tracker)


@dataclass
class Site:
    server: SiteServer
    url: str
    tmp: Path

    @property
    def worker(self) -> GeofenceWorker:
        assert self.server.geofence is not None
        return self.server.geofence

    async def login(self, user: str) -> DeviceProfile:
        return await login(
            self.tmp / "clients" / user,
            broker=self.url,
            org="acme",
            user=user,
            password=PASSWORDS[user],
            device=f"{user}-laptop",
        )


@asynccontextmanager
async def site_server(data: Path, tmp: Path) -> AsyncIterator[Site]:
    async with SiteServer(DataDir(data), BrokerSettings(port=0)) as server:
        yield Site(server, f"mqtt://127.0.0.1:{server.broker.listener('mqtt').port}", tmp)


@pytest.fixture
def data(template: Template, tmp_path: Path) -> Path:
    shutil.copytree(template.data, tmp_path / "data")
    return tmp_path / "data"


@asynccontextmanager
async def tracker_of(credentials: DeviceCredentials, url: str) -> AsyncIterator[Device]:
    """carol's tracker, connected (it follows no dispatch group: no waiting for one)."""
    device = Device(credentials, broker=url, username="carol", state_path=None)
    await asyncio.to_thread(device.start)
    try:
        assert await asyncio.to_thread(device.wait_connected, WAIT)
        yield device
    finally:
        await asyncio.to_thread(device.close)


def walk(device: Device, metres_east: float, *ages: float) -> None:
    now = time.time()
    lat, lon = offset(*PLANT, metres_east, 0.0)
    for age in ages:
        device.publish_fix(lat=lat, lon=lon, accuracy=10, ts=int(now - age))


async def next_message(client: Client, text: str) -> Message:
    async with asyncio.timeout(WAIT):
        async for event in client.events():
            if isinstance(event, Message) and event.text == text:
                return event
    raise AssertionError(f"no message {text!r}")


async def wait_for_group(client: Client, group: str) -> None:
    async with asyncio.timeout(WAIT):
        if group in client.groups:
            return
        async for event in client.events():
            if isinstance(event, GroupsChanged) and group in event.groups:
                return


async def test_a_tracker_walking_in_and_out_decides_who_reads_the_site_channel(
    template: Template, data: Path, tmp_path: Path
) -> None:
    async with site_server(data, tmp_path) as site:
        bob_profile, carol_profile = await site.login("bob"), await site.login("carol")
        async with Client(bob_profile) as bob, Client(carol_profile) as carol:
            async with tracker_of(template.tracker, site.url) as tracker:
                walk(tracker, 20, 100, 60)  # inside, dwell 30 s on the fixes' own clock
                await wait_for_group(carol, CHANNEL)
                async with asyncio.timeout(WAIT):
                    # carol's client subscribes to the roster, then to the channel.
                    await carol.wait_roster(CHANNEL, lambda r: "carol" in r.members)
                    await bob.wait_roster(CHANNEL, lambda r: "carol" in r.members)
                # Its client follows the channel a moment after it learns of it.
                await carol.transport.subscribe(f"mc/acme/{CHANNEL}")
                await bob.send(CHANNEL, "welcome to plant 3")
                await next_message(carol, "welcome to plant 3")
                assert tracker.core.geofence_reader is not None  # learned, and verified

                walk(tracker, 900, 50, 10)  # wholly outside for the exit dwell
                async with asyncio.timeout(WAIT):
                    await bob.wait_roster(CHANNEL, lambda r: "carol" not in r.members)
            await bob.send(CHANNEL, "after you left")
            await bob.send("ops/line1", "sentinel")
            await next_message(carol, "sentinel")
            history = [m.body for m in carol.store.history(f"mc/acme/{CHANNEL}")]
            assert history == ["welcome to plant 3"]
        stats = site.worker.stats
        assert stats.shares >= 1
        assert (stats.joins, stats.leaves) == (1, 1)
    with Directory.in_data_dir(data) as directory:
        assert directory.group(CHANNEL).members == {"bob"}


async def test_after_a_restart_shares_come_back_and_a_revoked_devices_share_is_refused(
    template: Template, data: Path, tmp_path: Path
) -> None:
    async with site_server(data, tmp_path) as site:
        with Directory.in_data_dir(data) as directory:
            van = add_device(
                directory,
                data,
                actor="root",
                name="van-1",
                dept="ops",
                kind="tracker",
                broker=site.url,
                out=tmp_path / "van-1.json",
            )
        watcher = site.server.watcher
        assert watcher is not None
        await watcher.reload()
        async with tracker_of(template.tracker, site.url) as tracker:
            device = Device(van.path, broker=site.url, connect_timeout=WAIT)
            await asyncio.to_thread(device.__enter__)
            try:
                # A device account's fixes are read, and count for nobody: its role may
                # not be auto-joined.
                walk(device, 0, 100, 60)
                async with asyncio.timeout(WAIT):
                    await site.worker.wait_for(
                        lambda s: s.shares >= 2 and s.refused["no-auto-join"] >= 2
                    )
                walk(tracker, 0, 100, 60)
                async with asyncio.timeout(WAIT):
                    await site.worker.wait_flushed(1)
            finally:
                await asyncio.to_thread(device.close)
    with Directory.in_data_dir(data) as directory:
        assert "carol" in directory.group(CHANNEL).members
        remove_device(directory, actor="root", name="van-1")
    # The worker keeps no keyring on disk: the broker hands it the retained shares again, and
    # the revoked device's share is refused.
    async with site_server(data, tmp_path) as site:
        async with asyncio.timeout(WAIT):
            await site.worker.wait_for(lambda s: s.shares >= 1 and s.refused["unknown-sender"] >= 1)
        reader = site.worker.telemetry_reader
        assert reader is not None
        assert reader.keyring.key("carol-tracker") is not None
        assert reader.keyring.key("van-1") is None
        # The tracker restarts too (a new telemetry key), and walking out still works.
        async with tracker_of(template.tracker, site.url) as tracker:
            walk(tracker, 900, 50, 10)
            async with asyncio.timeout(WAIT):
                await site.worker.wait_for(lambda s: s.leaves >= 1)
    with Directory.in_data_dir(data) as directory:
        assert "carol" not in directory.group(CHANNEL).members
