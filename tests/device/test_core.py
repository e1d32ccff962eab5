"""The device core, sans-IO: who gets the telemetry key, when it changes, and what readers read.

Real keys throughout (`tests.e2ee.org.Org` signs rosters and key records); people's sessions
open the key shares the device publishes, the way their clients do.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshchat.device.core import DeviceCore, Output, Publication
from meshchat.device.credentials import DeviceCredentials
from meshchat.device.telemetry import (
    GEOFENCE_READER,
    GpsFix,
    Status,
    decode_fix,
    decode_status,
    key_from_inner,
    open_key_share,
    seal_key_request,
)
from meshchat.e2ee import BoxKeyPair, DeviceSession, Direct, Kind
from meshchat.e2ee.telemetry import TelemetryKey, TelemetryKeyring
from meshchat.envelope import encode
from meshchat.errors import DecryptError
from meshchat.rpc import PUSH_ID, Reply, decode_request
from meshchat.topics import InboxTopic, KeyTopic, TelemetryTopic, parse_topic
from tests.e2ee.org import NOW, Device, Org

DISPATCH = "mc/acme/ops/dispatch"
GROUPS_TOPIC = "mc/acme/_s/dir/van-1/reply"
ARCHIVE_REQUESTS = "mc/acme/_s/archive/van-1"
ARCHIVE_REPLIES = "mc/acme/_s/archive/van-1/reply"
STATUS = TelemetryTopic("acme", "van-1", "status")


@dataclass
class Fleet:
    org: Org
    van: Device
    reader: BoxKeyPair
    core: DeviceCore
    devices: dict[str, Device]

    def credentials(self) -> DeviceCredentials:
        return self.core.credentials

    def feed(self, topic: str, payload: bytes) -> Output:
        return self.core.on_message(topic, payload, now=NOW)

    def groups(self, *paths: str) -> Output:
        return self.feed(GROUPS_TOPIC, Reply(PUSH_ID, ok=True, value=list(paths)).encode())

    def roster(self, *members: str) -> Output:
        return self.feed(f"{DISPATCH}/_r", encode(self.org.roster(DISPATCH, *members)))

    def record(self, user: str) -> Output:
        return self.feed(KeyTopic("acme", user).topic, encode(self.org.record(user)))

    def reader_session(self, device: str) -> DeviceSession:
        session = self.org.session(self.devices[device])
        session.on_key_record("van-1", encode(self.org.record("van-1")))
        return session


def make_fleet() -> Fleet:
    org = Org()
    devices: dict[str, Device] = {}
    for user, names in {
        "van-1": ["van-1"],
        "van-2": ["van-2"],
        "bob": ["bob-laptop", "bob-phone"],
        "carol": ["carol-laptop"],
        "dave": ["dave-laptop"],
    }.items():
        for device in org.add_user(user, *names):
            devices[device.name] = device
    reader = BoxKeyPair.generate()
    van = devices["van-1"]
    credentials = DeviceCredentials(
        org="acme",
        device="van-1",
        dept="ops",
        kind="tracker",
        broker="mqtt://127.0.0.1:1883",
        group="ops/dispatch",
        token="token",
        signing=van.signing,
        box=van.box,
        trust=org.trust,
        geofence=reader.public,
    )
    return Fleet(org, van, reader, DeviceCore(credentials, now=NOW), devices)


def inbox_shares(out: Output) -> dict[str, bytes]:
    shares = {}
    for item in out.publish:
        parsed = parse_topic(item.topic)
        if isinstance(parsed, InboxTopic):
            shares[parsed.device] = item.payload
    return shares


def geofence_shares(out: Output) -> list[Publication]:
    return [p for p in out.publish if p.topic == "mc/acme/_s/geofence/van-1"]


def take_key(session: DeviceSession, payload: bytes) -> TelemetryKey:
    step = session.on_inbox(payload)
    (event,) = step.events
    assert isinstance(event, Direct)
    assert event.device == "van-1"
    assert event.inner.kind is Kind.TELEMETRY_KEY
    return key_from_inner(event.inner)


def joined(fleet: Fleet, *members: str) -> Output:
    """Start, learn the group, its roster and every member's key record."""
    out = fleet.core.start(now=NOW)
    out.extend(fleet.groups("ops/dispatch"))
    out.extend(fleet.roster(*members))
    for user in members:
        out.extend(fleet.record(user))
    return out


