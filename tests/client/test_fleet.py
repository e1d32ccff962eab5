"""A person's view of their devices: keys kept, bad reports dropped and logged, keys asked for."""

from __future__ import annotations

import logging
from pathlib import Path

import msgpack
import pytest

from meshchat.client.fleet import ASK_AGAIN, Fleet
from meshchat.client.store import ClientStore
from meshchat.device.telemetry import (
    GpsFix,
    Status,
    encode_gps,
    encode_status,
    key_request_inner,
    key_share_inner,
)
from meshchat.e2ee.telemetry import TelemetrySealer
from meshchat.topics import PresenceTopic, TelemetryTopic

NOW = 1_800_000_000
STATUS = TelemetryTopic("acme", "van-1", "status")
GPS = TelemetryTopic("acme", "van-1", "gps")


@pytest.fixture
def store(tmp_path: Path) -> ClientStore:
    return ClientStore(tmp_path / "client.db")


def test_a_malformed_status_is_dropped_with_a_log_line(
    store: ClientStore, caplog: pytest.LogCaptureFixture
) -> None:
    sealer = TelemetrySealer.new(now=NOW)
    fleet = Fleet(store)
    fleet.take_key("van-1", key_share_inner(sealer.key, ts=NOW))
    bad = sealer.seal(STATUS, msgpack.packb({0: NOW, 1: 150}))
    with caplog.at_level(logging.WARNING, logger="meshchat.client.fleet"):
        fleet.on_message(STATUS, bad)
    assert fleet.status("van-1") is None
    assert fleet.refused("van-1") == 1
    assert "dropped a malformed status report of van-1: battery 150 is outside 0..100" in (
        caplog.text
    )
    fleet.on_message(STATUS, sealer.seal(STATUS, encode_status(Status(NOW, battery=50))))
    assert fleet.status("van-1") == Status(NOW, battery=50)


def test_keys_and_the_last_status_survive_a_restart(store: ClientStore) -> None:
    sealer = TelemetrySealer.new(now=NOW)
    fleet = Fleet(store)
    fleet.take_key("van-1", key_share_inner(sealer.key, ts=NOW))
    fleet.on_message(STATUS, sealer.seal(STATUS, encode_status(Status(NOW + 9, state="late"))))
    fleet.on_message(STATUS, sealer.seal(STATUS, encode_status(Status(NOW, state="early"))))
    assert fleet.status("van-1") == Status(NOW + 9, state="late")  # by the report's own time
    restarted = Fleet(store)
    assert restarted.status("van-1") == Status(NOW + 9, state="late")
    assert restarted.has_key("van-1")
    fix = GpsFix(NOW, 1.5, 2.5)
    restarted.on_message(GPS, sealer.seal(GPS, encode_gps(fix)))
    assert restarted.fix("van-1") == fix


def test_a_report_under_a_missing_key_asks_the_device_now_and_then(store: ClientStore) -> None:
    asked: list[tuple[str, int]] = []
    now = [0.0]
    fleet = Fleet(
        store, ask=lambda device, key_id: asked.append((device, key_id)), clock=lambda: now[0]
    )
    sealer = TelemetrySealer.new(now=NOW)
    fleet.on_message(GPS, sealer.seal(GPS, encode_gps(GpsFix(NOW, 1.0, 1.0))))
    fleet.on_message(GPS, sealer.seal(GPS, encode_gps(GpsFix(NOW + 1, 1.0, 1.0))))
    assert asked == [("van-1", sealer.key.key_id)]
    assert fleet.waiting("van-1") == 2
    now[0] = ASK_AGAIN
    fleet.on_message(GPS, sealer.seal(GPS, encode_gps(GpsFix(NOW + 2, 1.0, 1.0))))
    assert asked == [("van-1", sealer.key.key_id)] * 2
    fleet.take_key("van-1", key_share_inner(sealer.key, ts=NOW))
    assert fleet.waiting("van-1") == 0
    fix = fleet.fix("van-1")
    assert fix is not None
    assert fix.ts == NOW + 2


def test_presence_and_own_key_requests(store: ClientStore) -> None:
    fleet = Fleet(store)
    assert fleet.presence("van-1") is None
    fleet.on_message(PresenceTopic("acme", "van-1"), b"online")
    assert fleet.presence("van-1") is True
    fleet.on_message(PresenceTopic("acme", "van-1"), b"offline")
    assert fleet.presence("van-1") is False
    fleet.on_message(PresenceTopic("acme", "van-1"), b"junk")
    assert fleet.presence("van-1") is False
    fleet.take_key("bob-laptop", key_request_inner(7, ts=NOW))  # another of bob's devices asked
    assert not fleet.has_key("bob-laptop")
