"""The broker's state store: persistent sessions, their queued messages, retained messages.

One SQLite file (`BROKER_STATE_FILE`, WAL, private to its owner; `meshchat.broker.statedb`
has its tables) in the broker's state directory. The event loop never touches SQLite: changes
are collected, without waiting, and handed to one writer thread once per turn of the event
loop; the writer applies whatever has accumulated in one transaction and commits it (group
commit: while it commits, the next changes accumulate; under load it commits at most every
`COMMIT_INTERVAL`). The event loop learns what is on disk through tickets:
`BrokerStore.ticket` is the number of changes submitted so far and `BrokerStore.when_durable`
resolves once that many are committed, so the broker acknowledges a publish only after its
copies are stored.

Committed means written to the WAL (``synchronous=NORMAL``): a commit survives the broker
process dying in any way, ``kill -9`` included; a power cut may lose the last commits (as
Mosquitto loses what came after its last autosave).
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Final, Self

from meshchat.broker.statedb import (
    NO_ROW,
    Change,
    Connection,
    Kind,
    RestoredState,
    apply,
    connect,
    read_back,
)
from meshchat.errors import BrokerError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import TracebackType

__all__ = ["BROKER_STATE_FILE", "BrokerStore", "StoreState"]

logger = logging.getLogger(__name__)

BROKER_STATE_FILE: Final = "broker.db"
"""The store's file name inside the state (data) directory."""
MAX_BATCH: Final = 8192
"""Changes one transaction takes at most; a longer backlog is committed in several."""
COMMIT_INTERVAL: Final = 0.002
"""Seconds between the starts of two commits at least: under load, one commit takes all that
came in meanwhile (a commit costs about as much as a hundred queued messages, and the writer
takes turns with the event loop for the interpreter); an idle store commits at once."""
OPEN_DEADLINE: Final = 120.0
"""Seconds opening (and reading back) the store may take."""
CLOSE_DEADLINE: Final = 30.0
"""Seconds closing may take to commit what is still queued."""
THREAD_NAME: Final = "meshchat[broker].persist"


