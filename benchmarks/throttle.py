"""A throttled TCP proxy for benchmarks: a thin link between an MQTT client and its broker.

`ThrottledProxy` forwards each connection through a token bucket per direction (a rate in bytes
per second, pieces of at most `SEGMENT` bytes, bounded buffers) and tallies what crosses it by
MQTT packet type and topic kind (`WireTally`), so a benchmark can say which bytes used the link.
`benchmarks/catchup_bench.py` uses it for DESIGN.md section 8's 64 kbit/s catch-up budget.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Self

from meshchat.errors import TopicError
from meshchat.topics import (
    GroupTopic,
    InboxTopic,
    KeyTopic,
    PresenceTopic,
    RosterTopic,
    ServiceTopic,
    parse_topic,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = [
    "GAP_S",
    "READ_BUFFER",
    "SEGMENT",
    "Direction",
    "ThrottledProxy",
    "TokenBucket",
    "WireTally",
]

SEGMENT: Final = 512
"""The largest piece the proxy forwards at once, and the depth of each token bucket (bytes)."""
READ_BUFFER: Final = 16 * 1024
"""The `limit` of the proxy's stream readers: one stops reading its socket past twice this."""
GAP_S: Final = 0.02
"""Idle gaps of the link longer than this are listed one by one."""

_PACKET_NAMES: Final = {
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
}
_TOPIC_KINDS: Final = {
    GroupTopic: "group",
    InboxTopic: "inbox",
    KeyTopic: "key record",
    RosterTopic: "roster",
    ServiceTopic: "service",
    PresenceTopic: "presence",
}


