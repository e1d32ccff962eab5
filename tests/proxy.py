"""A TCP proxy for tests: a link between a client and a broker that a test can break on purpose.

`TcpProxy` listens on a free loopback port and forwards every connection to a target. A test
can cut every live connection at once (both ends see it closed, as when a router reboots),
refuse new connections (accepted and closed at once, as a dead uplink behind a live gateway
looks), stall the link (bytes are held, nothing is closed: a silent link that only keepalive
notices), and point new connections at another target (a broker restarted on a new port).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self

__all__ = ["TcpProxy"]

_CHUNK = 65536


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 that can cut, refuse, stall and redirect its links."""

    def __init__(self, target_host: str, target_port: int) -> None:
        """Forward to `target_host`:`target_port` once entered."""
        self.host = "127.0.0.1"
        self.port = 0
        self.accepted = 0
        """Connections accepted so far, forwarded or refused."""
        self._target = (target_host, target_port)
        self._refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._handlers = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepted_changed = asyncio.Event()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """``mqtt://`` URL of the proxy's listening side."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def live(self) -> int:
        """Connections being forwarded now."""
        return len(self._links)

    async def __aenter__(self) -> Self:
        """Start listening on a free port."""
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening, cut every link and wait until each handler has finished."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._flowing.set()
        self.cut()
        async with asyncio.timeout(10):
            await self._idle.wait()

    def retarget(self, host: str, port: int) -> None:
        """Send new connections to `host`:`port`; live ones stay where they are."""
        self._target = (host, port)

    def refuse(self) -> None:
        """Close each new connection as soon as it is accepted."""
        self._refusing = True

    def accept(self) -> None:
        """Forward new connections again."""
        self._refusing = False

    def stall(self) -> None:
        """Hold every byte in both directions; nothing is closed."""
        self._flowing.clear()

    def resume(self) -> None:
        """Let the held bytes through and forward again."""
        self._flowing.set()

    def cut(self) -> None:
        """Close every live connection at both ends, at once and without a goodbye."""
        for client, upstream in list(self._links):
            client.transport.abort()
            if upstream is not None:
                upstream.transport.abort()

    async def wait_accepted(self, count: int) -> None:
        """Wait until `count` connections have been accepted in total."""
        while self.accepted < count:
            self._accepted_changed.clear()
            await self._accepted_changed.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers += 1
        self._idle.clear()
        self.accepted += 1
        self._accepted_changed.set()
        link: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        self._links.add(link)
        try:
            if self._refusing:
                return
            try:
                async with asyncio.timeout(10):
                    up_reader, up_writer = await asyncio.open_connection(*self._target)
            except (OSError, TimeoutError):
                return
            self._links.discard(link)
            link = (writer, up_writer)
            self._links.add(link)
            async with asyncio.TaskGroup() as pumps:
                pumps.create_task(self._pump(reader, up_writer, link), name="proxy.up")
                pumps.create_task(self._pump(up_reader, writer, link), name="proxy.down")
        finally:
            self._links.discard(link)
            for side in link:
                if side is not None:
                    side.transport.abort()
            self._handlers -= 1
            if not self._handlers:
                self._idle.set()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None],
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(_CHUNK):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        # One direction ended: end the other too, as a real link would.
        for side in link:
            if side is not None:
                side.transport.abort()
