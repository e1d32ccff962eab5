"""The archive's one writer: a thread that stores records in batches and says when they are safe.

The event loop never touches SQLite. `ArchiveWriter.submit` collects a record and a callback
without waiting; once per turn of the event loop what was collected is handed to the writer
thread, which stores whatever has accumulated in one transaction (group commit: while it commits,
the next records accumulate) and then calls back, on the event loop and in submission order,
for every record of the batch. The archiver acknowledges a message to the broker in that
callback, so nothing is acknowledged before it is committed.

A batch that cannot be stored (a full disk, a locked file) is retried, with a growing pause,
until it is stored or the writer closes; meanwhile its messages stay unacknowledged, and the
broker sends them again to the next archiver process if this one dies. Jobs (the retention pass)
run on the same thread between batches, so there is only ever one writer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self, TypeVar

from meshchat.archive.store import ArchiveStore
from meshchat.errors import ConfigError, MeshchatError

if TYPE_CHECKING:
    from types import TracebackType

    from meshchat.archive.records import Record

__all__ = ["THREAD_NAME", "ArchiveWriter", "WriterState"]

logger = logging.getLogger(__name__)

THREAD_NAME: Final = "meshchat[archive].writer"
MAX_BATCH: Final = 5000
"""Records one transaction takes at most; a longer backlog is committed in several."""
COMMIT_INTERVAL: Final = 0.002
"""Seconds between the starts of two commits at least: under load one commit takes all that
came in meanwhile; an idle writer commits at once."""
RETRY_PAUSE: Final = (0.05, 5.0)
"""The first and the longest pause before a failed batch is tried again, in seconds."""
OPEN_DEADLINE: Final = 60.0
CLOSE_DEADLINE: Final = 30.0
T = TypeVar("T")

Done = Callable[[], None]
"""Called on the event loop once a record is committed (new, or found already stored)."""


class WriterState(enum.Enum):
    """Lifecycle of an `ArchiveWriter`; it opens once."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(slots=True)
class _Job:
    """Work for the writer thread, with the future its result goes to."""

    run: Callable[[ArchiveStore], object]
    future: asyncio.Future[object]


_Item = list[tuple["Record", Done]] | _Job | None


