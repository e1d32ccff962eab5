"""Per-connection limits on what a client may send: packets larger than the limit end it.

MQTT 3.1.1 has no way to refuse one PUBLISH, so a client that sends a packet over the limit is
disconnected before the broker reads (and buffers) the oversize body; everyone else is served as
before. The limit is checked where amqtt asks for the bytes of a packet's body, so a packet
announcing 256 MiB costs nothing but its header.
"""

from __future__ import annotations

import logging
from typing import Final

from amqtt.adapters import ReaderAdapter

__all__ = ["DEFAULT_MAX_PAYLOAD", "LimitedReader"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD: Final = 256 * 1024
"""Largest packet body a client may send (an envelope is at most 256 KiB)."""
_HEADROOM: Final = 64 * 1024 + 16
"""A PUBLISH body is its topic (at most 64 KiB), a packet id and the payload."""


class LimitedReader(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no types
    """A reader that refuses any single read larger than the limit, ending the connection."""

    def __init__(self, inner: ReaderAdapter, *, max_payload: int, peer: object) -> None:
        """Wrap `inner`; `peer` names the client in the log line."""
        self._inner = inner
        self._limit = max_payload + _HEADROOM
        self._max_payload = max_payload
        self._peer = peer

    async def read(self, n: int = -1) -> bytes:
        """Read `n` bytes, unless `n` is over the limit."""
        if n > self._limit:
            logger.warning(
                "closing the connection from %s: it sent a packet of %d bytes; the limit is %d",
                self._peer,
                n,
                self._max_payload,
            )
            # amqtt's reader treats this as the connection ending: no more bytes are read.
            raise ConnectionResetError
        data: bytes = await self._inner.read(n)
        return data

    def feed_eof(self) -> None:
        """Pass end-of-stream through."""
        self._inner.feed_eof()
