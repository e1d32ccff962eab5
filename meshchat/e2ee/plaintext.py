"""The inner plaintext of a group message: kind, timestamp and fields, optionally compressed.

Layout (what the chain encrypts)::

    kind byte || msgpack([ts, field, ...])            codec 0: plain
    kind byte || zlib(msgpack([ts, field, ...]))      codec 1: deflate, for long texts and files

The kind byte holds the message kind in bits 0-4 and the codec in bits 5-6, so a short text costs
one byte of framing. A message id is the (chain id, index) of the envelope that carried it, so
references (reply, edit, recall, react, ack, receipt) name the referenced message by that pair.
Decoding is strict: unknown kinds, wrong field types and oversize inputs raise `EnvelopeError`.
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass
from typing import Final

import msgpack

from meshchat.errors import EnvelopeError
from meshchat.wire import unpack

__all__ = ["FIELDS", "Inner", "InnerCodec", "Kind", "decode_inner", "encode_inner"]

MAX_INNER_LEN: Final = 256 * 1024
COMPRESS_FROM: Final = 256
"""Texts shorter than this are never worth deflating."""
_KIND_MASK: Final = 0b0001_1111
_CODEC_SHIFT: Final = 5
_CODEC_MASK: Final = 0b11


class Kind(enum.IntEnum):
    """What a message is."""

    TEXT = 0
    REPLY = 1
    EDIT = 2
    RECALL = 3
    REACT = 4
    RECEIPT = 5
    FILE = 6
    CHUNK = 7
    URGENT = 8
    ACK = 9
    WORKORDER = 10
    NOTICE = 11
    TELEMETRY_KEY = 12
    ORDER_STATE = 13


class InnerCodec(enum.IntEnum):
    """How the inner msgpack is coded before encryption."""

    PLAIN = 0
    DEFLATE = 1


# Field types after the timestamp, per kind. "ref" is a (chain id, index) message id.
_STR, _INT, _BYTES, _REF, _REFS = "str", "int", "bytes", "ref", "refs"
FIELDS: Final[dict[Kind, tuple[str, ...]]] = {
    Kind.TEXT: (_STR,),  # markdown
    Kind.REPLY: (_STR, _REF),
    Kind.EDIT: (_STR, _REF),
    Kind.RECALL: (_REF,),
    Kind.REACT: (_STR, _REF),
    Kind.RECEIPT: (_INT, _REFS),  # 0 delivered, 1 read
    Kind.FILE: (_STR, _INT, _BYTES, _INT, _STR),  # name, size, sha256, chunks, media type
    Kind.CHUNK: (_REF, _INT, _BYTES),  # file message, chunk number, data
    Kind.URGENT: (_STR,),
    Kind.ACK: (_REF,),
    Kind.WORKORDER: (_STR, _STR),  # order id, text
    Kind.NOTICE: (_STR,),  # system notices (site joined, key rotated, ...)
    Kind.TELEMETRY_KEY: (_INT, _BYTES, _BYTES),  # key id, gps key, status key; b"", b"": ask
    Kind.ORDER_STATE: (_STR, _STR, _STR),  # order id, accepted|done|rejected, reason
}
_MAX_REFS: Final = 1000
_U32: Final = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Inner:
    """A decrypted message: kind, sender's timestamp (unix seconds) and the kind's fields."""

    kind: Kind
    ts: int
    fields: tuple[object, ...]

    def __post_init__(self) -> None:
        """Check the fields against the kind's schema; message ids become tuples."""
        object.__setattr__(self, "fields", _checked(self.kind, self.ts, self.fields))


def _ref(value: object) -> tuple[int, int] | None:
    """A (chain id, index) message id, or None if `value` is not one."""
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(type(part) is int and 0 <= part <= _U32 for part in value)
    ):
        return (int(value[0]), int(value[1]))
    return None


def _field(value: object, expected: str) -> tuple[bool, object]:
    """(whether `value` has the `expected` type, the value as kept: message ids as tuples)."""
    if expected == _STR:
        return isinstance(value, str), value
    if expected == _INT:
        return type(value) is int and 0 <= value <= 2**53, value
    if expected == _BYTES:
        return isinstance(value, bytes), value
    if expected == _REF:
        ref = _ref(value)
        return ref is not None, ref
    if not isinstance(value, list | tuple) or len(value) > _MAX_REFS:
        return False, value
    refs = tuple(_ref(item) for item in value)
    return None not in refs, refs


