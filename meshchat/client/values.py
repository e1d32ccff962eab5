"""The transport's value objects: its states and their changes, messages, backoff."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from meshchat.errors import ConfigError, MeshchatError, TransportError
from meshchat.topics import validate_topic

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "Backoff",
    "Incoming",
    "Publication",
    "StateChange",
    "TransportState",
    "check_qos",
]

DEFAULT_MAX_PAYLOAD: Final = 256 * 1024
"""The embedded broker's limit; it drops the connection of a client that sends more."""


class TransportState(enum.Enum):
    """Where a `Transport` is in its life; it runs once and cannot be reopened."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    """The link is down and the transport waits before the next attempt."""
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class StateChange:
    """One step of a transport's life.

    Attributes:
        state: the new state.
        session_present: when connected, whether the broker still had the session (when it did
            not, messages sent to it while the link was down are lost: fetch the gap elsewhere).
        retry_in: when disconnected, seconds until the next attempt.
        reason: why the link went down, or why the transport closed.
        error: when closed by a failure it will not retry (wrong credentials), that failure.
    """

    state: TransportState
    session_present: bool = False
    retry_in: float | None = None
    reason: str = ""
    error: MeshchatError | None = None


@dataclass(frozen=True, slots=True)
class Publication:
    """A message the transport sends on its own: the birth message and the last will."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False

    def __post_init__(self) -> None:
        """Check the topic and QoS now rather than on the first connect."""
        validate_topic(self.topic)
        check_qos(self.qos)


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message from the broker. Its topic and payload are untrusted input."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between connection attempts: exponential, capped, with full jitter.

    Attempt ``n`` (from 0) waits a uniform random time between 0 and
    ``min(maximum, initial * 2**n)``, so clients cut off together do not come back together.

    Attributes:
        initial: the ceiling of the first delay, in seconds.
        maximum: the largest ceiling, in seconds.
        reset_after: a connection that lasted this long starts the sequence again; shorter ones
            do not, so a link that drops right after each connect is not hammered.
    """

    initial: float = 0.2
    maximum: float = 30.0
    reset_after: float = 10.0

    def __post_init__(self) -> None:
        """Refuse delays that are not positive or a maximum below the initial delay."""
        if not (self.initial > 0 and self.maximum >= self.initial and self.reset_after >= 0):
            raise ConfigError(
                f"backoff initial={self.initial}, maximum={self.maximum}, "
                f"reset_after={self.reset_after}: need 0 < initial <= maximum, reset_after >= 0"
            )

    def delay(self, attempt: int, uniform: float) -> float:
        """The delay before attempt number `attempt`, given `uniform` drawn from [0, 1)."""
        ceiling = min(self.maximum, self.initial * 2.0 ** min(attempt, 64))
        return ceiling * min(max(uniform, 0.0), 1.0)


def check_qos(qos: int) -> None:
    """Refuse a QoS the transport does not offer.

    Raises:
        TransportError: `qos` is not 0 or 1.
    """
    # QoS 2's exactly-once handshake needs packet-id state that survives a reconnect; a fresh
    # connection per attempt has none, and the layer above deduplicates anyway.
    if qos not in {0, 1}:
        raise TransportError(f"QoS {qos!r} is not offered: use 0 or 1", reason="qos")
