"""Inner plaintext: every kind round-trips, long texts shrink, and bad input is one clear error."""

from __future__ import annotations

import contextlib
import zlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshchat.e2ee import OutboundChain
from meshchat.e2ee.plaintext import Inner, InnerCodec, Kind, decode_inner, encode_inner
from meshchat.envelope import encode
from meshchat.errors import EnvelopeError

TS = 1_795_000_000
REF = (3_000_000_000, 17)
EXAMPLES = [
    Inner(Kind.TEXT, TS, ("**shift** starts at 6",)),
    Inner(Kind.REPLY, TS, ("on my way", REF)),
    Inner(Kind.EDIT, TS, ("on my way, 10 min", REF)),
    Inner(Kind.RECALL, TS, (REF,)),
    Inner(Kind.REACT, TS, ("👍", REF)),
    Inner(Kind.RECEIPT, TS, (1, (REF, (1, 2)))),
    Inner(Kind.FILE, TS, ("plan.pdf", 123_456, bytes(32), 4, "application/pdf")),
    Inner(Kind.CHUNK, TS, (REF, 0, b"\x00" * 100)),
    Inner(Kind.URGENT, TS, ("evacuate hall 2",)),
    Inner(Kind.ACK, TS, (REF,)),
    Inner(Kind.WORKORDER, TS, ("wo-17", "replace the pump")),
    Inner(Kind.NOTICE, TS, ("alice joined sites/plant-3",)),
    Inner(Kind.TELEMETRY_KEY, TS, (7, bytes(32), bytes(32))),
    Inner(Kind.ORDER_STATE, TS, ("wo-17", "rejected", "road closed")),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.kind.name.lower())
def test_every_kind_round_trips(message: Inner) -> None:
    assert decode_inner(encode_inner(message)) == message


def test_every_kind_has_an_example() -> None:
    assert {m.kind for m in EXAMPLES} == set(Kind)


def test_lists_and_tuples_give_the_same_message() -> None:
    assert Inner(Kind.ACK, TS, ([1, 2],)) == Inner(Kind.ACK, TS, ((1, 2),))


@pytest.mark.parametrize(("size", "budget"), [(20, 125), (100, 205), (1000, 1107)])
def test_signed_envelope_fits_the_budget(size: int, budget: int) -> None:
    # Issue 4's budgets, for texts that do not compress (random letters).
    text = "".join(chr(0x61 + (i * 7919) % 26) for i in range(size))
    plaintext = encode_inner(Inner(Kind.TEXT, TS, (text,)), codec=InnerCodec.PLAIN)
    chain = OutboundChain.new(now=float(TS))
    assert len(encode(chain.encrypt("mc/acme/ops/line1", plaintext))) <= budget


def test_long_repetitive_text_is_deflated_and_short_text_is_not() -> None:
    short = encode_inner(Inner(Kind.TEXT, TS, ("hello",)))
    assert short[0] >> 5 == InnerCodec.PLAIN
    long_text = "line 3 stopped; " * 100
    deflated = encode_inner(Inner(Kind.TEXT, TS, (long_text,)))
    assert deflated[0] >> 5 == InnerCodec.DEFLATE
    assert len(deflated) < len(long_text) // 4
    assert decode_inner(deflated).fields == (long_text,)


def test_decompression_bomb_is_refused() -> None:
    bomb = zlib.compress(msgpack.packb([TS, "a" * 400_000]))
    with pytest.raises(EnvelopeError, match="inflates beyond"):
        decode_inner(bytes([Kind.TEXT | (InnerCodec.DEFLATE << 5)]) + bomb)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (bytes([31]) + msgpack.packb([TS, "x"]), "unknown"),
        (bytes([0x60]) + msgpack.packb([TS, "x"]), "unknown"),  # codec 3
        (bytes([0x80]) + msgpack.packb([TS, "x"]), "reserved bit"),
        (bytes([0]) + b"\xc1", "not valid msgpack"),
        (bytes([0]) + msgpack.packb({"ts": TS}), "not valid msgpack"),
        (bytes([0]) + msgpack.packb([]), "non-empty array"),
        (bytes([0]) + msgpack.packb([-1, "x"]), "timestamp"),
        (bytes([0]) + msgpack.packb([TS]), "has 0 fields"),
        (bytes([0]) + msgpack.packb([TS, 5]), "must be text"),
        (bytes([1]) + msgpack.packb([TS, "x", [1]]), "(chain id, index) pair"),
        (bytes([5]) + msgpack.packb([TS, 0, [[1, 2]] * 1001]), "at most 1000 message ids"),
        (bytes([6]) + msgpack.packb([TS, "f", -1, b"", 1, "t"]), "non-negative integer"),
        (bytes([7]) + msgpack.packb([TS, [1, 2], 0, "not bytes"]), "must be bytes"),
        (bytes([0x20]) + b"not zlib", "corrupt"),
        (bytes([0x20]) + zlib.compress(msgpack.packb([TS, "x"]))[:-3], "truncated"),
    ],
)
def test_malformed_plaintext_is_one_clear_error(data: bytes, words: str) -> None:
    with pytest.raises(EnvelopeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        decode_inner(data)


@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_envelope_error(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        decode_inner(data)
