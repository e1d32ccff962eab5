"""Strict, bounded msgpack decoding for everything that arrives from the network or a file.

Every wire format of meshchat (envelopes, RPC, rosters, key records, pairwise payloads, inner
plaintext, notices, telemetry) is a msgpack array read with explicit limits, so that a hostile
input can never make the decoder allocate more than its format allows. `unpack` is the one place
that sets those limits and turns every msgpack failure into the caller's error type with a
message that names what was being read.
"""

from __future__ import annotations

from typing import Final

import msgpack

from meshchat.errors import EnvelopeError

__all__ = ["unpack"]

_FAILURES: Final = (ValueError, TypeError, UnicodeDecodeError, msgpack.UnpackException)
"""What msgpack raises on bad input: ExtraData, FormatError, StackError and every limit
violation derive from these."""


def unpack(  # one limit per msgpack type, all keyword-only
    data: bytes,
    what: str,
    *,
    max_str: int,
    max_bin: int,
    max_array: int,
    max_map: int = 0,
    strict_map_key: bool = True,
    error: type[EnvelopeError] = EnvelopeError,
) -> object:
    """Decode `data` with the given limits; extension types are never accepted.

    Args:
        data: the bytes.
        what: what they should be, for the error message ("roster", "key record").
        max_str: longest string, in bytes.
        max_bin: longest byte string.
        max_array: most items in one array.
        max_map: most pairs in one map (0: no maps).
        strict_map_key: only str and bytes map keys.
        error: the error type to raise (`EnvelopeError` or a subclass).

    Raises:
        EnvelopeError: (or `error`) not valid msgpack, trailing bytes, or over a limit.
    """
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=strict_map_key,
            max_str_len=max_str,
            max_bin_len=max_bin,
            max_array_len=max_array,
            max_map_len=max_map,
            max_ext_len=0,
        )
    except _FAILURES as exc:
        raise error(f"{what} is not valid msgpack: {str(exc) or type(exc).__name__}") from exc
