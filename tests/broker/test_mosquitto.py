"""Mosquitto, the external broker of the tests: the fixture starts a real one on a free port."""

from __future__ import annotations

from tests.brokers import Mosquitto
from tests.mqtt import round_trip


async def test_mosquitto_fixture_routes_messages(mosquitto: Mosquitto) -> None:
    assert mosquitto.process.poll() is None
    assert (
        await round_trip(mosquitto.host, mosquitto.port, b"\x00\xff binary") == b"\x00\xff binary"
    )


async def test_both_brokers_deliver_the_same_qos1_payloads(any_broker: tuple[str, int]) -> None:
    host, port = any_broker
    for payload in (b"", b"x", bytes(range(256)) * 64):
        assert await round_trip(host, port, payload) == payload
