"""Alerts, sans-IO: rules fire on a device's status; storms become one message with a count."""

from __future__ import annotations

import pytest

from meshchat.device.alerts import Alerter, AlertRule, NewAlert, UpdateAlert, parse_rules
from meshchat.device.telemetry import Status
from meshchat.e2ee import Decrypted, DeviceSession, Kind, sign_roster
from meshchat.envelope import encode
from meshchat.errors import ConfigError
from meshchat.topics import parse_topic
from tests.device.test_core import DISPATCH, inbox_shares, joined, make_fleet
from tests.e2ee.org import NOW


def test_rules_read_like_conditions_and_fire_on_the_status() -> None:
    low, hot, door = parse_rules(["battery < 15", "temperature>=60.5", "extra.door_open == 1"])
    assert (low.field, low.op, low.limit) == ("battery", "<", 15.0)
    assert low.fires(Status(NOW, battery=12)) == 12.0
    assert low.fires(Status(NOW, battery=15)) is None
    assert low.fires(Status(NOW)) is None  # no battery reading: nothing to judge
    assert hot.fires(Status(NOW, temperature=61.0)) == 61.0
    assert door.fires(Status(NOW, extra={"door_open": True})) == 1.0
    assert door.fires(Status(NOW, extra={"door_open": "yes"})) is None
    assert low.describe(12.0) == "battery 12% (rule: battery < 15)"
    with pytest.raises(ConfigError, match="FIELD OP NUMBER"):
        AlertRule.parse("battery is low")
    with pytest.raises(ConfigError, match="field 'pressure' is unknown"):
        AlertRule.parse("pressure > 3")


def test_a_storm_of_one_alert_is_one_message_whose_count_is_edited() -> None:
    alerter = Alerter("van-1")
    posts = []
    for second in range(100):  # 100 identical alerts in one minute
        posts += alerter.on_status(Status(NOW + second, battery=9), now=NOW + second * 0.6)
        if second == 0:
            (first,) = posts
            assert isinstance(first, NewAlert)
            alerter.posted(first.key, (7, 0))
    new = [p for p in posts if isinstance(p, NewAlert)]
    edits = [p for p in posts if isinstance(p, UpdateAlert)]
    assert len(new) == 1
    assert new[0].text == "ALERT van-1: battery 9% (rule: battery < 15)"
    assert 1 <= len(edits) <= 2  # at most one edit per 30 s
    (last,) = alerter.flush(now=NOW + 60, force=True)
    assert isinstance(last, UpdateAlert)
    assert last.message_id == (7, 0)
    assert last.text.startswith("ALERT van-1: battery 9% (rule: battery < 15) x100, last ")
    assert alerter.flush(now=NOW + 61, force=True) == []  # nothing new to show
    assert alerter.count("battery < 15") == 100


def test_counts_wait_for_the_first_message_and_for_the_edit_interval() -> None:
    alerter = Alerter("van-1", edit_interval=30)
    assert len(alerter.occurred("door", "door open", now=NOW)) == 1
    assert alerter.occurred("door", "door open", now=NOW + 40) == []  # not posted yet
    alerter.posted("door", (1, 2))
    assert alerter.flush(now=NOW + 41) != []
    assert alerter.occurred("door", "door open", now=NOW + 42) == []  # edited a second ago
    (edit,) = alerter.flush(now=NOW + 72)
    assert isinstance(edit, UpdateAlert)
    assert " x3, " in edit.text


def test_an_alert_quiet_for_the_window_posts_anew() -> None:
    alerter = Alerter("van-1", window=600)
    assert isinstance(alerter.occurred("door", "door open", now=NOW)[0], NewAlert)
    alerter.posted("door", (1, 0))
    (repeat,) = alerter.occurred("door", "door open", now=NOW + 599)
    assert isinstance(repeat, UpdateAlert)  # within the window: it only counts
    assert isinstance(alerter.occurred("door", "door open", now=NOW + 1199)[0], NewAlert)


def test_new_alerts_are_rate_limited_per_device_and_the_held_back_are_counted() -> None:
    alerter = Alerter("gw-1", max_per_minute=5)
    posted = [alerter.occurred(f"k{n}", f"alarm {n}", now=NOW + n) for n in range(7)]
    assert sum(len(p) for p in posted) == 5
    assert alerter.held_back == 2
    (later,) = alerter.occurred("k9", "alarm 9", now=NOW + 61)
    assert isinstance(later, NewAlert)
    assert later.text == "ALERT gw-1: alarm 9 (2 more alerts held back by the rate limit)"
    assert alerter.held_back == 0


def read_group(
    session: DeviceSession, topic: str, out_payloads: list[tuple[str, bytes]]
) -> list[Decrypted]:
    events = []
    for item_topic, payload in out_payloads:
        parsed = parse_topic(item_topic)
        if item_topic == topic:
            events += session.on_group_message(topic, payload).events
        elif getattr(parsed, "device", None) == session.device:
            events += session.on_inbox(payload).events
    return [e for e in events if isinstance(e, Decrypted)]


def test_the_core_posts_alerts_into_the_dispatch_group_for_its_people_to_read() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    out = fleet.core.status(Status(NOW, battery=9), now=NOW)
    bob = fleet.reader_session("bob-laptop")
    bob.on_roster(
        DISPATCH, encode(sign_roster(fleet.org.rosters[DISPATCH], fleet.org.directory, "dir"))
    )
    posted = [(p.topic, p.payload) for p in out.publish]
    (alert,) = read_group(bob, DISPATCH, posted)
    assert (alert.sender, alert.device, alert.inner.kind) == ("van-1", "van-1", Kind.TEXT)
    assert alert.inner.fields == ("ALERT van-1: battery 9% (rule: battery < 15)",)
    more = fleet.core.status(Status(NOW + 40, battery=8), now=NOW + 40)
    more.extend(fleet.core.flush_alerts(now=NOW + 41, force=True))
    (edit,) = read_group(bob, DISPATCH, [(p.topic, p.payload) for p in more.publish])
    assert edit.inner.kind is Kind.EDIT
    assert edit.inner.fields[1] == alert.message_id
    assert " x2, " in str(edit.inner.fields[0])


def test_alerts_wait_for_the_roster_and_a_channel_does_not_make_readers() -> None:
    fleet = make_fleet()
    fleet.core.alert_group = "ops/general"
    fleet.core.start(now=NOW)
    fleet.groups("ops/dispatch", "ops/general")
    assert fleet.core.alert("door", "door open", now=NOW).publish == []
    assert fleet.core.pending_alerts == 1
    fleet.roster("bob", "van-1")
    fleet.feed(
        "mc/acme/ops/general/_r", encode(fleet.org.roster("mc/acme/ops/general", "dave", "van-1"))
    )
    out = fleet.record("bob")
    out.extend(fleet.record("dave"))
    assert fleet.core.pending_alerts == 0
    assert any(p.topic == "mc/acme/ops/general" for p in out.publish)
    # dave is in the alert channel, not in the dispatch group: no telemetry key, no orders
    assert sorted(inbox_shares(out)) == ["bob-laptop", "bob-phone", "dave-laptop"]  # chain keys
    assert fleet.core.shared_with == ["bob-laptop", "bob-phone"]
    assert fleet.core.dispatchers() == {"bob"}
