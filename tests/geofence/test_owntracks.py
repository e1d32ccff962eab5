"""OwnTracks payloads: every shared sample gives its expected outcome; strict and bounded."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshchat.geofence import (
    DECRYPT_REASONS,
    MAX_PAYLOAD,
    Command,
    Ignored,
    LastWill,
    Location,
    OwnTracksError,
    Region,
    Transition,
    Waypoints,
    derive_key,
    encrypt_payload,
    parse_payload,
    parse_rec_line,
    set_waypoints,
)

SAMPLES_FILE = Path(__file__).parents[1] / "testdata" / "owntracks" / "samples.json"
SAMPLES: list[dict[str, Any]] = json.loads(SAMPLES_FILE.read_text(encoding="utf-8"))["samples"]
VECTOR = next(s for s in SAMPLES if s["id"] == "encrypted-generated-vector")
KEY = derive_key(VECTOR["source"]["passphrase"])


def keys(_user: str, _device: str) -> bytes:
    """Every device uses the vector's passphrase, so the decrypt paths are reached."""
    return KEY


def test_every_expected_outcome_is_covered() -> None:
    assert {s["expect"] for s in SAMPLES} == {
        "accept",
        "accept-but-ignore-fix",
        "accept-after-decrypt",
        "accept-with-coercion",
        "accept-ignore-follow",
        "parse-rec-line",
        "reject",
        "reject-decrypt",
    }


@pytest.mark.parametrize("sample", SAMPLES, ids=[s["id"] for s in SAMPLES])
def test_every_sample_gives_its_expected_outcome(sample: dict[str, Any]) -> None:
    raw: str = sample["raw"]
    expect: str = sample["expect"]
    topic: str | None = sample["topic"]
    if expect == "parse-rec-line":
        line = parse_rec_line(raw)
        message = parse_payload(line.payload, line.topic("jane", "nokia"))
        assert isinstance(message, Location)
        assert message.fix is not None
        assert message.fix.ts == json.loads(line.payload)["tst"]
        return
    if expect == "reject":
        with pytest.raises(OwnTracksError) as refused:
            parse_payload(raw.encode(), topic, keys=keys)
        assert refused.value.reason == "bad-field"
        return
    if expect == "reject-decrypt":
        with pytest.raises(OwnTracksError) as refused:
            parse_payload(raw.encode(), topic, keys=keys)
        assert refused.value.reason in DECRYPT_REASONS - {"no-key"}
        return
    message = parse_payload(raw.encode(), topic, keys=keys)
    parsed = sample["parsed"]
    match expect:
        case "accept-after-decrypt":
            assert isinstance(message, Location)
            assert message.encrypted
            plain = next(s for s in SAMPLES if s["id"] == sample["source"]["plaintext_id"])
            expected = parse_payload(plain["raw"].encode(), topic)
            assert isinstance(expected, Location)
            assert message == dataclasses.replace(expected, encrypted=True)
        case "accept-but-ignore-fix":
            assert isinstance(message, Location)
            assert message.fix is None
        case "accept-with-coercion":
            assert isinstance(message, Waypoints)
            (region,) = message.regions
            assert (region.rad, region.tst) == (float(parsed["rad"]), int(parsed["tst"]))
        case "accept-ignore-follow":
            assert isinstance(message, Waypoints)
            assert message.regions == ()
        case "accept":
            _check_accepted(message, parsed, topic)
        case _:
            pytest.fail(f"no check for {expect}")


def _check_accepted(message: object, parsed: dict[str, Any], topic: str | None) -> None:
    kind = parsed["_type"]
    if kind == "location":
        assert isinstance(message, Location)
        assert message.fix is not None
        assert (message.fix.lat, message.fix.lon, message.fix.ts) == (
            parsed["lat"],
            parsed["lon"],
            parsed["tst"],
        )
        assert message.fix.acc == parsed.get("acc")  # missing stays unknown, never 0
        if topic is None:  # HTTP mode: the identity comes from the payload
            assert (message.user, message.device) == tuple(parsed["topic"].split("/")[1:])
    elif kind == "transition":
        assert isinstance(message, Transition)
        assert message.event == parsed["event"]
        # A beacon transition's position is not a fix; a circular region's is.
        assert (message.fix is None) == (parsed.get("t") == "b")
    elif kind == "lwt":
        assert isinstance(message, LastWill)
    elif kind == "waypoint":
        assert isinstance(message, Waypoints)
        assert message.regions[0].rad == parsed["rad"]
    elif kind == "cmd":
        assert isinstance(message, Command)
        assert [r.desc for r in message.regions] == ["home", "work"]
    else:
        assert isinstance(message, Ignored)
        assert message.type == kind


