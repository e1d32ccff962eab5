"""Bounded msgpack decoding: every limit holds and every failure is the caller's error type."""

from __future__ import annotations

import msgpack
import pytest

from meshchat.errors import EnvelopeError, TelemetryError
from meshchat.wire import unpack


def limited(
    data: bytes,
    what: str = "roster",
    *,
    max_map: int = 0,
    error: type[EnvelopeError] = EnvelopeError,
) -> object:
    """Strings and bytes up to 8, arrays up to 4 items."""
    return unpack(data, what, max_str=8, max_bin=8, max_array=4, max_map=max_map, error=error)


def test_a_value_within_the_limits_decodes() -> None:
    data = msgpack.packb(["abc", b"\x00\x01", [1, 2]], use_bin_type=True)
    assert limited(data) == ["abc", b"\x00\x01", [1, 2]]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("x" * 9, id="string over its limit"),
        pytest.param(b"x" * 9, id="bytes over their limit"),
        pytest.param([1, 2, 3, 4, 5], id="array over its limit"),
        pytest.param({"a": 1}, id="a map where none is allowed"),
        pytest.param(msgpack.ExtType(1, b"x"), id="an extension type"),
    ],
)
def test_what_breaks_a_limit_is_refused_naming_what_was_read(value: object) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    with pytest.raises(EnvelopeError, match=r"^roster is not valid msgpack: "):
        limited(data)


def test_trailing_bytes_and_truncation_are_refused() -> None:
    data = msgpack.packb([1, 2], use_bin_type=True)
    for bad in (data + b"\x00", data[:-1], b""):
        with pytest.raises(EnvelopeError):
            limited(bad)


def test_the_caller_chooses_the_error_type() -> None:
    with pytest.raises(TelemetryError, match="status is not valid msgpack"):
        limited(b"\xc1", "status", error=TelemetryError)


def test_maps_are_read_only_when_allowed() -> None:
    data = msgpack.packb({"bat": 80}, use_bin_type=True)
    assert limited(data, "status", max_map=2) == {"bat": 80}
