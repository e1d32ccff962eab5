"""Fuzz the envelope decoder: 100,000 hostile inputs; only EnvelopeError escapes, memory is flat."""

from __future__ import annotations

import random
import resource
from collections.abc import Callable, Iterator

import msgpack

from meshchat.envelope import Distribution, GroupMessage, Sealed, Signed, decode, encode
from meshchat.errors import EnvelopeError

SEED = 20261122
ROUNDS = 100_000
PEAK_GROWTH_LIMIT_KIB = 64 * 1024


def _seeds(rng: random.Random) -> list[bytes]:
    return [
        encode(
            GroupMessage(
                rng.getrandbits(32), rng.randrange(2000), rng.randbytes(60), rng.randbytes(64)
            )
        ),
        encode(Sealed("laptop-1", rng.randbytes(120), rng.randbytes(64))),
        encode(Signed("dir", rng.randbytes(90), rng.randbytes(64))),
        encode(Distribution("laptop-1", rng.randbytes(100), rng.randbytes(48), rng.randbytes(64))),
    ]


def _random_object(rng: random.Random, depth: int = 0) -> object:
    choice = rng.randrange(9 if depth < 3 else 7)
    simple: list[Callable[[], object]] = [
        lambda: rng.randrange(-(2**63), 2**64),
        rng.random,
        lambda: rng.randbytes(rng.randrange(80)),
        lambda: "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12))),
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(10))),
    ]
    if choice < len(simple):
        return simple[choice]()
    if choice == 7:
        return [_random_object(rng, depth + 1) for _ in range(rng.randrange(6))]
    return {str(i): _random_object(rng, depth + 1) for i in range(rng.randrange(3))}


def _inputs(rng: random.Random) -> Iterator[bytes]:
    seeds = _seeds(rng)
    huge_prefixes = [
        b"\xdd\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xc9\x7f\xff\xff\xff\x01",
    ]
    for round_number in range(ROUNDS):
        seed = bytearray(rng.choice(seeds))
        match round_number % 8:
            case 0:  # random bytes
                yield rng.randbytes(rng.randrange(200))
            case 1:  # truncation
                yield bytes(seed[: rng.randrange(len(seed))])
            case 2:  # bit flips
                for _ in range(rng.randrange(1, 4)):
                    seed[rng.randrange(len(seed))] ^= 1 << rng.randrange(8)
                yield bytes(seed)
            case 3:  # inserted or deleted bytes
                position = rng.randrange(len(seed))
                if rng.random() < 0.5:
                    seed[position:position] = rng.randbytes(rng.randrange(1, 5))
                else:
                    del seed[position : position + rng.randrange(1, 5)]
                yield bytes(seed)
            case 4:  # well-formed msgpack of the wrong shape and types behind a valid header
                yield bytes(seed[:1]) + msgpack.packb(_random_object(rng), use_bin_type=True)
            case 5:  # valid arrays with one field replaced by another type
                fields = msgpack.unpackb(bytes(seed[1:]))
                fields[rng.randrange(len(fields))] = _random_object(rng)
                yield bytes(seed[:1]) + msgpack.packb(fields, use_bin_type=True)
            case 6:  # huge length prefixes, in place of a field or of the whole array
                prefix = rng.choice(huge_prefixes)
                position = rng.randrange(1, len(seed))
                yield bytes(seed[:position]) + prefix + rng.randbytes(rng.randrange(16))
            case _:  # deep nesting
                depth = rng.randrange(1, 5000)
                yield bytes(seed[:1]) + (rng.choice([b"\x91", b"\x81\x00"]) * depth) + b"\x00"


def test_fuzzed_decoder_raises_only_envelope_error_with_bounded_memory() -> None:
    rng = random.Random(SEED)
    decoded = refused = 0
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for data in _inputs(rng):
        try:
            envelope = decode(data)
        except EnvelopeError:
            refused += 1
        else:
            decoded += 1
            assert encode(envelope) == data  # anything accepted is canonical
    # Peak RSS catches a transient allocation too (a decoder trusting a 4 GiB length prefix).
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert decoded + refused == ROUNDS
    assert refused > ROUNDS // 2
    assert decoded > 0  # mutations reach past the header and the msgpack layer
    assert growth < PEAK_GROWTH_LIMIT_KIB, f"peak memory grew by {growth} KiB while fuzzing"