@dataclass(slots=True)
class WireTally:
    """The MQTT 3.1.1 packets of one direction of a link, read as they cross it.

    Packets are counted by kind (``PUBLISH group``, ``PUBACK``, ...) with their whole size.
    PUBLISH payloads on group topics are kept, so that the texts can be told from the rest.
    """

    label: Callable[[bytes], str] | None = None
    """Names a group PUBLISH by its payload (a text, a receipt's echo); None: ``group``."""
    packets: Counter[str] = field(default_factory=Counter)
    sizes: Counter[str] = field(default_factory=Counter)
    group_payloads: list[bytes] = field(default_factory=list)
    publish_sizes: dict[bytes, int] = field(default_factory=dict)
    """The whole PUBLISH size of each group payload."""
    last_seen: dict[str, float] = field(default_factory=dict)
    """When a packet of each kind last finished crossing (loop time)."""
    first_seen: dict[str, float] = field(default_factory=dict)
    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes, now: float) -> None:
        """Take bytes that just crossed; count every packet they complete."""
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 2:
            length, shift, at = 0, 0, 1
            while True:
                if at >= len(buffer):
                    return
                byte = buffer[at]
                length |= (byte & 0x7F) << shift
                at += 1
                if not byte & 0x80:
                    break
                shift += 7
            end = at + length
            if len(buffer) < end:
                return
            self._count(bytes(buffer[:end]), at, now)
            del buffer[:end]

    def _count(self, packet: bytes, body: int, now: float) -> None:
        kind = _PACKET_NAMES.get(packet[0] >> 4, f"type {packet[0] >> 4}")
        if kind == "PUBLISH":
            topic_len = int.from_bytes(packet[body : body + 2], "big")
            topic = packet[body + 2 : body + 2 + topic_len].decode("utf-8", "replace")
            payload_at = body + 2 + topic_len + (2 if (packet[0] >> 1) & 3 else 0)
            kind = f"PUBLISH {self._topic_kind(topic)}"
            if kind == "PUBLISH group":
                payload = packet[payload_at:]
                self.group_payloads.append(payload)
                self.publish_sizes[payload] = len(packet)
                if self.label is not None:
                    kind = f"PUBLISH group: {self.label(payload)}"
        self.packets[kind] += 1
        self.sizes[kind] += len(packet)
        self.first_seen.setdefault(kind, now)
        self.last_seen[kind] = now

    @staticmethod
    def _topic_kind(topic: str) -> str:
        try:
            parsed = parse_topic(topic)
        except TopicError:
            return "other"
        return _TOPIC_KINDS.get(type(parsed), type(parsed).__name__)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Packets and bytes by kind, biggest first."""
        return {
            kind: {"packets": self.packets[kind], "bytes": size}
            for kind, size in self.sizes.most_common()
        }


class TokenBucket:
    """A link's rate in one direction: `rate` bytes per second, at most `depth` at once.

    It also keeps the link's own clock, `busy_until`: when the bytes taken so far will have
    finished crossing at `rate`. Data that comes later than that finds the link idle.
    """

    def __init__(self, rate: float, depth: int) -> None:
        """Start empty (the first segment takes its time too) and idle."""
        self.rate = rate
        self.depth = depth
        self._tokens = 0.0
        self._at = asyncio.get_running_loop().time()
        self.busy_until = self._at

    def _refill(self) -> None:
        now = asyncio.get_running_loop().time()
        self._tokens = min(self.depth, self._tokens + (now - self._at) * self.rate)
        self._at = now

    async def take(self, size: int) -> None:
        """Take `size` bytes (at most `depth`), then wait until the bucket is out of debt.

        Taking first and paying the debt off afterwards keeps the average rate exact however
        late the event loop wakes up from the sleep.
        """
        now = asyncio.get_running_loop().time()
        self.busy_until = max(now, self.busy_until) + size / self.rate
        self._refill()
        self._tokens -= size
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


@dataclass(slots=True)
class Direction:
    """One direction of the proxy: its bucket, what crossed, and when the link idled."""

    bucket: TokenBucket | None
    tally: WireTally
    crossed: int = 0
    idle_s: float = 0.0
    """Seconds the link stood idle between the first byte and the last (see `TokenBucket`)."""
    gaps: list[tuple[float, float]] = field(default_factory=list)
    """(start, seconds) of each idle gap longer than `GAP_S`."""


class ThrottledProxy:
    """A TCP forwarder on 127.0.0.1 that paces each direction with a token bucket.

    Every connection shares the two buckets (one link). Buffers are bounded: a side's reader
    stops reading its socket once it holds twice `READ_BUFFER` bytes, and takes one segment at
    a time, only once the bucket let the previous one through; so a fast sender waits in its
    own socket buffers as it would behind a slow link. ``rate=None`` forwards at full speed and
    only counts.
    """

    def __init__(
        self,
        target_port: int,
        *,
        rate: float | None,
        label_down: Callable[[bytes], str] | None = None,
        label_up: Callable[[bytes], str] | None = None,
    ) -> None:
        """Forward to 127.0.0.1:`target_port` once entered."""
        self.port = 0
        self._target = target_port
        self._rate = rate
        self._labels = (label_down, label_up)
        self.down = Direction(None, WireTally(label_down))
        self.up = Direction(None, WireTally(label_up))
        self._server: asyncio.Server | None = None
        self._sides: set[asyncio.StreamWriter] = set()
        self._handlers = 0
        self._idle = asyncio.Event()

    @property
    def url(self) -> str:
        """``mqtt://`` URL of the listening side."""
        return f"mqtt://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Forget what crossed so far, and start with fresh buckets."""
        rate = self._rate
        self.down = Direction(
            TokenBucket(rate, SEGMENT) if rate else None, WireTally(self._labels[0])
        )
        self.up = Direction(
            TokenBucket(rate, SEGMENT) if rate else None, WireTally(self._labels[1])
        )

    async def __aenter__(self) -> Self:
        """Listen on a free port."""
        self.reset()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=READ_BUFFER)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening, cut every link and wait until each has finished."""
        if self._server is not None:
            self._server.close()
        for side in list(self._sides):
            side.transport.abort()
        async with asyncio.timeout(10):
            while self._handlers:
                self._idle.clear()
                await self._idle.wait()
            if self._server is not None:
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers += 1
        sides = [writer]
        self._sides.add(writer)
        try:
            try:
                async with asyncio.timeout(10):
                    up_reader, upstream = await asyncio.open_connection(
                        "127.0.0.1", self._target, limit=READ_BUFFER
                    )
            except (OSError, TimeoutError):
                return
            sides.append(upstream)
            self._sides.add(upstream)
            async with asyncio.TaskGroup() as pumps:
                pumps.create_task(
                    _pump(reader, upstream, self.up, sides), name="throttle[proxy].up"
                )
                pumps.create_task(
                    _pump(up_reader, writer, self.down, sides), name="throttle[proxy].down"
                )
        finally:
            for side in sides:
                side.transport.abort()
                self._sides.discard(side)
            self._handlers -= 1
            self._idle.set()


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    direction: Direction,
    sides: list[asyncio.StreamWriter],
) -> None:
    """Forward one direction a segment at a time, as its bucket allows, counting what crosses."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionError, OSError):
        while True:
            asked = loop.time()
            data = await reader.read(SEGMENT)
            if not data:
                break
            bucket = direction.bucket
            if bucket is not None:
                came = loop.time()
                # Idle: the link had sent everything and this side was waiting for data.
                idle = max(0.0, came - max(asked, bucket.busy_until))
                if direction.crossed:
                    direction.idle_s += idle
                    if idle > GAP_S:
                        direction.gaps.append((came - idle, idle))
                await bucket.take(len(data))
            writer.write(data)
            direction.crossed += len(data)
            direction.tally.feed(data, loop.time())
            await writer.drain()
    # One direction ended: end the other too, as a real link would.
    for side in sides:
        side.transport.abort()
