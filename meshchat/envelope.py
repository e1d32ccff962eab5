"""The meshchat wire codec: versioned, size-limited msgpack envelopes (DESIGN.md section 4).

Layout of every envelope::

    header (1 byte) || msgpack array of the type's fields

The header byte packs three fields, so the smallest message stays small on a thin link::

    bit 7 6 5 | 4 3   | 2 1 0
        type  | codec | version

- ``version`` (bits 0-2): the wire format version, 1 today. A decoder rejects any other, so a
  later version is free to redefine every other bit and byte.
- ``codec`` (bits 3-4): how the array is coded. ``0`` is plain msgpack; ``1``-``3`` are reserved
  for the low-bandwidth work (compression) and are rejected until a decoder understands them.
- ``type`` (bits 5-7): which envelope this is (`EnvelopeType`).

Envelope types and their fields:

- ``GROUP`` (0), a group message: ``[chain_id:u32, index:uint, body, sig(64)]`` where body is
  ``guard(4) || ciphertext || tag(16)``. The group is not in the envelope: the topic carries it
  and the E2EE layer binds it into AAD and signature.
- ``SEALED`` (1), a pairwise payload for one device's inbox: ``[sender, sealed, sig(64)]`` where
  ``sender`` is the sending device's name and ``sealed`` a SealedBox ciphertext.
- ``SIGNED`` (2), a signed public document (roster, key record): ``[signer, payload, sig(64)]``.
- ``DIST`` (3), one recipient's copy of a chain distribution: ``[sender, statement, key, sig(64)]``
  where ``statement`` (the group, chain, position, chain verify key and an ephemeral X25519 key)
  is the same for every recipient of one rekey and signed once, and ``key`` is the chain key
  encrypted to this recipient (48 bytes). One signature per rekey keeps a 1,000-device rekey
  within its CPU budget.
- ``TELEMETRY`` (4), a device's status report or GPS fix in the compact telemetry profile:
  ``[key_id:u32, counter:u32, box]`` where ``box`` is ``ciphertext || tag(16)``. No signature:
  the per-device telemetry key authenticates it (`meshchat.e2ee.telemetry` says what that does
  and does not prove). The topic names device and kind and is bound into the AAD.

Decoding trusts nothing: the whole input is bounded, msgpack is unpacked with strict limits,
every field is type- and range-checked, only the canonical (shortest) msgpack encoding is
accepted, and any malformed input raises `EnvelopeError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, TypeAlias

import msgpack

from meshchat.errors import EnvelopeError, TopicError
from meshchat.topics import validate_name
from meshchat.wire import unpack

__all__ = [
    "DIST_KEY_LEN",
    "GUARD_LEN",
    "MAX_BODY_LEN",
    "MAX_ENVELOPE_LEN",
    "MAX_SEALED_LEN",
    "MAX_STATEMENT_LEN",
    "MAX_TELEMETRY_BOX",
    "MIN_BODY_LEN",
    "SIG_LEN",
    "TAG_LEN",
    "VERSION",
    "Codec",
    "Distribution",
    "Envelope",
    "EnvelopeType",
    "GroupMessage",
    "Sealed",
    "Signed",
    "Telemetry",
    "decode",
    "encode",
]

VERSION: Final = 1
SIG_LEN: Final = 64
GUARD_LEN: Final = 4
TAG_LEN: Final = 16
MIN_BODY_LEN: Final = GUARD_LEN + TAG_LEN
"""A group body is at least the 4-byte guard and the 16-byte tag (empty plaintext)."""
MAX_ENVELOPE_LEN: Final = 256 * 1024
"""Largest envelope on the wire; files travel as chunks well below this."""
MAX_BODY_LEN: Final = MAX_ENVELOPE_LEN - 128
MAX_SEALED_LEN: Final = 64 * 1024
"""Pairwise payloads carry keys, requests and short direct messages, never bulk data."""
MAX_STATEMENT_LEN: Final = 512
DIST_KEY_LEN: Final = 48
"""A 32-byte chain key and its 16-byte tag."""
MAX_CHAIN_ID: Final = 2**32 - 1
MAX_INDEX: Final = 2**32 - 1
"""Chains rotate every 1000 messages; a 32-bit index leaves a wide margin and bounds the field."""
MAX_TELEMETRY_BOX: Final = 4096
"""A status report or fix is tens of bytes; anything near this is not telemetry."""

_VERSION_MASK: Final = 0b0000_0111
_CODEC_SHIFT: Final = 3
_CODEC_MASK: Final = 0b11
_TYPE_SHIFT: Final = 5


class EnvelopeType(enum.IntEnum):
    """Which envelope a header announces."""

    GROUP = 0
    SEALED = 1
    SIGNED = 2
    DIST = 3
    TELEMETRY = 4


class Codec(enum.IntEnum):
    """How the msgpack array after the header is coded."""

    PLAIN = 0


@dataclass(frozen=True, slots=True)
class GroupMessage:
    """A group message in the signed profile: one step of a sender-key chain."""

    chain_id: int
    index: int
    body: bytes
    sig: bytes

    def __post_init__(self) -> None:
        """Check ranges and lengths, so an invalid envelope cannot even be built."""
        _check_uint(self.chain_id, MAX_CHAIN_ID, "chain_id")
        _check_uint(self.index, MAX_INDEX, "index")
        _check_bytes(self.body, "body", MIN_BODY_LEN, MAX_BODY_LEN)
        _check_bytes(self.sig, "sig", SIG_LEN, SIG_LEN)

    @staticmethod
    def header() -> bytes:
        """The header byte of a group message (bound into the AAD)."""
        return _header(EnvelopeType.GROUP)

    def signed_part(self) -> bytes:
        """The bytes the chain key signs: header and every field before the signature."""
        return _header(EnvelopeType.GROUP) + _pack([self.chain_id, self.index, self.body])


@dataclass(frozen=True, slots=True)
class Sealed:
    """A payload sealed to one device and signed by the sending device."""

    sender: str
    sealed: bytes
    sig: bytes

    def __post_init__(self) -> None:
        """Check the sender name and the lengths."""
        _check_name(self.sender, "sender device name")
        _check_bytes(self.sealed, "sealed", 1, MAX_SEALED_LEN)
        _check_bytes(self.sig, "sig", SIG_LEN, SIG_LEN)

    def signed_part(self) -> bytes:
        """The bytes the sending device signs."""
        return _header(EnvelopeType.SEALED) + _pack([self.sender, self.sealed])


@dataclass(frozen=True, slots=True)
class Signed:
    """A signed public document: a roster or a key record."""

    signer: str
    payload: bytes
    sig: bytes

    def __post_init__(self) -> None:
        """Check the signer name and the lengths."""
        _check_name(self.signer, "signer name")
        _check_bytes(self.payload, "payload", 1, MAX_BODY_LEN)
        _check_bytes(self.sig, "sig", SIG_LEN, SIG_LEN)

    def signed_part(self) -> bytes:
        """The bytes the signer signs."""
        return _header(EnvelopeType.SIGNED) + _pack([self.signer, self.payload])


@dataclass(frozen=True, slots=True)
class Distribution:
    """One recipient's copy of a chain distribution."""

    sender: str
    statement: bytes
    key: bytes
    sig: bytes

    def __post_init__(self) -> None:
        """Check the sender name and the lengths."""
        _check_name(self.sender, "sender device name")
        _check_bytes(self.statement, "statement", 1, MAX_STATEMENT_LEN)
        _check_bytes(self.key, "key", DIST_KEY_LEN, DIST_KEY_LEN)
        _check_bytes(self.sig, "sig", SIG_LEN, SIG_LEN)


