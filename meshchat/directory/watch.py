"""Follow the directory file live: a fresh access policy within a fraction of a second of a change.

Admin commands in other processes write the directory file directly; SQLite's ``data_version``
tells this process that someone committed, and the watcher then rebuilds the `AccessPolicy` and
tells its listeners (the broker's access gate, which drops revoked sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TypeVar

from meshchat.directory.policy import AccessPolicy
from meshchat.directory.store import Directory
from meshchat.errors import DirectoryError

__all__ = ["DirectoryWatcher", "PolicyListener"]

logger = logging.getLogger(__name__)

PolicyListener = Callable[[AccessPolicy], Awaitable[None]]
DEFAULT_INTERVAL: Final = 0.2
T = TypeVar("T")


class DirectoryWatcher:
    """Keeps an `AccessPolicy` current with the directory file; an async context manager.

    All SQLite work runs on one dedicated thread (the directory's single connection), never on
    the event loop.
    """

    def __init__(
        self,
        path: Path,
        *,
        service_tokens: Mapping[str, str] | None = None,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        """Watch the directory at `path`; `service_tokens` are the services' token hashes."""
        self.path = path
        self.interval = interval
        self._service_tokens = dict(service_tokens or {})
        self._executor: ThreadPoolExecutor | None = None
        self._directory: Directory | None = None
        self._policy: AccessPolicy | None = None
        self._listeners: list[PolicyListener] = []
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    @property
    def policy(self) -> AccessPolicy:
        """The current policy.

        Raises:
            DirectoryError: the watcher is not running.
        """
        if self._policy is None:
            raise DirectoryError("the directory watcher is not running")
        return self._policy

    def add_listener(self, listener: PolicyListener) -> None:
        """Call `listener` with every new policy."""
        self._listeners.append(listener)

    async def _run(self, func: Callable[[], T]) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, func)

    async def __aenter__(self) -> Self:
        """Open the directory and load the first policy."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="meshchat[directory]")
        try:
            self._directory = await self._run(lambda: Directory(self.path))
            self._policy = await self._load()
        except BaseException:
            await self._close()
            raise
        self._task = asyncio.create_task(self._watch(), name="meshchat[directory].watch")
        return self

    async def _load(self) -> AccessPolicy:
        directory = self._directory
        assert directory is not None
        snapshot = await self._run(lambda: directory.snapshot(self._service_tokens))
        return AccessPolicy(snapshot)

    async def reload(self) -> AccessPolicy:
        """Rebuild the policy now and tell the listeners (the poll does this on its own)."""
        policy = await self._load()
        for listener in self._listeners:
            await listener(policy)
        self._policy = policy
        async with self._changed:
            self._changed.notify_all()
        return policy

    async def wait_for(self, predicate: Callable[[AccessPolicy], bool]) -> AccessPolicy:
        """Wait (callers bound it with `asyncio.timeout`) until the policy satisfies `predicate`.

        Listeners have seen that policy by the time this returns.
        """
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self.policy))
        return self.policy

    async def _watch(self) -> None:
        directory = self._directory
        assert directory is not None
        version = await self._run(directory.data_version)
        while True:
            await asyncio.sleep(self.interval)
            try:
                current = await self._run(directory.data_version)
                if current == version:
                    continue
                version = current
                await self.reload()
                logger.info("directory changed; access policy reloaded")
            except DirectoryError:
                # A half-written change or a locked file: keep the last good policy, retry.
                logger.exception("cannot reload the directory; keeping the previous policy")

    async def _close(self) -> None:
        if self._directory is not None:
            directory, self._directory = self._directory, None
            await self._run(directory.close)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop watching and close the directory."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()