def test_start_follows_inbox_and_groups_and_gives_the_geofence_the_fixes_only_key() -> None:
    fleet = make_fleet()
    out = fleet.core.start(now=NOW)
    # The inbox, the group list, the geofence worker's reader certificate, and (on a first
    # run) the archiver's answers about what reached the inbox before.
    assert out.subscribe == [
        "mc/acme/_d/van-1",
        GROUPS_TOPIC,
        "mc/acme/_s/geofence",
        ARCHIVE_REPLIES,
    ]
    (share,) = geofence_shares(out)
    assert share.retain
    assert share.qos == 1
    keys = {"van-1": fleet.van.signing.public}
    sender, key = open_key_share(share.payload, reader=fleet.reader, signing_key=keys.get)
    assert sender == "van-1"
    assert key == fleet.core.sealer.key.gps_only()
    assert key.status is None


def test_the_groups_list_leads_to_rosters_and_the_members_key_records() -> None:
    fleet = make_fleet()
    fleet.core.start(now=NOW)
    out = fleet.groups("ops/dispatch")
    assert out.subscribe == [f"{DISPATCH}/_r"]
    assert out.state_changed
    out = fleet.roster("bob", "van-1", "van-2")
    assert out.subscribe == ["mc/acme/_k/bob", "mc/acme/_k/van-2"]


def test_readers_are_the_people_of_the_dispatch_group_and_each_gets_the_key_once() -> None:
    fleet = make_fleet()
    out = joined(fleet, "bob", "carol", "van-1", "van-2")
    shares = inbox_shares(out)
    assert sorted(shares) == ["bob-laptop", "bob-phone", "carol-laptop"]  # not van-2, not dave
    assert fleet.core.shared_with == ["bob-laptop", "bob-phone", "carol-laptop"]
    again = fleet.roster("bob", "carol", "van-1", "van-2")
    again.extend(fleet.record("bob"))
    assert inbox_shares(again) == {}
    key = take_key(fleet.reader_session("bob-phone"), shares["bob-phone"])
    assert key == fleet.core.sealer.key
    status = fleet.core.status(Status(NOW, battery=41, state="ok"), now=NOW)
    (report,) = status.publish
    assert report.topic == STATUS.topic
    assert report.retain
    keyring = TelemetryKeyring()
    keyring.add("van-1", key)
    opened = keyring.open(report.topic, report.payload)
    assert opened is not None
    assert decode_status(opened.plaintext) == Status(NOW, battery=41, state="ok")


def test_someone_outside_the_group_cannot_read_even_with_the_ciphertext() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    (report,) = fleet.core.status(Status(NOW, battery=41), now=NOW).publish
    dave = TelemetryKeyring()
    assert dave.open(report.topic, report.payload) is None  # no key: it waits, unread
    assert dave.add("van-1", TelemetryKey.generate()) == []  # any key but the device's
    assert dave.open(report.topic, report.payload) is None  # another key id: still unread
    assert dave.parked("van-1") == 1


def test_a_reader_who_leaves_makes_a_new_key_that_only_those_who_stay_get() -> None:
    fleet = make_fleet()
    first = inbox_shares(joined(fleet, "bob", "carol", "van-1"))
    carol_key = take_key(fleet.reader_session("carol-laptop"), first["carol-laptop"])
    old_id = fleet.core.sealer.key.key_id
    out = fleet.roster("bob", "van-1")  # carol left the dispatch group
    assert fleet.core.sealer.key.key_id != old_id
    assert sorted(inbox_shares(out)) == ["bob-laptop", "bob-phone"]
    assert len(geofence_shares(out)) == 1  # the geofence follows the new key too
    (report,) = fleet.core.status(Status(NOW + 5, battery=40), now=NOW + 5).publish
    carol = TelemetryKeyring()
    carol.add("van-1", carol_key)
    assert carol.open(report.topic, report.payload) is None  # the new key never reached her
    bob_key = take_key(fleet.reader_session("bob-laptop"), inbox_shares(out)["bob-laptop"])
    bob = TelemetryKeyring()
    bob.add("van-1", bob_key)
    assert bob.open(report.topic, report.payload) is not None


