"""Requests to services and their replies (``_s/{service}/{user}``): a small msgpack codec.

A request is ``[op, id, args]``; a reply is ``[id, ok, value]`` where `value` is the result
when `ok`, else a one-line error for the user. The id (8 random bytes) pairs a reply with its
request, since one user's connections share a reply topic. Decoding is strict and bounded:
every payload comes from the network.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Final

import msgpack

from meshchat.errors import EnvelopeError
from meshchat.wire import unpack

__all__ = [
    "MAX_RPC_LEN",
    "PUSH_ID",
    "Reply",
    "Request",
    "decode_reply",
    "decode_request",
    "new_id",
]

MAX_RPC_LEN: Final = 64 * 1024
ID_LEN: Final = 8
_MAX_OP_LEN: Final = 32
_MAX_ERROR_LEN: Final = 500


PUSH_ID: Final = bytes(ID_LEN)
"""The id of a reply no request asked for: a service's standing word, kept retained (the
directory's list of a user's groups)."""


def new_id() -> bytes:
    """A fresh request id (never `PUSH_ID`)."""
    while (made := secrets.token_bytes(ID_LEN)) == PUSH_ID:
        pass
    return made


@dataclass(frozen=True, slots=True)
class Request:
    """An operation a service is asked to perform, with msgpack-able arguments."""

    op: str
    args: tuple[object, ...] = ()
    id: bytes = field(default_factory=new_id)

    def encode(self) -> bytes:
        """The payload to publish."""
        packed: bytes = msgpack.packb([self.op, self.id, list(self.args)], use_bin_type=True)
        return packed


@dataclass(frozen=True, slots=True)
class Reply:
    """A service's answer: a value, or an error line."""

    id: bytes
    ok: bool
    value: object

    @classmethod
    def success(cls, request: Request, value: object) -> Reply:
        """A successful reply to `request`."""
        return cls(request.id, ok=True, value=value)

    @classmethod
    def failure(cls, request: Request, error: str) -> Reply:
        """A refusal or failure, with a message fit for the user."""
        return cls(request.id, ok=False, value=error[:_MAX_ERROR_LEN])

    def encode(self) -> bytes:
        """The payload to publish."""
        packed: bytes = msgpack.packb([self.id, self.ok, self.value], use_bin_type=True)
        return packed


def _unpack(payload: bytes, what: str) -> object:
    if len(payload) > MAX_RPC_LEN:
        raise EnvelopeError(f"{what} is {len(payload)} bytes; the limit is {MAX_RPC_LEN}")
    return unpack(payload, what, max_str=MAX_RPC_LEN, max_bin=MAX_RPC_LEN, max_array=4096)


def decode_request(payload: bytes) -> Request:
    """Parse a request.

    Raises:
        EnvelopeError: malformed or oversize.
    """
    match _unpack(payload, "request"):
        case [str(op), bytes(request_id), list(args)] if (
            0 < len(op) <= _MAX_OP_LEN and len(request_id) == ID_LEN
        ):
            return Request(op, tuple(args), request_id)
    raise EnvelopeError("request must be [op, 8-byte id, [args]]")


def decode_reply(payload: bytes) -> Reply:
    """Parse a reply.

    Raises:
        EnvelopeError: malformed or oversize.
    """
    match _unpack(payload, "reply"):
        case [bytes(request_id), bool(ok), value] if len(request_id) == ID_LEN:
            if not ok and not isinstance(value, str):
                raise EnvelopeError("a failed reply must carry an error message")
            return Reply(request_id, ok, value)
    raise EnvelopeError("reply must be [8-byte id, ok, value]")
