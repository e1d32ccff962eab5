"""Service requests and replies: round trips, and every malformed payload is one clear error."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshchat.errors import EnvelopeError
from meshchat.rpc import MAX_RPC_LEN, Reply, Request, decode_reply, decode_request


def test_a_request_and_its_reply_round_trip() -> None:
    request = Request("register", ("laptop", b"\x01" * 32, 3))
    again = decode_request(request.encode())
    assert again == Request("register", ("laptop", b"\x01" * 32, 3), request.id)
    reply = decode_reply(Reply.success(again, [b"bundle", ["ops/line1"]]).encode())
    assert reply.id == request.id
    assert reply.ok
    assert reply.value == [b"bundle", ["ops/line1"]]
    refused = decode_reply(Reply.failure(again, "x" * 5000).encode())
    assert not refused.ok
    assert refused.value == "x" * 500


def test_two_requests_never_share_an_id() -> None:
    assert Request("groups").id != Request("groups").id


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb(["register", b"short", []]),
        msgpack.packb(["", b"12345678", []]),
        msgpack.packb(["x" * 33, b"12345678", []]),
        msgpack.packb(["op", b"12345678", {"a": 1}]),
        msgpack.packb({"op": "register"}),
        b"\x00" * (MAX_RPC_LEN + 1),
    ],
)
def test_malformed_requests_are_refused(payload: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode_request(payload)


def test_a_failed_reply_must_say_why() -> None:
    with pytest.raises(EnvelopeError, match="error message"):
        decode_reply(msgpack.packb([b"12345678", False, 3]))


@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoders(payload: bytes) -> None:
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(EnvelopeError):
            decode(payload)