def test_a_device_gone_from_a_record_rotates_and_a_new_one_just_gets_the_key() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    key_id = fleet.core.sealer.key.key_id
    fleet.org.devices["bob"].append(Device("bob-tablet", "bob"))
    out = fleet.record("bob")
    assert inbox_shares(out).keys() == {"bob-tablet"}
    assert fleet.core.sealer.key.key_id == key_id  # an add does not rotate
    fleet.org.devices["bob"] = [d for d in fleet.org.devices["bob"] if d.name != "bob-phone"]
    out = fleet.record("bob")
    assert fleet.core.sealer.key.key_id != key_id
    assert sorted(inbox_shares(out)) == ["bob-laptop", "bob-tablet"]


def test_leaving_the_group_altogether_rotates_away_from_everyone_in_it() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    key_id = fleet.core.sealer.key.key_id
    out = fleet.groups()
    assert inbox_shares(out) == {}
    assert fleet.core.shared_with == []
    assert fleet.core.sealer.key.key_id != key_id


def test_a_restart_makes_a_new_key_and_shares_it_with_known_readers_at_once() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    old_id = fleet.core.sealer.key.key_id
    restarted = DeviceCore(fleet.credentials(), state=fleet.core.state(), now=NOW + 60)
    out = restarted.start(now=NOW + 60)
    assert restarted.sealer.key.key_id != old_id
    assert restarted.sealer.counter == 0
    assert sorted(inbox_shares(out)) == ["bob-laptop", "bob-phone"]
    assert f"{DISPATCH}/_r" in out.subscribe
    assert "mc/acme/_k/bob" in out.subscribe


def test_a_forged_roster_gives_no_one_the_key() -> None:
    fleet = make_fleet()
    fleet.core.start(now=NOW)
    fleet.groups("ops/dispatch")
    fleet.record("dave")
    impostor = Org()  # another org's directory key signs a roster naming dave
    forged = encode(impostor.roster(DISPATCH, "dave", "van-1"))
    out = fleet.feed(f"{DISPATCH}/_r", forged)
    assert inbox_shares(out) == {}
    assert fleet.core.shared_with == []


def test_fixes_go_out_at_the_requested_qos_and_are_not_retained() -> None:
    fleet = make_fleet()
    fleet.core.start(now=NOW)
    (fix,) = fleet.core.fix(GpsFix(NOW, 1.0, 2.0), now=NOW, qos=0).publish
    assert fix.topic == "mc/acme/_t/van-1/gps"
    assert (fix.qos, fix.retain) == (0, False)
    assert len(fix.payload) <= 100
    keyring = TelemetryKeyring()
    keyring.add("van-1", fleet.core.sealer.key.gps_only())
    opened = keyring.open(fix.topic, fix.payload)
    assert opened is not None
    assert opened.kind == "gps"
    assert GEOFENCE_READER == "geofence"


def test_a_week_old_key_is_replaced_before_the_next_report() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    key_id = fleet.core.sealer.key.key_id
    later = NOW + 7 * 24 * 3600
    out = fleet.core.status(Status(later, battery=30), now=later)
    assert fleet.core.sealer.key.key_id != key_id
    assert sorted(inbox_shares(out)) == ["bob-laptop", "bob-phone"]
    report = out.publish[-1]
    bob_key = take_key(fleet.reader_session("bob-laptop"), inbox_shares(out)["bob-laptop"])
    keyring = TelemetryKeyring()
    keyring.add("van-1", bob_key)
    assert keyring.open(report.topic, report.payload) is not None


def test_an_unknown_key_id_is_an_error_for_the_stateless_hook() -> None:
    fleet = make_fleet()
    fleet.core.start(now=NOW)
    (fix,) = fleet.core.fix(GpsFix(NOW, 1.0, 2.0), now=NOW).publish
    with pytest.raises(DecryptError) as caught:
        decode_fix(fix.payload, topic=fix.topic, key=TelemetryKey.generate())
    assert caught.value.reason == "unknown-key"


