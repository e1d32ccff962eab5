"""Acknowledgements the consumer sends itself, once it has kept a message, in arrival order.

`Transport.messages(manual_ack=True)` hands out `Delivery` objects. The consumer calls
`Delivery.ack` when the message is safe (for the archiver: committed to disk), in whatever order
its work finishes; the PUBACKs still go out in the order the messages arrived (MQTT-4.6.0-2), so
one acknowledged early waits for those before it. A delivery whose connection has dropped is
never waited for: its packet id died with the link and the broker sends it again.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from meshchat.client.values import Incoming

if TYPE_CHECKING:
    from meshchat.client._link import Received

__all__ = ["Delivery"]  # `AckQueue` is the transport's own


class Delivery:
    """An incoming message that the consumer acknowledges itself, by calling `ack`.

    Its topic and payload are untrusted input. Until `ack` is called the broker keeps the
    message (a QoS 1 message of a persistent session comes again after a reconnect or a
    restart); a broker stops sending once as many messages as its in-flight window are
    unacknowledged, so every delivery must be acknowledged eventually, the ones that are
    dropped as useless too.
    """

    __slots__ = ("_acked", "_queue", "_received")

    def __init__(self, received: Received, queue: AckQueue) -> None:
        """Wrap a message as it arrived; `AckQueue.track` makes these."""
        self._received = received
        self._queue = queue
        self._acked = False

    @property
    def topic(self) -> str:
        """The topic it was published on."""
        return self._received.topic

    @property
    def payload(self) -> bytes:
        """The payload bytes."""
        return self._received.payload

    @property
    def qos(self) -> int:
        """The QoS it was delivered with."""
        return self._received.qos

    @property
    def retain(self) -> bool:
        """Whether it is a retained message sent on subscribing."""
        return self._received.retain

    @property
    def message(self) -> Incoming:
        """The message as an `Incoming` value."""
        received = self._received
        return Incoming(received.topic, received.payload, received.qos, received.retain)

    @property
    def acked(self) -> bool:
        """Whether `ack` was called."""
        return self._acked

    def ack(self) -> None:
        """Acknowledge the message: its PUBACK goes out once every earlier one has gone out.

        Calling it again, or after the connection the message came on has dropped, does nothing.
        """
        if not self._acked:
            self._acked = True
            self._queue.flush()

    def __repr__(self) -> str:
        """Say where it came from and whether it is acknowledged; never the payload."""
        return (
            f"Delivery(topic={self.topic!r}, qos={self.qos}, {len(self.payload)} bytes, "
            f"acked={self._acked})"
        )


class AckQueue:
    """The deliveries of one transport whose PUBACK has not gone out, in arrival order."""

    def __init__(self) -> None:
        """Start empty."""
        self._waiting: collections.deque[Delivery] = collections.deque()

    def __len__(self) -> int:
        """Deliveries handed out and not yet acknowledged to the broker."""
        return len(self._waiting)

    def track(self, received: Received) -> Delivery:
        """A delivery for a message taken from the inbox; QoS 0 ones need no acknowledgement."""
        delivery = Delivery(received, self)
        if received.qos > 0:
            self._waiting.append(delivery)
        return delivery

    def flush(self) -> None:
        """Send the PUBACKs of the acknowledged deliveries at the head of the queue."""
        waiting = self._waiting
        while waiting:
            head = waiting[0]
            received = head._received  # noqa: SLF001  # the queue and its deliveries are one unit
            if head.acked:
                received.ack()  # a no-op when its link is down
            elif received.link.up:
                return
            # Acknowledged, or from a link that is gone (the broker sends it again): done.
            waiting.popleft()
