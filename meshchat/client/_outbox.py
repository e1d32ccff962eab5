"""The transport's outbox: messages waiting for the broker's acknowledgement, in publish order."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass

from meshchat.errors import MeshchatError, TransportError

__all__: list[str] = []  # internal: `meshchat.client.transport` is the public face

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Outgoing:
    """One message on its way: waiting, or in flight on the current connection."""

    message_id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    future: asyncio.Future[None] | None


class Outbox:
    """A bounded, ordered queue from which each connection's senders take their messages.

    A message stays counted until the broker acknowledged it. The messages in flight when a
    connection ends go back to the head of the queue, in their order, for the next one.
    """

    def __init__(self, *, limit: int, on_sent: Callable[[int], None] | None) -> None:
        """Hold at most `limit` messages; call `on_sent` with each acknowledged message id."""
        self._limit = limit
        self._on_sent = on_sent
        self._next_id = 0
        self._waiting: collections.deque[Outgoing] = collections.deque()
        self._inflight: dict[int, Outgoing] = {}
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        """Messages not yet acknowledged, in flight or not."""
        return len(self._waiting) + len(self._inflight)

    def put(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        future: asyncio.Future[None] | None,
        *,
        where: str,
    ) -> Outgoing:
        """Queue a message; `where` says in the error where the messages are waiting to go.

        Raises:
            TransportError: the outbox is full.
        """
        if len(self) >= self._limit:
            raise TransportError(
                f"the outbox is full: {len(self)} messages wait for {where}; "
                "try again once the link is back",
                reason="outbox-full",
            )
        self._next_id += 1
        item = Outgoing(self._next_id, topic, payload, qos, retain, future)
        self._waiting.append(item)
        self._idle.clear()
        self._ready.set()
        return item

    async def take(self) -> Outgoing:
        """Wait for the next message and mark it in flight.

        Nothing is awaited after the message is taken, so a caller that hands it to the
        connection at once keeps the order in which the messages were published.
        """
        while not self._waiting:
            self._ready.clear()
            await self._ready.wait()
        item = self._waiting.popleft()
        self._inflight[item.message_id] = item
        return item

    def sent(self, item: Outgoing) -> None:
        """The broker acknowledged `item`: resolve its waiter and tell the hook."""
        del self._inflight[item.message_id]
        if item.future is not None and not item.future.done():
            item.future.set_result(None)
        if not self:
            self._idle.set()
        if self._on_sent is not None:
            try:
                self._on_sent(item.message_id)
            except Exception:
                logger.exception("the on_sent hook failed for message %d", item.message_id)

    def requeue(self) -> None:
        """Put the messages in flight back at the head of the queue, in their order."""
        if self._inflight:
            ordered = sorted(self._inflight.values(), key=lambda item: item.message_id)
            self._waiting.extendleft(reversed(ordered))
            self._inflight.clear()
            self._ready.set()

    async def wait_idle(self) -> None:
        """Wait until every message is acknowledged."""
        await self._idle.wait()

    def fail_all(self, error: Callable[[], MeshchatError]) -> int:
        """Drop every message, failing each waiter with a fresh `error()`; return how many."""
        self.requeue()
        dropped = len(self._waiting)
        for item in self._waiting:
            if item.future is not None and not item.future.done():
                item.future.set_exception(error())
        self._waiting.clear()
        self._idle.set()
        return dropped