def test_the_generated_vector_decrypts_to_the_exact_plaintext() -> None:
    data = base64.b64decode(json.loads(VECTOR["raw"])["data"])
    nonce = bytes.fromhex(VECTOR["source"]["nonce_hex"])
    assert data[:24] == nonce
    plain = next(s for s in SAMPLES if s["id"] == "location-quicksetup")["raw"].encode()
    assert encrypt_payload(KEY, plain, nonce=nonce) == VECTOR["raw"].replace(" ", "").encode()


def test_encrypted_messages_need_the_devices_own_key() -> None:
    payload = encrypt_payload(derive_key("another passphrase"), b'{"_type":"lwt"}')
    with pytest.raises(OwnTracksError) as refused:
        parse_payload(payload, "owntracks/jane/nokia", keys=keys)
    assert refused.value.reason == "bad-ciphertext"
    with pytest.raises(OwnTracksError) as refused:
        parse_payload(payload, "owntracks/jane/nokia")
    assert refused.value.reason == "no-key"


def test_the_mqtt_topic_decides_who_sent_it_never_the_payload() -> None:
    payload = b'{"_type":"location","lat":1,"lon":2,"tst":1700000000,"topic":"owntracks/boss/x"}'
    message = parse_payload(payload, "owntracks/carol/phone")
    assert (message.user, message.device) == ("carol", "phone")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"x" * (MAX_PAYLOAD + 1), "too-large"),
        (b'{"_type":"location","lat":NaN,"lon":2,"tst":1700000000}', "not-json"),
        (b"[" * 100_000 + b"]" * 100_000, "too-large"),
        (b"[" * 30_000 + b"]" * 30_000, "not-json"),
        (b'{"_type":"location","lat":91,"lon":2,"tst":1700000000}', "bad-field"),
        (b'{"_type":"location","lat":1,"lon":2,"tst":-5}', "bad-field"),
        (b'{"_type":"location","lat":1,"lon":2,"tst":true}', "bad-field"),
        (b'{"_type":"location","lat":1,"lon":2,"tst":"soon"}', "bad-field"),
        (b'{"_type":"transition","event":"dance","lat":1,"lon":2,"tst":1700000000}', "bad-field"),
        (b'{"lat":1}', "bad-field"),
        (b'"location"', "not-json"),
        (b"\xff\xfe", "not-json"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(OwnTracksError) as refused:
        parse_payload(payload, "owntracks/carol/phone")
    assert refused.value.reason == reason


def test_an_encrypted_message_inside_an_encrypted_one_is_refused() -> None:
    inner = encrypt_payload(KEY, b'{"_type":"lwt"}')
    with pytest.raises(OwnTracksError, match="inside"):
        parse_payload(encrypt_payload(KEY, inner), "owntracks/carol/phone", keys=keys)


@given(st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
def test_no_input_crashes_the_parser(payload: bytes) -> None:
    with contextlib.suppress(OwnTracksError):
        parse_payload(payload, "owntracks/carol/phone", keys=keys)


def test_site_regions_are_pushed_in_the_apps_setwaypoints_format() -> None:
    sample = next(s for s in SAMPLES if s["id"] == "cmd-setWaypoints")
    regions = [Region("plant-3", 48.137, 11.575, 150.5, 1708625557, "meshchat-plant-3")]
    payload = set_waypoints(regions)
    ours, theirs = json.loads(payload), sample["parsed"]
    assert ours.keys() == theirs.keys()
    assert ours["waypoints"]["waypoints"][0].keys() == theirs["waypoints"]["waypoints"][0].keys()
    parsed = parse_payload(payload, "owntracks/carol/phone/cmd")
    assert isinstance(parsed, Command)
    assert parsed.regions == (
        Region("plant-3", 48.137, 11.575, 151, 1708625557, "meshchat-plant-3"),
    )
