"""The site server behind `meshchat up`: every service of one site in one asyncio process."""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from typing import TYPE_CHECKING, Self

from meshchat.broker import BrokerSettings, EmbeddedBroker, Listener

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

    from meshchat.datadir import DataDir

__all__ = ["RUNTIME_FILE", "SiteServer"]

logger = logging.getLogger(__name__)

RUNTIME_FILE = "up.json"
"""Written while the server runs: its pid and listener URLs, for local clients and scripts."""


class SiteServer:
    """Broker (and, as they land, directory, archiver and geofence) sharing one data directory.

    An async context manager: entering locks the data directory and starts every service;
    leaving stops them in reverse order and releases the lock.
    """

    def __init__(self, data: DataDir, broker: BrokerSettings | None = None) -> None:
        """Prepare a server on `data`; nothing starts until it is entered."""
        self.data = data
        self.broker = EmbeddedBroker(broker)
        self._stack = ExitStack()

    @property
    def listeners(self) -> list[Listener]:
        """Where the broker listens."""
        return self.broker.listeners

    @property
    def runtime_file(self) -> Path:
        """The file that tells local clients where this server listens."""
        return self.data.path / RUNTIME_FILE

    async def __aenter__(self) -> Self:
        """Lock the data directory and start the services.

        Raises:
            ConfigError: the data directory is unusable or in use.
            BrokerError: the broker cannot listen (`AddressInUseError` when a port is taken).
        """
        self._stack.enter_context(self.data.lock())
        try:
            await self.broker.start()
            self._write_runtime_file()
        except BaseException:
            await self.broker.stop()
            self._stack.close()
            raise
        return self

    def _write_runtime_file(self) -> None:
        state = {"pid": os.getpid(), "listeners": [listener.url for listener in self.listeners]}
        tmp = self.runtime_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.runtime_file)
        self._stack.callback(self.runtime_file.unlink, missing_ok=True)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop every service and release the data directory."""
        try:
            await self.broker.stop()
        finally:
            self._stack.close()
