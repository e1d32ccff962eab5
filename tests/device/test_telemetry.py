"""Telemetry, sans-IO: schemas refuse bad fields by name, the profile fits the byte budget, only
key holders read a report, and a report cannot move to another device's or kind's topic."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshchat.device.telemetry import (
    GEOFENCE_READER,
    GpsFix,
    Status,
    decode_fix,
    decode_gps,
    decode_status,
    encode_gps,
    encode_status,
    key_share_inner,
    open_key_share,
    read_report,
    seal_key_share,
)
from meshchat.e2ee import BoxKeyPair, SigningKeyPair
from meshchat.e2ee.telemetry import (
    KEYS_PER_DEVICE,
    MAX_PARKED,
    TelemetryKey,
    TelemetryKeyring,
    TelemetrySealer,
)
from meshchat.envelope import Telemetry, decode, encode
from meshchat.errors import DecryptError, E2EEError, EnvelopeError, TelemetryError
from meshchat.topics import TelemetryTopic

VECTORS = json.loads(
    (Path(__file__).parents[1] / "vectors" / "envelopes.json").read_text(encoding="utf-8")
)
GOLDEN = next(v for v in VECTORS["vectors"] if v["name"] == "telemetry-gps-fix")
NOW = 1_800_000_000
GPS = TelemetryTopic("acme", "van-1", "gps")
STATUS = TelemetryTopic("acme", "van-1", "status")
FULL_FIX = GpsFix(NOW, 52.5200066, 13.404954, accuracy=8, speed=12.5, heading=270, battery=87)


def test_the_golden_fix_opens_with_its_key_and_says_where_the_van_was() -> None:
    key = TelemetryKey(
        GOLDEN["key_id"], bytes.fromhex(GOLDEN["gps_key"]), bytes.fromhex(GOLDEN["status_key"])
    )
    wire = bytes.fromhex(GOLDEN["hex"])
    fix = decode_fix(wire, topic=GOLDEN["topic"], key=key)
    assert fix == FULL_FIX
    assert encode_gps(fix).hex() == GOLDEN["plaintext"]
    # Sealing is deterministic (the counter is the nonce): the vector pins the crypto too.
    sealer = TelemetrySealer(key, created_at=NOW, counter=GOLDEN["counter"])
    assert sealer.seal(GPS, encode_gps(FULL_FIX)) == wire


def test_a_full_fix_fits_the_100_byte_budget_even_with_the_largest_counter() -> None:
    worst = GpsFix(NOW, -89.9999999, -179.9999999, 65_535, 999.99, 359, 100)
    sealer = TelemetrySealer(TelemetryKey(2**32 - 1, bytes(32), bytes(32)), NOW, 2**32 - 2)
    wire = sealer.seal(GPS, encode_gps(worst))
    assert len(encode_gps(worst)) == 28
    assert len(wire) == 58
    assert len(wire) <= 100


@pytest.mark.parametrize(
    ("make", "field", "words"),
    [
        (lambda: GpsFix(NOW, 91.0, 0.0), "lat", "lat 91.0 is outside -90..90 degrees"),
        (lambda: GpsFix(NOW, 0.0, -181.0), "lon", "outside -180..180"),
        (lambda: GpsFix(NOW, math.nan, 0.0), "lat", "outside"),
        (lambda: GpsFix(NOW, 1.0, 1.0, accuracy=-1), "accuracy", "accuracy -1"),
        (lambda: GpsFix(NOW, 1.0, 1.0, speed=5000), "speed", "speed 5000"),
        (lambda: GpsFix(NOW, 1.0, 1.0, heading=400), "heading", "heading 400"),
        (lambda: GpsFix(NOW, 1.0, 1.0, battery=101), "battery", "battery 101 is outside 0..100"),
        (lambda: GpsFix(0, 1.0, 1.0), "ts", "unix seconds"),
        (lambda: GpsFix(NOW, "52.5", 1.0), "lat", "must be a number, not str"),  # type: ignore[arg-type]  # the point
        (lambda: Status(NOW, battery=150), "battery", "battery 150"),
        (lambda: Status(NOW, battery=True), "battery", "whole number, not bool"),
        (lambda: Status(NOW, temperature=500.0), "temperature", "temperature 500.0"),
        (lambda: Status(NOW, load=120.0), "load", "load 120.0"),
        (lambda: Status(NOW, signal=10), "signal", "signal 10"),
        (lambda: Status(NOW, state="x" * 65), "state", "65 characters"),
        (lambda: Status(NOW, extra={"Fan Speed": 3}), "extra", "'Fan Speed'"),
        (lambda: Status(NOW, extra={"rpm": [1]}), "extra.rpm", "number, text or boolean"),  # type: ignore[dict-item]  # the point
        (lambda: Status(NOW, extra={f"k{i}": i for i in range(17)}), "extra", "17 extra"),
    ],
)
def test_a_bad_field_is_refused_on_the_device_with_its_name(
    make: Any, field: str, words: str
) -> None:
    with pytest.raises(TelemetryError) as caught:
        make()
    assert caught.value.field == field
    assert words in str(caught.value)


FIXES = st.builds(
    GpsFix,
    st.integers(1, 2**32 - 1),
    st.floats(-90, 90),
    st.floats(-180, 180),
    st.one_of(st.none(), st.integers(0, 65_535).map(float)),
    st.one_of(st.none(), st.integers(0, 100_000).map(lambda cms: cms / 100)),
    st.one_of(st.none(), st.integers(0, 359).map(float)),
    st.one_of(st.none(), st.integers(0, 100)),
)


@given(FIXES)
def test_a_fix_survives_the_wire_to_its_resolution(fix: GpsFix) -> None:
    back = decode_gps(encode_gps(fix))
    assert abs(back.lat - fix.lat) <= 0.6e-7
    assert abs(back.lon - fix.lon) <= 0.6e-7
    assert (back.ts, back.accuracy, back.speed, back.heading, back.battery) == (
        fix.ts,
        fix.accuracy,
        fix.speed,
        fix.heading,
        fix.battery,
    )
    assert decode_gps(encode_gps(back)) == back


STATUSES = st.builds(
    Status,
    st.integers(1, 2**32 - 1),
    battery=st.one_of(st.none(), st.integers(0, 100)),
    temperature=st.one_of(st.none(), st.integers(-1000, 2000).map(lambda d: d / 10)),
    load=st.one_of(st.none(), st.integers(0, 1000).map(lambda d: d / 10)),
    signal=st.one_of(st.none(), st.integers(-200, 0)),
    uptime=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    state=st.one_of(st.none(), st.text(max_size=64)),
    extra=st.dictionaries(
        st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,31}\Z"),
        st.one_of(st.integers(-(2**63), 2**63), st.booleans(), st.text(max_size=64)),
        max_size=16,
    ),
)


@given(STATUSES)
def test_a_status_survives_the_wire(status: Status) -> None:
    assert decode_status(encode_status(status)) == status


def test_a_short_status_is_small() -> None:
    status = Status(NOW, battery=87, temperature=21.5, load=45.2, state="ok")
    assert len(encode_status(status)) == 20


@pytest.mark.parametrize(
    ("plaintext", "words"),
    [
        (msgpack.packb([NOW, 1, 2]), "array of 7"),
        (msgpack.packb([NOW, 91 * 10**7, 0, None, None, None, None]), "lat"),
        (msgpack.packb([NOW, 0, 0, None, None, 360, None]), "heading 360"),
        (msgpack.packb([NOW, 0, 0, None, None, None, 101]), "battery 101"),
        (msgpack.packb([NOW, 0.5, 0, None, None, None, None]), "lat must be a whole number"),
        (b"\xc1", "not valid msgpack"),
    ],
)
def test_a_malformed_fix_is_refused_on_the_reading_side(plaintext: bytes, words: str) -> None:
    with pytest.raises(TelemetryError, match=words):
        decode_gps(plaintext)


@pytest.mark.parametrize(
    ("plaintext", "words"),
    [
        (msgpack.packb({1: 50}), "no ts"),
        (msgpack.packb({0: NOW, 9: 1}), "unknown field 9"),
        (msgpack.packb({0: NOW, "battery": 1}), "unknown field 'battery'"),
        (msgpack.packb({0: NOW, 1: 150}), "battery 150"),
        (msgpack.packb({0: NOW, 7: {"Bad Name": 1}}), "extra field name"),
        (msgpack.packb([NOW]), "must be a map"),
    ],
)
def test_a_malformed_status_is_refused_on_the_reading_side(plaintext: bytes, words: str) -> None:
    with pytest.raises(TelemetryError, match=words):
        decode_status(plaintext)


def _sealer() -> TelemetrySealer:
    return TelemetrySealer.new(now=NOW)


def test_only_the_key_opens_a_report_and_it_cannot_be_moved_to_another_topic() -> None:
    sealer = _sealer()
    wire = sealer.seal(GPS, encode_gps(FULL_FIX))
    assert decode_fix(wire, topic=GPS, key=sealer.key) == FULL_FIX
    with pytest.raises(DecryptError) as caught:
        decode_fix(wire, topic=GPS, key=TelemetryKey(sealer.key.key_id, bytes(32), None))
    assert caught.value.reason == "bad-ciphertext"
    other_van = TelemetryTopic("acme", "van-2", "gps")
    with pytest.raises(DecryptError, match="moved from another topic"):
        decode_fix(wire, topic=other_van, key=sealer.key)
    with pytest.raises(DecryptError) as unknown:
        decode_fix(wire, topic=GPS, key=TelemetryKey.generate())
    assert unknown.value.reason == "unknown-key"


def test_the_geofence_copy_reads_fixes_but_not_status() -> None:
    sealer = _sealer()
    fixes_only = sealer.key.gps_only()
    fix = sealer.seal(GPS, encode_gps(FULL_FIX))
    status = sealer.seal(STATUS, encode_status(Status(NOW, battery=50)))
    assert decode_fix(fix, topic=GPS, key=fixes_only) == FULL_FIX
    keyring = TelemetryKeyring()
    keyring.add("van-1", fixes_only)
    with pytest.raises(DecryptError) as caught:
        keyring.open(STATUS, status)
    assert caught.value.reason == "key-unavailable"


def test_a_status_on_the_gps_topic_is_refused_by_the_geofence_hook() -> None:
    sealer = _sealer()
    status = sealer.seal(STATUS, encode_status(Status(NOW, battery=50)))
    with pytest.raises(EnvelopeError, match="not a GPS topic"):
        decode_fix(status, topic=STATUS, key=sealer.key)
    with pytest.raises(DecryptError):
        decode_fix(status, topic=GPS, key=sealer.key)  # moved: its AAD names the status topic


def test_the_keyring_parks_reports_until_their_key_and_flags_what_it_saw_before() -> None:
    sealer = _sealer()
    first = sealer.seal(STATUS, encode_status(Status(NOW, battery=90)))
    second = sealer.seal(STATUS, encode_status(Status(NOW + 60, battery=89)))
    keyring = TelemetryKeyring()
    assert keyring.open(STATUS, second) is None
    assert keyring.parked("van-1") == 1
    opened = keyring.add("van-1", sealer.key)
    assert [read_report(o) for o in opened] == [Status(NOW + 60, battery=89)]
    assert keyring.parked("van-1") == 0
    late = keyring.open(STATUS, first)
    assert late is not None
    assert not late.fresh  # older than what was read: a delayed copy, or a replay
    again = keyring.open(STATUS.topic, second)
    assert again is not None
    assert not again.fresh
    newer = keyring.open(STATUS, sealer.seal(STATUS, encode_status(Status(NOW + 120))))
    assert newer is not None
    assert newer.fresh


def test_parked_reports_are_bounded() -> None:
    sealer = _sealer()
    keyring = TelemetryKeyring()
    for _ in range(MAX_PARKED + 10):
        keyring.open(GPS, sealer.seal(GPS, encode_gps(FULL_FIX)))
    assert keyring.parked("van-1") == MAX_PARKED


def test_the_keyring_keeps_a_few_keys_per_device_and_survives_a_restart() -> None:
    keyring = TelemetryKeyring()
    sealers = [_sealer() for _ in range(KEYS_PER_DEVICE + 1)]
    for sealer in sealers:
        keyring.add("van-1", sealer.key)
    assert keyring.key("van-1", sealers[0].key.key_id) is None
    assert keyring.key("van-1") == sealers[-1].key
    wire = sealers[-1].seal(GPS, encode_gps(FULL_FIX))
    opened = keyring.open(GPS, wire)
    assert opened is not None
    restored = TelemetryKeyring.from_bytes(keyring.to_bytes())
    assert restored.devices == ["van-1"]
    again = restored.open(GPS, wire)
    assert again is not None
    assert not again.fresh
    with pytest.raises(E2EEError, match="corrupt"):
        TelemetryKeyring.from_bytes(b"\x93\x01")


def test_the_keyring_refuses_other_envelopes_on_telemetry_topics() -> None:
    keyring = TelemetryKeyring()
    with pytest.raises(EnvelopeError, match="Signed envelope on a telemetry topic"):
        keyring.open(GPS, bytes.fromhex(VECTORS["vectors"][4]["hex"]))
    with pytest.raises(EnvelopeError, match="not a telemetry topic"):
        keyring.open("mc/acme/ops/line1", encode(Telemetry(1, 1, bytes(17))))


def test_the_counter_is_the_nonce_and_never_repeats() -> None:
    sealer = _sealer()
    counters = [
        decode(sealer.seal(GPS, encode_gps(FULL_FIX))).counter  # type: ignore[union-attr]  # a Telemetry envelope
        for _ in range(3)
    ]
    assert counters == [0, 1, 2]
    exhausted = TelemetrySealer(sealer.key, NOW, 2**32 - 1)
    assert exhausted.needs_rotation(now=NOW)
    with pytest.raises(E2EEError, match="exhausted"):
        exhausted.seal(GPS, b"x")
    assert TelemetrySealer(sealer.key, NOW).needs_rotation(now=NOW + 7 * 24 * 3600)


def test_a_key_share_opens_only_for_its_reader_and_names_its_signed_sender() -> None:
    device = SigningKeyPair.generate()
    reader = BoxKeyPair.generate()
    key = TelemetryKey.generate()
    share = seal_key_share(
        key.gps_only(),
        device="van-1",
        signing=device,
        recipient=GEOFENCE_READER,
        recipient_box=reader.public,
        ts=NOW,
    )
    keys = {"van-1": device.public}
    sender, opened = open_key_share(share, reader=reader, signing_key=keys.get)
    assert (sender, opened) == ("van-1", key.gps_only())
    with pytest.raises(DecryptError, match="not sealed to"):
        open_key_share(share, reader=BoxKeyPair.generate(), signing_key=keys.get)
    with pytest.raises(DecryptError, match="bad signature"):
        open_key_share(
            share, reader=reader, signing_key={"van-1": SigningKeyPair.generate().public}.get
        )
    nobody: dict[str, bytes] = {}
    with pytest.raises(DecryptError, match="unknown or revoked"):
        open_key_share(share, reader=reader, signing_key=nobody.get)
    assert key_share_inner(key, ts=NOW).fields == (key.key_id, key.gps, key.status)