def test_a_reader_who_missed_the_key_asks_and_gets_it_once() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    bob_laptop = fleet.devices["bob-laptop"]
    request = seal_key_request(
        fleet.core.sealer.key.key_id,
        sender="bob-laptop",
        signing=bob_laptop.signing,
        device="van-1",
        device_box=fleet.van.box.public,
        ts=NOW,
    )
    out = fleet.feed("mc/acme/_d/van-1", request)
    assert list(inbox_shares(out)) == ["bob-laptop"]
    key = take_key(fleet.reader_session("bob-laptop"), inbox_shares(out)["bob-laptop"])
    assert key == fleet.core.sealer.key
    assert inbox_shares(fleet.feed("mc/acme/_d/van-1", request)) == {}  # once per key
    assert out.direct == []  # a request is not a work order


def test_someone_who_is_not_a_reader_asks_in_vain() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    dave_laptop = fleet.devices["dave-laptop"]
    fleet.record("dave")  # the device knows dave's key: the request verifies, and is refused
    request = seal_key_request(
        fleet.core.sealer.key.key_id,
        sender="dave-laptop",
        signing=dave_laptop.signing,
        device="van-1",
        device_box=fleet.van.box.public,
        ts=NOW,
    )
    assert inbox_shares(fleet.feed("mc/acme/_d/van-1", request)) == {}


def synced(fleet: Fleet) -> bool:
    return fleet.core.synced  # a call: mypy would narrow a property across the asserts


def test_the_core_says_when_it_knows_every_reader() -> None:
    fleet = make_fleet()
    fleet.core.start(now=NOW)
    assert not synced(fleet)
    fleet.groups("ops/dispatch")
    assert not synced(fleet)  # no roster yet
    fleet.roster("bob", "carol", "van-1")
    assert not synced(fleet)  # members' key records missing
    asked = fleet.record("bob")
    assert not synced(fleet)
    asked.extend(fleet.record("carol"))
    assert not synced(fleet)  # a first run: the inbox the archiver kept is being read
    (request,) = [p for p in asked.publish if p.topic == ARCHIVE_REQUESTS]
    last_page = Reply.success(decode_request(request.payload), [[], None]).encode()
    fleet.core.on_message(ARCHIVE_REPLIES, last_page, now=NOW)
    assert synced(fleet)
    assert fleet.core.shared_with == ["bob-laptop", "bob-phone", "carol-laptop"]


def test_a_device_in_no_group_is_synced_once_it_hears_so() -> None:
    fleet = make_fleet()
    fleet.core.start(now=NOW)
    fleet.groups()
    assert fleet.core.synced


def inbox_read(core: DeviceCore) -> bool:
    return core.inbox_synced


def test_a_first_run_reads_its_archived_inbox_once_it_knows_its_dispatchers() -> None:
    fleet = make_fleet()
    started = fleet.core.start(now=NOW)
    assert not [p for p in started.publish if p.topic == ARCHIVE_REQUESTS]  # no dispatchers yet
    out = joined(fleet, "bob", "van-1")
    (asked,) = [p for p in out.publish if p.topic == ARCHIVE_REQUESTS]
    request = decode_request(asked.payload)
    assert (request.op, request.args[0]) == ("inbox", "van-1")
    # A page with a cursor asks for the next one; the last page ends the catch-up for good.
    more = fleet.core.on_message(
        ARCHIVE_REPLIES, Reply.success(request, [[], b"cursor"]).encode(), now=NOW
    )
    (asked_again,) = [p for p in more.publish if p.topic == ARCHIVE_REQUESTS]
    following = decode_request(asked_again.payload)
    assert following.args[2] == b"cursor"
    assert not inbox_read(fleet.core)
    done = fleet.core.on_message(
        ARCHIVE_REPLIES, Reply.success(following, [[], None]).encode(), now=NOW
    )
    assert done.state_changed
    assert inbox_read(fleet.core)
    restarted = DeviceCore(fleet.credentials(), state=fleet.core.state(), now=NOW + 60)
    again = restarted.start(now=NOW + 60)
    assert ARCHIVE_REPLIES not in again.subscribe
    assert not [p for p in again.publish if p.topic == ARCHIVE_REQUESTS]


def test_a_reply_to_someone_elses_request_is_ignored() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    forged = Reply(b"x" * 8, ok=True, value=[[], None]).encode()
    fleet.core.on_message(ARCHIVE_REPLIES, forged, now=NOW)
    assert not fleet.core.inbox_synced
