"""Receipts: "delivered" batched per group and sent every few seconds; "read" on request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from meshchat.client._shared import Shared
from meshchat.e2ee import Inner, Kind, encode_inner

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face

RECEIPT_INTERVAL: Final = 2.0
MAX_RECEIPT_REFS: Final = 1000
DELIVERED, READ = 0, 1


class Receipts:
    """Collects "delivered" receipts for the messages read here and queues them in batches."""

    def __init__(
        self, shared: Shared, *, enabled: Callable[[], bool], interval: Callable[[], float]
    ) -> None:
        """Prepare; `enabled` and `interval` read the client's settings, live."""
        self._session, self._store = shared.session, shared.store
        self._clock, self._outbox_changed = shared.clock, shared.outbox_changed
        self._enabled = enabled
        self._interval = interval
        self._batches: dict[str, list[tuple[int, int]]] = {}
        self._due = asyncio.Event()

    def note_delivered(self, topic: str, message_id: tuple[int, int]) -> None:
        """Put a message read here in its group's next batch."""
        if not self._enabled():
            return
        batch = self._batches.setdefault(topic, [])
        if len(batch) < MAX_RECEIPT_REFS:
            batch.append(message_id)
        self._due.set()

    async def run(self) -> None:
        """Send delivered receipts in batches: one message per group every few seconds."""
        while True:
            await self._due.wait()
            await asyncio.sleep(self._interval())  # batch what arrives meanwhile
            self._due.clear()
            batches, self._batches = self._batches, {}
            for topic, refs in batches.items():
                if refs and self._session.may_send(topic, now=self._clock()) is None:
                    inner = Inner(Kind.RECEIPT, int(self._clock()), (DELIVERED, tuple(refs)))
                    self._store.enqueue(topic, encode_inner(inner))
            self._outbox_changed.set()
