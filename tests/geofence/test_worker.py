"""The geofence worker end to end, through the embedded broker of a real site server.

Fixes go in over MQTT as OwnTracks phones send them; out come directory memberships, a site
roster signed by the geofence key, the broker's ACL and signed notices in the user's inbox.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from meshchat.broker import BrokerSettings
from meshchat.client import Transport
from meshchat.datadir import DataDir
from meshchat.directory import Directory, Role
from meshchat.directory.service import DirectoryResponder
from meshchat.directory.signing import OrgKeys
from meshchat.e2ee import (
    BoxKeyPair,
    Notice,
    NoticeKind,
    OrgTrust,
    Roster,
    SigningKeyPair,
    verify_notice,
)
from meshchat.envelope import Signed, decode
from meshchat.errors import PermissionDeniedError
from meshchat.files import write_private
from meshchat.geofence import (
    Command,
    Fix,
    GeofenceSettings,
    GeofenceStore,
    GeofenceWorker,
    WorkerFiles,
    derive_key,
    encrypt_payload,
    offset,
    parse_payload,
    set_owntracks_key,
)
from meshchat.server import SiteServer
from meshchat.topics import TelemetryTopic
from tests.brokers import embedded_broker

PLANT = (48.137, 11.575)
PASSWORDS = {"bob": "bob password", "carol": "carol password"}
CHANNEL = "mc/acme/sites/plant-3"
INBOX = "mc/acme/_d/carol-phone"
OWNTRACKS = "owntracks/carol/phone"


@dataclass
class Org:
    data: Path
    tokens: dict[str, str]
    trust: OrgTrust


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Org:
    """An org with a site, made once (creating org keys takes a second of argon2id)."""
    data = tmp_path_factory.mktemp("template") / "data"
    DataDir(data).ensure()
    with Directory.in_data_dir(data) as directory:
        directory.init_org("acme", admin="root", password="root password")
        directory.add_user("root", "bob", dept="ops", role=Role.MANAGER, password=PASSWORDS["bob"])
        directory.add_user("root", "carol", dept="ops", password=PASSWORDS["carol"])
        directory.add_user("root", "truck-7", dept="ops", role=Role.DEVICE)
        directory.add_site(
            "root", "plant-3", lat=PLANT[0], lon=PLANT[1], radius_m=100, dwell_s=30, exit_dwell_s=30
        )
        directory.add_members("root", "sites/plant-3", ["bob"])  # bob posts in the channel
        tokens = {
            "carol-phone": directory.add_device("root", "carol-phone", owner="carol"),
            "truck-7": directory.add_device("root", "truck-7", owner="truck-7", kind="tracker"),
        }
        phone = SigningKeyPair.generate().public, BoxKeyPair.generate().public
        directory.set_device_keys("carol-phone", *phone, actor="carol")
        keys = OrgKeys.create(data, "acme", "a root passphrase")
        keys.ensure_identities(directory)
    with GeofenceStore.in_data_dir(data) as store:
        store.set_settings(join_delay_s=0, leave_delay_s=0)
    return Org(data, tokens, keys.trust)


@pytest.fixture
def org(template: Org, tmp_path: Path) -> Org:
    data = tmp_path / "data"
    shutil.copytree(template.data, data)
    return Org(data, template.tokens, template.trust)


@dataclass
class Site:
    server: SiteServer
    url: str

    @property
    def worker(self) -> GeofenceWorker:
        assert self.server.geofence is not None
        return self.server.geofence

    def login(self, user: str, client_id: str, password: str | None = None) -> Transport:
        return Transport(
            self.url,
            client_id=client_id,
            username=user,
            password=password or PASSWORDS[user],
            clean_session=True,
        )


@pytest.fixture
async def site(org: Org) -> AsyncIterator[Site]:
    async with SiteServer(DataDir(org.data), BrokerSettings(port=0)) as server:
        yield Site(server, f"mqtt://127.0.0.1:{server.broker.listener('mqtt').port}")


def location(metres_east: float, ts: float, acc: float = 15.0) -> bytes:
    lat, lon = offset(*PLANT, metres_east, 0.0)
    return json.dumps({"_type": "location", "lat": lat, "lon": lon, "acc": acc, "tst": ts}).encode()


async def next_on(transport: Transport, topic: str) -> bytes:
    async with asyncio.timeout(15):
        async for message in transport.messages():
            if message.topic == topic and message.payload:
                return message.payload
    raise AssertionError(f"nothing on {topic}")


async def notice(inbox: Transport, trust: OrgTrust) -> Notice:
    return verify_notice(trust, await next_on(inbox, INBOX), device="carol-phone")


async def test_walking_in_and_out_changes_who_can_read_the_site_channel(
    org: Org, site: Site
) -> None:
    now = time.time()
    async with (
        site.login("carol", "carol-phone", org.tokens["carol-phone"]) as phone,
        site.login("carol", "carol.owntracks") as owntracks,
        site.login("bob", "bob.test") as bob,
        site.login("truck-7", "truck-7", org.tokens["truck-7"]) as truck,
    ):
        await phone.subscribe(INBOX)
        with pytest.raises(PermissionDeniedError):
            await phone.subscribe(CHANNEL)
        # A device account's role forbids auto-join: its fixes never make it a member.
        for ts in (now - 200, now - 150):
            await truck.publish("owntracks/truck-7/gps", location(0, ts))
        for ts in (now - 100, now - 60):
            await owntracks.publish(OWNTRACKS, location(20, ts))
        joined = await notice(phone, org.trust)
        assert (joined.kind, joined.group_topic) == (NoticeKind.JOINED, CHANNEL)
        assert "plant-3" in joined.text

        # The roster is signed by the geofence key, and carol may read the channel now.
        await phone.subscribe(f"{CHANNEL}/_r")
        envelope = decode(await next_on(phone, f"{CHANNEL}/_r"))
        assert isinstance(envelope, Signed)
        assert envelope.signer == "geofence"
        roster = org.trust.roster_tracker().accept(envelope, arrived_on=CHANNEL)
        assert roster.members == ("bob", "carol")
        assert roster.epoch == joined.epoch
        await phone.subscribe(CHANNEL)
        await bob.publish(CHANNEL, b"welcome")
        assert await next_on(phone, CHANNEL) == b"welcome"
        assert site.worker.stats.refused["no-auto-join"] >= 2

        # Walking out: wholly outside for the exit dwell.
        for ts in (now - 50, now - 10):
            await owntracks.publish(OWNTRACKS, location(900, ts))
        left = await notice(phone, org.trust)
        assert (left.kind, left.epoch) == (NoticeKind.LEFT, joined.epoch + 1)
        await bob.publish(CHANNEL, b"after you left")
        await bob.publish(INBOX, b"sentinel")
        # The sentinel was published after the channel message: had carol still been allowed,
        # the channel message would have come first.
        async with asyncio.timeout(15):
            async for message in phone.messages():
                assert message.payload != b"after you left"
                if message.payload == b"sentinel":
                    break
    with Directory.in_data_dir(org.data) as directory:
        assert directory.group("sites/plant-3").members == {"bob"}
        joins = [e for e in directory.audit_entries() if e.action == "site.presence"]
        assert [(e.actor, json.loads(e.details)) for e in joins] == [
            ("svc.geofence", {"joined": ["carol"], "left": []}),
            ("svc.geofence", {"joined": [], "left": ["carol"]}),
        ]


def _presence_rows(directory: Directory) -> list[str]:
    return [e.details for e in directory.audit_entries() if e.action == "site.presence"]


async def test_a_restart_in_the_middle_of_a_shift_changes_no_membership(org: Org) -> None:
    now = time.time()
    async with SiteServer(DataDir(org.data), BrokerSettings(port=0)) as server:
        url = f"mqtt://127.0.0.1:{server.broker.listener('mqtt').port}"
        site = Site(server, url)
        async with site.login("carol", "carol.owntracks") as owntracks:
            for ts in (now - 300, now - 250):
                await owntracks.publish(OWNTRACKS, location(90, ts, acc=40))
            async with asyncio.timeout(15):
                await site.worker.wait_flushed(1)
    with Directory.in_data_dir(org.data) as directory:
        assert "carol" in directory.group("sites/plant-3").members
        presence_before = _presence_rows(directory)
    # Restart: the worker restores its fixes and recomputes; nothing changes.
    async with SiteServer(DataDir(org.data), BrokerSettings(port=0)) as server:
        site = Site(server, f"mqtt://127.0.0.1:{server.broker.listener('mqtt').port}")
        assert site.worker.tracker.members("plant-3") == {"carol"}
        async with site.login("carol", "carol.owntracks") as owntracks:
            # Noisy fixes at the fence: uncertain, never wholly outside.
            for ts in (now - 200, now - 150, now - 100):
                await owntracks.publish(OWNTRACKS, location(130, ts, acc=60))
            async with asyncio.timeout(15):
                await site.worker.wait_for(lambda stats: stats.fixes >= 3)
        assert site.worker.stats.batches == 0
    with Directory.in_data_dir(org.data) as directory:
        assert "carol" in directory.group("sites/plant-3").members
        assert _presence_rows(directory) == presence_before


async def test_encrypted_phones_and_region_push(org: Org) -> None:
    secret = "mysecreTpass01"
    with Directory.in_data_dir(org.data) as directory:
        set_owntracks_key(org.data, directory, "root", "carol", "phone", secret=secret)
    with GeofenceStore.in_data_dir(org.data) as store:
        store.set_settings(push_waypoints=True)
    key = derive_key(secret)
    now = time.time()
    async with SiteServer(DataDir(org.data), BrokerSettings(port=0)) as server:
        site = Site(server, f"mqtt://127.0.0.1:{server.broker.listener('mqtt').port}")
        async with site.login("carol", "carol.owntracks") as owntracks:
            await owntracks.subscribe(f"{OWNTRACKS}/cmd")
            # The registered phone got the regions at start (encrypted with its key).
            pushed = parse_payload(
                await next_on(owntracks, f"{OWNTRACKS}/cmd"),
                f"{OWNTRACKS}/cmd",
                keys=lambda _u, _d: key,
            )
            assert isinstance(pushed, Command)
            assert [(r.desc, r.rad) for r in pushed.regions] == [("plant-3", 100)]
            for ts in (now - 100, now - 60):
                await owntracks.publish(OWNTRACKS, encrypt_payload(key, location(0, ts)))
            async with asyncio.timeout(15):
                await site.worker.wait_flushed(1)
            # A payload sealed with another key is refused, counted, and changes nothing.
            await owntracks.publish(
                OWNTRACKS, encrypt_payload(derive_key("guess"), location(0, now))
            )
            async with asyncio.timeout(15):
                await site.worker.wait_for(lambda stats: stats.refused["bad-ciphertext"] >= 1)
    with Directory.in_data_dir(org.data) as directory:
        assert "carol" in directory.group("sites/plant-3").members
        assert all(secret not in e.details for e in directory.audit_entries())
        key_files = list((org.data / "keys" / "owntracks").iterdir())
        assert [oct(p.stat().st_mode & 0o777) for p in key_files] == ["0o600"]


async def test_turning_the_region_push_on_reaches_registered_phones_at_once(org: Org) -> None:
    with Directory.in_data_dir(org.data) as directory:
        set_owntracks_key(org.data, directory, "root", "carol", "phone", secret="s3cretpass")
    async with SiteServer(DataDir(org.data), BrokerSettings(port=0)) as server:
        site = Site(server, f"mqtt://127.0.0.1:{server.broker.listener('mqtt').port}")
        async with site.login("carol", "carol.owntracks") as owntracks:
            await owntracks.subscribe(f"{OWNTRACKS}/cmd")
            assert site.worker.stats.pushes == 0  # off by default
            with GeofenceStore.in_data_dir(org.data) as store:
                store.set_settings(push_waypoints=True)
            # The phone has sent nothing: the worker pushes because the setting changed.
            pushed = await next_on(owntracks, f"{OWNTRACKS}/cmd")
            assert pushed
            assert site.worker.stats.pushes == 1


async def pushed_regions(transport: Transport, topic: str, key: bytes | None) -> list[str]:
    """The region names of the next region push on `topic` (opened with `key`, if any)."""
    command = parse_payload(await next_on(transport, topic), topic, keys=lambda _u, _d: key)
    assert isinstance(command, Command)
    return sorted(r.desc for r in command.regions)


async def test_every_phone_gets_the_regions_again_when_a_site_is_added(org: Org) -> None:
    carol_key, bob_key = derive_key("carol passphrase"), derive_key("bob passphrase")
    with Directory.in_data_dir(org.data) as directory:
        set_owntracks_key(org.data, directory, "root", "carol", "phone", secret="carol passphrase")
        set_owntracks_key(org.data, directory, "root", "bob", "phone", secret="bob passphrase")
    with GeofenceStore.in_data_dir(org.data) as store:
        store.set_settings(push_waypoints=True)
    async with SiteServer(DataDir(org.data), BrokerSettings(port=0)) as server:
        site = Site(server, f"mqtt://127.0.0.1:{server.broker.listener('mqtt').port}")
        async with (
            site.login("carol", "carol.owntracks") as carol,
            site.login("bob", "bob.owntracks") as bob,
        ):
            phones = [
                (carol, f"{OWNTRACKS}/cmd", carol_key),
                (bob, "owntracks/bob/phone/cmd", bob_key),
                (carol, "owntracks/carol/tablet/cmd", None),  # a phone without a key
            ]
            for transport, topic, _ in phones:
                await transport.subscribe(topic)
            for transport, topic, key in phones[:2]:
                assert await pushed_regions(transport, topic, key) == ["plant-3"]
            with Directory.in_data_dir(org.data) as directory:
                directory.add_site("root", "yard", lat=PLANT[0] + 0.01, lon=PLANT[1], radius_m=50)
            # Each phone, sealed with its own key, gets the new regions from the same command.
            for transport, topic, key in phones[:2]:
                assert await pushed_regions(transport, topic, key) == ["plant-3", "yard"]
            await carol.publish("owntracks/carol/tablet", location(500, time.time() - 60))
            assert await pushed_regions(carol, phones[2][1], None) == ["plant-3", "yard"]
            assert site.worker.stats.pushes == 5


async def test_owntracks_keys_are_read_again_when_one_changes_and_only_then(
    org: Org, site: Site
) -> None:
    worker = site.worker
    assert worker.stats.key_loads == 1  # at start
    # Changes to the directory and to geofence.db that leave the OwnTracks keys alone.
    with Directory.in_data_dir(org.data) as directory:
        directory.add_user("root", "dave", dept="ops", password="dave password")
    with GeofenceStore.in_data_dir(org.data) as store:
        store.set_settings(leave_delay_s=7)
    async with asyncio.timeout(15):
        await worker.wait_for(
            lambda _: "dave" in worker.view.autojoin and worker.batcher.leave_delay == 7
        )
    assert worker.stats.key_loads == 1
    now = time.time()
    first, second = derive_key("first passphrase"), derive_key("second passphrase")
    async with site.login("carol", "carol.owntracks") as owntracks:
        # A key registered while the worker runs is used within a poll.
        with Directory.in_data_dir(org.data) as directory:
            set_owntracks_key(
                org.data, directory, "root", "carol", "phone", secret="first passphrase"
            )
        async with asyncio.timeout(15):
            await worker.wait_for(lambda stats: stats.key_loads == 2)
        await owntracks.publish(OWNTRACKS, encrypt_payload(first, location(0, now - 100)))
        async with asyncio.timeout(15):
            await worker.wait_for(lambda stats: stats.fixes == 1)
        # The phone's passphrase changed: the new key is used, the old one refused.
        with Directory.in_data_dir(org.data) as directory:
            set_owntracks_key(
                org.data, directory, "root", "carol", "phone", secret="second passphrase"
            )
        async with asyncio.timeout(15):
            await worker.wait_for(lambda stats: stats.key_loads == 3)
        await owntracks.publish(OWNTRACKS, encrypt_payload(first, location(0, now - 80)))
        await owntracks.publish(OWNTRACKS, encrypt_payload(second, location(0, now - 60)))
        async with asyncio.timeout(15):
            await worker.wait_for(lambda stats: stats.fixes == 2)
        assert worker.stats.refused["bad-ciphertext"] == 1
    assert worker.stats.key_loads == 3


def test_a_key_file_restored_by_hand_is_read_at_the_next_directory_change(org: Org) -> None:
    with Directory.in_data_dir(org.data) as directory:
        set_owntracks_key(org.data, directory, "root", "carol", "phone", secret="first")
    files = WorkerFiles(org.data)
    try:
        assert files.changed()
        assert files.view().keys == {("carol", "phone"): derive_key("first")}
        (key_file,) = (org.data / "keys" / "owntracks").iterdir()
        write_private(key_file, derive_key("from the backup"))  # no record changes
        with Directory.in_data_dir(org.data) as directory:
            directory.add_user("root", "dave", dept="ops", password="dave password")
        assert files.changed()
        assert files.view().keys == {("carol", "phone"): derive_key("from the backup")}
        assert not files.changed()
        assert files.key_loads == 2
    finally:
        files.close()


def decode_test_gps(topic: TelemetryTopic, payload: bytes) -> Fix | None:
    """A stand-in for the device issue's telemetry format (this test's own JSON)."""
    value = json.loads(payload)
    return (
        Fix(value["ts"], value["lat"], value["lon"], value["acc"]) if topic.kind == "gps" else None
    )


async def test_standalone_worker_with_a_telemetry_decoder(org: Org) -> None:
    with Directory.in_data_dir(org.data) as directory:
        directory.add_device("root", "carol-tracker", owner="carol", kind="tracker")
    now = time.time()
    async with embedded_broker() as broker:
        url = f"mqtt://127.0.0.1:{broker.listener('mqtt').port}"
        async with (
            Transport(url, client_id="geofence-1") as transport,
            Transport(url, client_id="watcher") as watcher,
        ):
            worker = GeofenceWorker(
                org.data, transport, settings=GeofenceSettings(), telemetry=decode_test_gps
            )
            task = asyncio.create_task(worker.run(), name="meshchat[geofence].test")
            try:
                async with asyncio.timeout(15):
                    await worker.wait_ready()
                lat, lon = PLANT
                for ts in (now - 100, now - 60):
                    fix = {"ts": ts, "lat": lat, "lon": lon, "acc": 10}
                    await watcher.publish("mc/acme/_t/carol-tracker/gps", json.dumps(fix).encode())
                await watcher.subscribe(f"{CHANNEL}/_r")
                async with asyncio.timeout(15):
                    while True:
                        envelope = decode(await next_on(watcher, f"{CHANNEL}/_r"))
                        assert isinstance(envelope, Signed)
                        if "carol" in Roster.decode(envelope.payload).members:
                            break
                # The hook for fixes decoded elsewhere.
                assert worker.submit("device:x", "truck-7", Fix(now, lat, lon, 5)) is None
                assert worker.submit("device:x", "carol", Fix(now + 3600, lat, lon, 5)) is None
                assert worker.stats.refused == {"no-auto-join": 1, "future": 1}
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def test_the_directory_service_signs_site_rosters_with_the_geofence_key(org: Org) -> None:
    with Directory.in_data_dir(org.data) as directory:
        directory.create_group("bob", "ops/line1")
    responder = DirectoryResponder(org.data)
    try:
        published = {p.topic: p.payload for p in responder.changes()}
    finally:
        responder.close()
    signers = {}
    for group in (CHANNEL, "mc/acme/ops/line1"):
        envelope = decode(published[f"{group}/_r"])
        assert isinstance(envelope, Signed)
        org.trust.roster_tracker().accept(envelope, arrived_on=group)
        signers[group] = envelope.signer
    assert signers == {CHANNEL: "geofence", "mc/acme/ops/line1": "dir"}


async def test_site_remove_empties_the_channel_and_the_worker_stops_evaluating_it(
    org: Org, site: Site
) -> None:
    now = time.time()
    async with site.login("carol", "carol.owntracks") as owntracks:
        for ts in (now - 500, now - 460):
            await owntracks.publish(OWNTRACKS, location(0, ts))
        async with asyncio.timeout(15):
            await site.worker.wait_flushed(1)
        runner = CliRunner()
        result = runner.invoke(
            app, ["site", "remove", "plant-3", "--json", "--data", str(org.data)]
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == {
            "site": "plant-3",
            "channel": "sites/plant-3",
            "removed_members": ["bob", "carol"],
        }
        async with asyncio.timeout(15):
            await site.worker.wait_for(lambda _: "plant-3" not in site.worker.tracker.sites)
        # Walking out of the old fence for longer than its exit dwell and back in changes
        # nothing any more: a worker still evaluating plant-3 would count a leave and a join.
        joins, leaves = site.worker.stats.joins, site.worker.stats.leaves
        for metres, ts in ((5_000, now - 400), (5_000, now - 200), (0, now - 100), (0, now - 60)):
            await owntracks.publish(OWNTRACKS, location(metres, ts))
        async with asyncio.timeout(15):
            await site.worker.wait_for(lambda stats: stats.fixes >= 6)
        assert (site.worker.stats.joins, site.worker.stats.leaves) == (joins, leaves)
    with Directory.in_data_dir(org.data) as directory:
        assert directory.group("sites/plant-3").members == frozenset()
        assert [s.name for s in directory.sites()] == []
        (entry,) = [e for e in directory.audit_entries() if e.action == "site.remove"]
        assert json.loads(entry.details) == {"members": ["bob", "carol"]}
    unknown = CliRunner().invoke(app, ["site", "remove", "nope", "--data", str(org.data)])
    assert unknown.exit_code == 1
    assert unknown.output.strip().splitlines() == ["error: no site 'nope'"]