_WANTED: Final = {
    _STR: "must be text",
    _INT: "must be a non-negative integer",
    _BYTES: "must be bytes",
    _REF: "must be a (chain id, index) pair",
    _REFS: f"must be a list of at most {_MAX_REFS} message ids",
}


def _checked(kind: Kind, ts: object, fields: tuple[object, ...]) -> tuple[object, ...]:
    """`fields` as kept, after checking them against the kind's schema.

    Raises:
        EnvelopeError: a bad timestamp, the wrong number of fields, or a field of the wrong type.
    """
    if type(ts) is not int or not 0 <= ts <= _U32:
        raise EnvelopeError("timestamp must be unix seconds (0..2**32-1)")
    schema = FIELDS[kind]
    if len(fields) != len(schema):
        raise EnvelopeError(
            f"{kind.name.lower()} message has {len(fields)} fields; it must have {len(schema)}"
        )
    kept: list[object] = []
    for number, (value, expected) in enumerate(zip(fields, schema, strict=True)):
        ok, converted = _field(value, expected)
        if not ok:
            raise EnvelopeError(f"{kind.name.lower()} field {number + 1} {_WANTED[expected]}")
        kept.append(converted)
    return tuple(kept)


def _normalise(value: object) -> object:
    """Tuples become lists, so what decodes equals what was encoded."""
    if isinstance(value, tuple | list):
        return [_normalise(item) for item in value]
    return value


def encode_inner(message: Inner, *, codec: InnerCodec | None = None) -> bytes:
    """The plaintext bytes to encrypt; long payloads are deflated unless `codec` says otherwise."""
    packed: bytes = msgpack.packb(
        [message.ts, *(_normalise(f) for f in message.fields)], use_bin_type=True
    )
    chosen = codec
    if chosen is None:
        chosen = InnerCodec.DEFLATE if len(packed) >= COMPRESS_FROM else InnerCodec.PLAIN
    if chosen is InnerCodec.DEFLATE:
        deflated = zlib.compress(packed, 6)
        if codec is None and len(deflated) >= len(packed):
            chosen, deflated = InnerCodec.PLAIN, packed
        packed = deflated
    return bytes([message.kind | (chosen << _CODEC_SHIFT)]) + packed


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_INNER_LEN + 1)
    except zlib.error as exc:
        raise EnvelopeError(f"compressed message is corrupt: {exc}") from exc
    if len(out) > MAX_INNER_LEN or inflater.unconsumed_tail:
        raise EnvelopeError(f"message inflates beyond {MAX_INNER_LEN} bytes")
    if not inflater.eof:
        raise EnvelopeError("compressed message is truncated")
    return out


def decode_inner(data: bytes) -> Inner:
    """Decode decrypted plaintext; any malformed input raises `EnvelopeError`.

    Raises:
        EnvelopeError: unknown kind or codec, bad msgpack, wrong field types, a decompression bomb.
    """
    if not data:
        raise EnvelopeError("message is empty")
    if len(data) > MAX_INNER_LEN:
        raise EnvelopeError(f"message is {len(data)} bytes; the limit is {MAX_INNER_LEN}")
    head = data[0]
    try:
        kind = Kind(head & _KIND_MASK)
        codec = InnerCodec((head >> _CODEC_SHIFT) & _CODEC_MASK)
    except ValueError as exc:
        raise EnvelopeError(f"message kind or codec {head:#04x} is unknown") from exc
    if head >> 7:
        raise EnvelopeError("message header has a reserved bit set")
    body = data[1:] if codec is InnerCodec.PLAIN else _inflate(data[1:])
    items = unpack(
        body, "message", max_str=MAX_INNER_LEN, max_bin=MAX_INNER_LEN, max_array=_MAX_REFS + 8
    )
    if not isinstance(items, list) or not items:
        raise EnvelopeError("message must be a non-empty array")
    ts, *fields = items
    return Inner(kind, ts, tuple(fields))