class StoreState(enum.Enum):
    """Lifecycle of a `BrokerStore`; it opens once."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class BrokerStore:
    """The broker's state in SQLite, written by one thread with group commit.

    An async context manager: entering opens the file, reads the state back (see
    `take_restored`) and starts the writer; leaving commits what is queued and joins the
    writer. The change methods (`enqueue`, `remove`, `retain`, ...) are called on the event
    loop, never block, and are ignored once the store is closed.

    Args:
        path: the SQLite file; created 0600 when missing.
        max_queue: messages one session gets back at most, its newest.
    """

    def __init__(self, path: Path, *, max_queue: int) -> None:
        """Refer to `path`; nothing is opened until the store is entered."""
        self.path = path
        self.max_queue = max_queue
        self._state = StoreState.NEW
        self._changes: queue.SimpleQueue[list[Change] | None] = queue.SimpleQueue()
        self._collected: list[Change] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restored = RestoredState()
        self._sessions: set[str] = set()
        self._next_row = 1
        self._submitted = 0
        self._settled = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._stopped: asyncio.Future[None] | None = None

    @property
    def state(self) -> StoreState:
        """Where the store is in its lifecycle."""
        return self._state

    @property
    def keeps_sessions(self) -> bool:
        """Whether any persistent session is stored (else no publish has anything to keep)."""
        return bool(self._sessions)

    @property
    def ticket(self) -> int:
        """The number of changes submitted so far; see `when_durable`."""
        return self._submitted

    def take_restored(self) -> RestoredState:
        """What the store held when it was opened; a second call returns nothing."""
        restored, self._restored = self._restored, RestoredState()
        return restored

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file, read the state back and start the writer.

        Raises:
            ConfigError: the file cannot be created or used, has a newer schema, or another
                broker holds it.
            BrokerError: the store was opened before, or reading it back took too long.
        """
        if self._state is not StoreState.NEW:
            raise BrokerError(f"the broker state store is {self._state.value}; it opens once")
        loop = asyncio.get_running_loop()
        self._loop = loop
        opened: asyncio.Future[tuple[RestoredState, int]] = loop.create_future()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, opened), name=THREAD_NAME, daemon=True
        )
        self._state = StoreState.OPEN
        self._thread.start()
        try:
            async with asyncio.timeout(OPEN_DEADLINE):
                self._restored, self._next_row = await opened
        except TimeoutError as exc:
            await self.close()
            raise BrokerError(
                f"reading the broker state {self.path} back took over {OPEN_DEADLINE:.0f} s"
            ) from exc
        except BaseException:
            await self.close()
            raise
        sessions, retained = self._restored.sessions, self._restored.retained
        self._sessions = {session.client_id for session in sessions}
        logger.info(
            "broker state %s: %d persistent sessions with %d queued messages, %d retained",
            self.path,
            len(sessions),
            sum(len(session.queue) for session in sessions),
            len(retained),
        )

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the file; a second call is a no-op."""
        if self._state is not StoreState.OPEN:
            self._state = StoreState.CLOSED
            return
        self._state = StoreState.CLOSED
        self._hand_over()
        self._changes.put(None)
        thread, stopped = self._thread, self._stopped
        if thread is None or stopped is None:
            return
        try:
            async with asyncio.timeout(CLOSE_DEADLINE):
                await asyncio.shield(stopped)
        except TimeoutError:
            logger.error(  # noqa: TRY400  # the timeout is the whole story; no traceback needed
                "the broker state writer did not finish within %.0f s: changes may be lost",
                CLOSE_DEADLINE,
            )
            return
        thread.join(CLOSE_DEADLINE)  # it has posted its last word: this returns at once
        self._fail_waiters(BrokerError("the broker state store is closed"))

    async def __aenter__(self) -> Self:
        """Open the store."""
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the store."""
        await self.close()

    # -- changes (event loop) -----------------------------------------------------------------

    def _submit(self, change: Change) -> None:
        if self._state is not StoreState.OPEN or self._loop is None:
            logger.debug("broker state store is %s: change ignored", self._state.value)
            return
        self._submitted += 1
        if not self._collected:
            # One hand-over per turn of the loop: waking the writer for every change would
            # cost a thread switch each (and the broker often has one core).
            self._loop.call_soon(self._hand_over)
        self._collected.append(change)

    def _hand_over(self) -> None:
        if self._collected:
            self._changes.put(self._collected)
            self._collected = []

    def save_session(self, client_id: str) -> None:
        """Record a persistent session (nothing happens if it is recorded already)."""
        self._sessions.add(client_id)
        self._submit((Kind.SESSION, NO_ROW, client_id, "", b"", 0))

    def drop_session(self, client_id: str) -> None:
        """Forget a session with its subscriptions and queue."""
        self._sessions.discard(client_id)
        self._submit((Kind.DROP_SESSION, NO_ROW, client_id, "", b"", 0))

    def save_subscription(self, client_id: str, topic_filter: str, qos: int) -> None:
        """Record (or replace) a subscription of a persistent session."""
        self._sessions.add(client_id)
        self._submit((Kind.SUBSCRIBE, NO_ROW, client_id, topic_filter, b"", qos))

    def drop_subscription(self, client_id: str, topic_filter: str) -> None:
        """Forget a subscription."""
        self._submit((Kind.UNSUBSCRIBE, NO_ROW, client_id, topic_filter, b"", 0))

    def enqueue(self, client_id: str, topic: str, payload: bytes, qos: int) -> int:
        """Keep a message for a persistent session; returns its row, for `sent` and `remove`."""
        row = self._next_row
        self._next_row += 1
        self._submit((Kind.ENQUEUE, row, client_id, topic, payload, qos))
        return row

    def sent(self, row: int) -> None:
        """A kept message went out: if it comes back after a restart, it carries DUP."""
        self._submit((Kind.SENT, row, "", "", b"", 0))

    def remove(self, row: int) -> None:
        """A kept message is done with: acknowledged, dropped over the bound, or refused."""
        self._submit((Kind.REMOVE, row, "", "", b"", 0))

    def retain(self, topic: str, payload: bytes, qos: int) -> None:
        """Record the retained message of a topic."""
        self._submit((Kind.RETAIN, NO_ROW, "", topic, payload, qos))

    def unretain(self, topic: str) -> None:
        """Forget the retained message of a topic."""
        self._submit((Kind.UNRETAIN, NO_ROW, "", topic, b"", 0))

    # -- durability (event loop) --------------------------------------------------------------

    def when_durable(
        self, ticket: int, future: asyncio.Future[None] | None = None
    ) -> asyncio.Future[None]:
        """A future that resolves once the first `ticket` changes are committed.

        It fails with `BrokerError` when a transaction holding one of them failed, or the
        store closed first.

        Args:
            ticket: a `ticket` taken after the changes to wait for were submitted.
            future: the future to resolve (a new one when None).
        """
        if self._loop is None:
            raise BrokerError("the broker state store is not open")
        if future is None:
            future = self._loop.create_future()
        if future.done():
            pass
        elif ticket <= self._settled:
            future.set_result(None)
        elif self._state is not StoreState.OPEN:
            future.set_exception(BrokerError("the broker state store is closed"))
        else:
            heapq.heappush(self._waiters, (ticket, next(self._order), future))
        return future

    async def flush(self, deadline: float = CLOSE_DEADLINE) -> None:
        """Wait until everything submitted so far is committed.

        Raises:
            BrokerError: a commit failed or the store closed.
            TimeoutError: it took longer than `deadline` seconds.
        """
        async with asyncio.timeout(deadline):
            await self.when_durable(self._submitted)

    def _settle(self, through: int, error: str | None) -> None:
        """Called on the loop by the writer: changes up to `through` are committed (or failed)."""
        self._settled = max(self._settled, through)
        while self._waiters and self._waiters[0][0] <= through:
            _, _, future = heapq.heappop(self._waiters)
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(BrokerError(error))

    def _fail_waiters(self, error: BrokerError) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_exception(error)

    def _writer_stopped(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    # -- the writer thread --------------------------------------------------------------------

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        opened: asyncio.Future[tuple[RestoredState, int]],
    ) -> None:
        def post(callback: Callable[..., None], *args: object) -> bool:
            try:
                loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return False
            return True

        def deliver(result: tuple[RestoredState, int] | BaseException) -> None:
            if opened.done():
                return
            if isinstance(result, BaseException):
                opened.set_exception(result)
            else:
                opened.set_result(result)

        try:
            connection = connect(self.path)
        except Exception as exc:  # noqa: BLE001  # handed to the opener, who raises it
            post(deliver, exc)
            post(self._writer_stopped)
            return
        try:
            try:
                restored = read_back(connection, self.path, self.max_queue)
            except Exception as exc:  # noqa: BLE001  # same
                post(deliver, exc)
                return
            post(deliver, restored)
            self._serve(connection, post)
        finally:
            connection.close()
            post(self._writer_stopped)

    def _serve(self, connection: Connection, post: Callable[..., bool]) -> None:
        """Apply queued changes, one transaction per batch, until told to stop."""
        done = 0
        stopping = False
        started = 0.0
        while not stopping:
            first = self._changes.get()
            if first is None:
                break
            pause = started + COMMIT_INTERVAL - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # let more gather; nobody is woken for them meanwhile
            started = time.monotonic()
            batch, stopping = self._gather(first)
            error: str | None = None
            try:
                apply(connection, batch)
            except Exception as exc:
                # Nothing of the batch is on disk: whoever waits for it hears so (publishers
                # are not acknowledged); the next batch may well succeed (a full disk freed).
                error = str(exc)
                logger.exception("storing %d broker state changes failed", len(batch))
            done += len(batch)
            if not post(self._settle, done, error):
                return

    def _gather(self, batch: list[Change]) -> tuple[list[Change], bool]:
        """`batch` and whatever else was handed over; and whether the store is to stop next."""
        while len(batch) < MAX_BATCH:
            try:
                more = self._changes.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch.extend(more)
        return batch, False