class ArchiveWriter:
    """One thread that owns the archive's write connection; an async context manager."""

    def __init__(self, path: Path, *, on_settled: Callable[[], None] | None = None) -> None:
        """Refer to `path`; nothing is opened until the writer is entered.

        Args:
            path: the archive file (created when missing).
            on_settled: called on the event loop after the callbacks of each committed batch.
        """
        self.path = path
        self._on_settled = on_settled
        self._state = WriterState.NEW
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._collected: list[tuple[Record, Done]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._closing = threading.Event()
        self.stored = 0
        """Records committed that were new."""
        self.duplicates = 0
        """Records committed that the archive held already (redeliveries)."""
        self.pending = 0
        """Records submitted and not yet committed."""

    @property
    def state(self) -> WriterState:
        """Where the writer is in its lifecycle."""
        return self._state

    async def __aenter__(self) -> Self:
        """Open the archive on the writer thread and start it.

        Raises:
            ConfigError: the archive cannot be opened.
            MeshchatError: the writer was opened before.
        """
        if self._state is not WriterState.NEW:
            raise MeshchatError(f"the archive writer is {self._state.value}; it opens once")
        loop = asyncio.get_running_loop()
        self._loop = loop
        opened: asyncio.Future[None] = loop.create_future()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, opened), name=THREAD_NAME, daemon=True
        )
        self._state = WriterState.OPEN
        self._thread.start()
        try:
            async with asyncio.timeout(OPEN_DEADLINE):
                await opened
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Commit what was submitted (within `CLOSE_DEADLINE`) and stop the thread."""
        await self.close()

    async def close(self) -> None:
        """Commit what was submitted, stop the thread, close the file; again is a no-op."""
        if self._state is not WriterState.OPEN:
            self._state = WriterState.CLOSED
            return
        self._state = WriterState.CLOSED
        self._hand_over()
        self._queue.put(None)
        stopped = self._stopped
        assert stopped is not None
        try:
            async with asyncio.timeout(CLOSE_DEADLINE):
                await asyncio.shield(stopped)
        except TimeoutError:
            # A batch keeps failing: give up on it; its messages were never acknowledged.
            self._closing.set()
            logger.error(  # noqa: TRY400  # the timeout is the whole story
                "the archive writer did not finish within %.0f s; %d records were not "
                "stored (the broker sends them again)",
                CLOSE_DEADLINE,
                self.pending,
            )
            return
        finally:
            self._closing.set()
        if self._thread is not None:
            self._thread.join(CLOSE_DEADLINE)

    # -- the event loop's side --------------------------------------------------------------

    def submit(self, record: Record, done: Done) -> None:
        """Store `record`; `done` is called (on the event loop) once it is committed.

        Never blocks. Ignored (with `done` never called) once the writer is closed.
        """
        if self._state is not WriterState.OPEN or self._loop is None:
            logger.debug("the archive writer is %s: record ignored", self._state.value)
            return
        if not self._collected:
            # One hand-over per turn of the loop, not a thread wake-up per record.
            self._loop.call_soon(self._hand_over)
        self._collected.append((record, done))
        self.pending += 1

    def _hand_over(self) -> None:
        if self._collected:
            self._queue.put(self._collected)
            self._collected = []

    async def run_job(self, job: Callable[[ArchiveStore], T]) -> T:
        """Run `job` with the write connection on the writer thread, between two batches.

        Raises:
            MeshchatError: the writer is not open.
            Exception: whatever `job` raised.
        """
        if self._state is not WriterState.OPEN or self._loop is None:
            raise MeshchatError(f"the archive writer is {self._state.value}")
        self._hand_over()  # records submitted before the job are stored before it runs
        future: asyncio.Future[object] = self._loop.create_future()
        self._queue.put(_Job(job, future))
        return await future  # type: ignore[return-value]  # the job's own result, passed through

    def _settled(self, batch: list[tuple[Record, Done]], new: int) -> None:
        self.pending -= len(batch)
        self.stored += new
        self.duplicates += len(batch) - new
        for _, done in batch:
            try:
                done()
            except Exception:
                logger.exception("an archive callback failed")
        if self._on_settled is not None:
            self._on_settled()

    # -- the writer thread ------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, opened: asyncio.Future[None]) -> None:
        def post(callback: Callable[..., None], *args: object) -> bool:
            try:
                loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return False
            return True

        def deliver(error: BaseException | None) -> None:
            if opened.done():
                return
            if error is None:
                opened.set_result(None)
            else:
                opened.set_exception(error)

        def stopped() -> None:
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)

        try:
            store = ArchiveStore(self.path)
        except ConfigError as exc:
            post(deliver, exc)
            post(stopped)
            return
        try:
            post(deliver, None)
            self._serve(store, post)
        finally:
            store.close()
            post(stopped)

    def _serve(self, store: ArchiveStore, post: Callable[..., bool]) -> None:
        started = 0.0
        carry: _Job | _Stop | None = None
        while True:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is None or isinstance(item, _Stop):
                return
            if isinstance(item, _Job):
                self._job(store, item, post)
                continue
            pause = started + COMMIT_INTERVAL - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # let more gather; nobody is woken for them meanwhile
            started = time.monotonic()
            batch, carry = self._gather(item)
            new = self._store(store, batch)
            if new is None or not post(self._settled, batch, new):
                return

    def _gather(
        self, first: list[tuple[Record, Done]]
    ) -> tuple[list[tuple[Record, Done]], _Job | _Stop | None]:
        """`first` and the batches handed over since; and a job or the stop that came next."""
        batch = list(first)
        while len(batch) < MAX_BATCH:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return batch, _STOP
            if isinstance(more, _Job):
                return batch, more
            batch.extend(more)
        return batch, None

    def _store(self, store: ArchiveStore, batch: list[tuple[Record, Done]]) -> int | None:
        """Commit `batch`; how many records were new. None: the writer closed first."""
        pause, longest = RETRY_PAUSE
        failures = 0
        while True:
            try:
                return store.insert([record for record, _ in batch])
            except Exception as exc:  # noqa: BLE001  # any failure: nothing of the batch is stored
                failures += 1
                if failures == 1:
                    logger.warning(
                        "storing %d envelopes failed (%s); retrying until it works, and "
                        "acknowledging none of them meanwhile",
                        len(batch),
                        exc,
                    )
            if self._closing.wait(pause):
                return None
            pause = min(longest, pause * 2)

    def _job(self, store: ArchiveStore, job: _Job, post: Callable[..., bool]) -> None:
        def settle(result: object, error: BaseException | None) -> None:
            if job.future.done():
                return
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)

        try:
            result = job.run(store)
        except Exception as exc:  # noqa: BLE001  # handed to whoever awaits the job
            post(settle, None, exc)
        else:
            post(settle, result, None)


class _Stop:
    """The end of the queue, found while gathering a batch."""


_STOP: Final = _Stop()
