"""The wire codec: golden vectors pin the bytes; bad input is always one clear EnvelopeError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshchat.envelope import (
    MAX_BODY_LEN,
    MAX_ENVELOPE_LEN,
    MAX_SEALED_LEN,
    MAX_TELEMETRY_BOX,
    SIG_LEN,
    Distribution,
    Envelope,
    EnvelopeType,
    GroupMessage,
    Sealed,
    Signed,
    Telemetry,
    decode,
    encode,
)
from meshchat.errors import EnvelopeError, MeshchatError
from meshchat.topics import GroupTopic

VECTORS = json.loads((Path(__file__).parent / "vectors" / "envelopes.json").read_text("utf-8"))
CLASSES: dict[str, type[GroupMessage | Sealed | Signed | Distribution | Telemetry]] = {
    "GroupMessage": GroupMessage,
    "Sealed": Sealed,
    "Signed": Signed,
    "Distribution": Distribution,
    "Telemetry": Telemetry,
}


def from_vector(vector: dict[str, Any]) -> Envelope:
    cls = CLASSES[vector["type"]]
    fields: dict[str, Any] = {
        name: bytes.fromhex(vector[name])
        if name in {"body", "sig", "sealed", "payload", "statement", "key", "box"}
        else vector[name]
        for name in cls.__dataclass_fields__
    }
    return cls(**fields)


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
def test_golden_vector_encodes_and_decodes_exactly(vector: dict[str, Any]) -> None:
    envelope = from_vector(vector)
    wire = bytes.fromhex(vector["hex"])
    assert encode(envelope) == wire
    assert decode(wire) == envelope


def test_every_envelope_type_has_a_golden_vector() -> None:
    covered = {vector["type"] for vector in VECTORS["vectors"]}
    assert covered == set(CLASSES)
    assert len(EnvelopeType) == len(CLASSES)


def test_group_message_byte_layout() -> None:
    body = bytes(4) + bytes(3) + bytes(16)
    wire = encode(GroupMessage(0x01020304, 5, body, b"\x55" * SIG_LEN))
    assert wire[0] == 0x01  # type GROUP (0) << 5 | codec PLAIN (0) << 3 | version 1
    assert wire[1] == 0x94  # fixarray of four fields
    assert wire[2:7] == b"\xce\x01\x02\x03\x04"  # chain_id as uint32
    assert wire[7] == 5  # index as a positive fixint
    assert wire[8:10] == bytes([0xC4, len(body)])  # body as bin8
    assert wire[-66:-64] == b"\xc4\x40"
    assert wire[-64:] == b"\x55" * SIG_LEN
    assert GroupMessage(0x01020304, 5, body, b"\x55" * SIG_LEN).signed_part() == wire[:1] + (
        b"\x93" + wire[2:-66]
    )


def test_header_types_for_sealed_and_signed() -> None:
    assert encode(Sealed("laptop-1", b"x", bytes(64)))[0] == (1 << 5) | 1
    assert encode(Signed("dir", b"x", bytes(64)))[0] == (2 << 5) | 1


def test_telemetry_byte_layout_and_the_gps_fix_budget() -> None:
    # A full GPS fix is a 24-28 byte plaintext; with a 16-byte tag and the largest counter the
    # envelope stays far below the 100-byte payload budget of the device issue.
    wire = encode(Telemetry(0xFFFF_FFFF, 0xFFFF_FFFF, bytes(28 + 16)))
    assert wire[0] == (4 << 5) | 1
    assert wire[1] == 0x93
    assert wire[2:7] == b"\xce\xff\xff\xff\xff"
    assert wire[7:12] == b"\xce\xff\xff\xff\xff"
    assert wire[12:14] == bytes([0xC4, 44])
    assert len(wire) == 58


@pytest.mark.parametrize("index", [0, 127])
def test_twenty_byte_text_fits_the_byte_budget(index: int) -> None:
    # DESIGN.md section 8: envelope <= 125 B, whole MQTT 3.1.1 PUBLISH <= 165 B, for a 20-byte
    # text with a 32-bit chain id and seconds as timestamp. Indices 128 and up cost 2 bytes more.
    inner = msgpack.packb([0, 1_795_000_000, "x" * 20], use_bin_type=True)
    body = bytes(4) + bytes(len(inner)) + bytes(16)
    wire = encode(GroupMessage(0xFFFF_FFFF, index, body, bytes(64)))
    assert len(wire) == 124
    topic = GroupTopic("acme", "ops", "night-shift").topic.encode()
    remaining = 2 + len(topic) + 2 + len(wire)  # topic length, topic, packet id (QoS 1), payload
    publish = 1 + (1 if remaining < 128 else 2) + remaining
    assert publish <= 165


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"\x02\x90", "version 2"),
        (b"\x00\x90", "version 0"),
        (b"\x09\x90", "codec 1"),
        (b"\xe1\x90", "type 7"),
        (b"\x01", "not valid msgpack"),
        (b"\x01\x94\x01\x02\x03", "not valid msgpack"),
        (b"\x01\x93\x01\x02\x03", "3 fields"),
        (b"\x01\x81\x01\x02", "not valid msgpack"),  # maps are not allowed at all
        (b"\x01\x01", "must be an array"),
        (b"\x01\xdd\xff\xff\xff\xff", "max_array_len"),
        (b"\x01\xc6\xff\xff\xff\xff", "not valid msgpack"),
        (b"\x01" + b"\x91" * 10_000, "not valid msgpack"),
        (
            b"\x01\x94\xc3\x01\xc4\x14" + bytes(20) + b"\xc4\x40" + bytes(64),
            "chain_id must be an integer",
        ),
        (b"\x01\x94\x01\xff\xc4\x14" + bytes(20) + b"\xc4\x40" + bytes(64), "index -1"),
        (b"\x01\x94\x01\x01\xc4\x13" + bytes(19) + b"\xc4\x40" + bytes(64), "body is 19 bytes"),
        (b"\x01\x94\x01\x01\xc4\x14" + bytes(20) + b"\xc4\x3f" + bytes(63), "sig is 63 bytes"),
        (b"\x01\x94\x01\x01\xa1x\xc4\x40" + bytes(64), "body must be bytes"),
        (b"\x01\x94\x01\x01\xc4\x14" + bytes(20) + b"\xc4\x40" + bytes(64) + b"\x00", "extra data"),
        (b"\x01\x94\xcc\x01\x01\xc4\x14" + bytes(20) + b"\xc4\x40" + bytes(64), "canonical"),
        (b"\x21\x93\xa2Op\xa1x\xc4\x40" + bytes(64), "upper-case"),
        (b"\x21\x93\xa2\xff\xfe\xa1x\xc4\x40" + bytes(64), "not valid msgpack"),
        (bytes([0x01]) + bytes(MAX_ENVELOPE_LEN), "the limit is"),
        (b"\x81\x92\x01\x02", "2 fields"),
        (b"\x81\x93\x01\x02\xc4\x10" + bytes(16), "box is 16 bytes"),
        (b"\x81\x93\xc2\x02\xc4\x11" + bytes(17), "key_id must be an integer"),
        (b"\x81\x93\x01\xcf" + bytes([1] + [0] * 7) + b"\xc4\x11" + bytes(17), "counter"),
        (b"\x81\x93\x01\x02\xa3abc", "box must be bytes"),
        (b"\x81\x93\xcc\x01\x02\xc4\x11" + bytes(17), "canonical"),
        (b"\x81\x93\x01\x02\xc5\x10\x01" + bytes(4097), "box is 4097 bytes"),
    ],
)
def test_malformed_input_is_one_clear_envelope_error(data: bytes, words: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        decode(data)
    assert words in str(caught.value)
    assert isinstance(caught.value, MeshchatError)


def test_non_bytes_input_is_an_envelope_error() -> None:
    with pytest.raises(EnvelopeError, match="must be bytes"):
        decode("text")  # type: ignore[arg-type]  # the point of the test


def test_invalid_envelopes_cannot_be_built() -> None:
    with pytest.raises(EnvelopeError, match="chain_id"):
        GroupMessage(2**32, 0, bytes(20), bytes(64))
    with pytest.raises(EnvelopeError, match="sender device name"):
        Sealed("_d", b"x", bytes(64))
    with pytest.raises(EnvelopeError, match="payload"):
        Signed("dir", b"", bytes(64))
    with pytest.raises(EnvelopeError, match="box is"):
        Telemetry(1, 0, bytes(MAX_TELEMETRY_BOX + 1))


def test_largest_envelopes_fit_the_wire_limit_and_larger_cannot_be_built() -> None:
    largest: list[Envelope] = [
        GroupMessage(2**32 - 1, 2**32 - 1, bytes(MAX_BODY_LEN), bytes(64)),
        Signed("x" * 32, bytes(MAX_BODY_LEN), bytes(64)),
        Sealed("x" * 32, bytes(MAX_SEALED_LEN), bytes(64)),
    ]
    for envelope in largest:
        wire = encode(envelope)
        assert len(wire) <= MAX_ENVELOPE_LEN
        assert decode(wire) == envelope
    with pytest.raises(EnvelopeError, match="body is"):
        GroupMessage(1, 1, bytes(MAX_BODY_LEN + 1), bytes(64))
    with pytest.raises(EnvelopeError, match="sealed is"):
        Sealed("a", bytes(MAX_SEALED_LEN + 1), bytes(64))


NAMES = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,31}\Z")
ENVELOPES: st.SearchStrategy[Envelope] = st.one_of(
    st.builds(
        GroupMessage,
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.binary(min_size=20, max_size=600),
        st.binary(min_size=64, max_size=64),
    ),
    st.builds(
        Sealed, NAMES, st.binary(min_size=1, max_size=300), st.binary(min_size=64, max_size=64)
    ),
    st.builds(
        Signed, NAMES, st.binary(min_size=1, max_size=300), st.binary(min_size=64, max_size=64)
    ),
    st.builds(
        Distribution,
        NAMES,
        st.binary(min_size=1, max_size=512),
        st.binary(min_size=48, max_size=48),
        st.binary(min_size=64, max_size=64),
    ),
    st.builds(
        Telemetry,
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.binary(min_size=17, max_size=300),
    ),
)


@given(ENVELOPES)
def test_round_trip(envelope: Envelope) -> None:
    assert decode(encode(envelope)) == envelope


@given(ENVELOPES, st.data())
def test_any_truncation_is_refused(envelope: Envelope, data: st.DataObject) -> None:
    wire = encode(envelope)
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(EnvelopeError):
        decode(wire[:cut])