@dataclass(frozen=True, slots=True)
class Telemetry:
    """A status report or GPS fix, encrypted under the sending device's telemetry key.

    Attributes:
        key_id: which of the device's telemetry keys sealed it.
        counter: the key's message counter; it is the nonce, so it never repeats under one key.
        box: ciphertext and its 16-byte tag.
    """

    key_id: int
    counter: int
    box: bytes

    def __post_init__(self) -> None:
        """Check ranges and lengths."""
        _check_uint(self.key_id, MAX_CHAIN_ID, "key_id")
        _check_uint(self.counter, MAX_INDEX, "counter")
        _check_bytes(self.box, "box", TAG_LEN + 1, MAX_TELEMETRY_BOX)

    @staticmethod
    def header() -> bytes:
        """The header byte of a telemetry envelope (bound into the AAD)."""
        return _header(EnvelopeType.TELEMETRY)


Envelope: TypeAlias = GroupMessage | Sealed | Signed | Distribution | Telemetry


def _check_uint(value: object, maximum: int, what: str) -> None:
    # bool is an int subclass; msgpack's true/false must not pass as 1/0.
    if type(value) is not int:
        raise EnvelopeError(f"{what} must be an integer, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise EnvelopeError(f"{what} {value} is outside 0..{maximum}")


def _check_bytes(value: object, what: str, minimum: int, maximum: int) -> None:
    if type(value) is not bytes:
        raise EnvelopeError(f"{what} must be bytes, not {type(value).__name__}")
    if not minimum <= len(value) <= maximum:
        if minimum == maximum:
            raise EnvelopeError(f"{what} is {len(value)} bytes; it must be {minimum}")
        raise EnvelopeError(f"{what} is {len(value)} bytes; it must be {minimum} to {maximum}")


def _check_name(value: object, what: str) -> None:
    try:
        validate_name(value, what)
    except TopicError as exc:
        raise EnvelopeError(str(exc)) from exc


def _header(kind: EnvelopeType, codec: Codec = Codec.PLAIN) -> bytes:
    return bytes([(kind << _TYPE_SHIFT) | (codec << _CODEC_SHIFT) | VERSION])


def _pack(fields: list[object]) -> bytes:
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def encode(envelope: Envelope) -> bytes:
    """Encode an envelope for the wire.

    The field limits checked when an envelope is built keep every encoding within
    `MAX_ENVELOPE_LEN`.
    """
    match envelope:
        case GroupMessage():
            data = _header(EnvelopeType.GROUP) + _pack(
                [envelope.chain_id, envelope.index, envelope.body, envelope.sig]
            )
        case Sealed():
            data = _header(EnvelopeType.SEALED) + _pack(
                [envelope.sender, envelope.sealed, envelope.sig]
            )
        case Signed():
            data = _header(EnvelopeType.SIGNED) + _pack(
                [envelope.signer, envelope.payload, envelope.sig]
            )
        case Distribution():
            data = _header(EnvelopeType.DIST) + _pack(
                [envelope.sender, envelope.statement, envelope.key, envelope.sig]
            )
        case Telemetry():
            data = _header(EnvelopeType.TELEMETRY) + _pack(
                [envelope.key_id, envelope.counter, envelope.box]
            )
    return data


_FIELD_COUNT: Final = {
    EnvelopeType.GROUP: 4,
    EnvelopeType.SEALED: 3,
    EnvelopeType.SIGNED: 3,
    EnvelopeType.DIST: 4,
    EnvelopeType.TELEMETRY: 3,
}


def _unpack_fields(data: bytes, kind: EnvelopeType) -> list[object]:
    fields = unpack(data, "envelope body", max_str=256, max_bin=MAX_BODY_LEN, max_array=8)
    if not isinstance(fields, list):
        raise EnvelopeError(f"envelope body must be an array, not {type(fields).__name__}")
    expected = _FIELD_COUNT[kind]
    if len(fields) != expected:
        raise EnvelopeError(
            f"{kind.name.lower()} envelope has {len(fields)} fields; it must have {expected}"
        )
    return fields


def _parse_header(header: int) -> EnvelopeType:
    version = header & _VERSION_MASK
    if version != VERSION:
        raise EnvelopeError(f"envelope version {version} is not supported (this is {VERSION})")
    codec = (header >> _CODEC_SHIFT) & _CODEC_MASK
    if codec != Codec.PLAIN:
        raise EnvelopeError(f"envelope codec {codec} is not supported")
    try:
        return EnvelopeType(header >> _TYPE_SHIFT)
    except ValueError as exc:
        raise EnvelopeError(f"envelope type {header >> _TYPE_SHIFT} is unknown") from exc


def decode(data: bytes | bytearray | memoryview) -> Envelope:
    """Decode an envelope received from the network.

    Args:
        data: the raw MQTT payload. It is untrusted.

    Returns:
        The envelope, with every field checked.

    Raises:
        EnvelopeError: for every malformed, oversize, unknown or unsupported input, and nothing
            else.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EnvelopeError(f"envelope must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if not raw:
        raise EnvelopeError("envelope is empty")
    if len(raw) > MAX_ENVELOPE_LEN:
        raise EnvelopeError(f"envelope is {len(raw)} bytes; the limit is {MAX_ENVELOPE_LEN}")
    kind = _parse_header(raw[0])
    fields = _unpack_fields(raw[1:], kind)
    envelope: Envelope
    # The field types are checked in each class's __post_init__.
    match kind:
        case EnvelopeType.GROUP:
            envelope = GroupMessage(*fields)  # type: ignore[arg-type]
        case EnvelopeType.SEALED:
            envelope = Sealed(*fields)  # type: ignore[arg-type]
        case EnvelopeType.SIGNED:
            envelope = Signed(*fields)  # type: ignore[arg-type]
        case EnvelopeType.DIST:
            envelope = Distribution(*fields)  # type: ignore[arg-type]
        case EnvelopeType.TELEMETRY:
            envelope = Telemetry(*fields)  # type: ignore[arg-type]
    # msgpack admits several encodings of one value (an int as fixint or uint32, ...). Accepting
    # only the canonical one makes every envelope's bytes a function of its fields, so a relay
    # cannot re-encode a message into a "different" envelope for the same (chain, index).
    if encode(envelope) != raw:
        raise EnvelopeError("envelope is not in canonical encoding")
    return envelope
