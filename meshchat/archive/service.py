"""The archiver service: a persistent MQTT session whose messages are acknowledged once stored.

`Archiver` runs over a `Transport` (QoS 1, ``clean_session=False``, a stable client id) and:

- subscribes to every group, key-record and inbox topic of the org (``mc/{org}/+/+``; a
  shared subscription ``$share/{name}/...`` when several archivers split the load on an
  external broker) and hands each envelope to the `ArchiveWriter`; the message is acknowledged
  to the broker only once its transaction has committed (`Transport.messages` with
  ``manual_ack``), so ``kill -9`` loses nothing the broker considers delivered, and a
  redelivery after a crash is stored once;
- counts, logs (without a payload byte) and acknowledges malformed or oversize envelopes at once,
  so they never crash it and never hold up the queue;
- answers history, gap and inbox requests on ``_s/archive/{user}`` (`meshchat.archive.requests`)
  from a second connection on its own thread, one at a time, members only;
- runs a retention pass at start and then every `retention_interval` seconds, and records each
  in the directory's audit log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from meshchat.archive.records import Rejected, RejectReason, classify
from meshchat.archive.requests import RefusedError, answer, authorize
from meshchat.archive.retention import RetentionReport, policies_of, record_run, run_retention
from meshchat.archive.store import ArchiveStore
from meshchat.archive.writer import ArchiveWriter
from meshchat.directory.policy import ARCHIVE_SERVICE, DirectorySnapshot
from meshchat.directory.store import Directory
from meshchat.errors import EnvelopeError, MeshchatError, TopicError
from meshchat.rpc import Reply, decode_request
from meshchat.topics import PREFIX, ServiceTopic, parse_topic, validate_name

if TYPE_CHECKING:
    from meshchat.client._acks import Delivery
    from meshchat.client.transport import Transport

__all__ = [
    "DEFAULT_INBOX_RETENTION_DAYS",
    "DEFAULT_RETENTION_INTERVAL",
    "ArchiveStats",
    "Archiver",
]

logger = logging.getLogger(__name__)

DEFAULT_RETENTION_INTERVAL: Final = 24 * 3600.0
"""Seconds between retention passes (one also runs at start)."""
DEFAULT_INBOX_RETENTION_DAYS: Final = 30
"""Days a device's inbox history is kept."""
MAX_WAITING_REQUESTS: Final = 256
"""Requests waiting for an answer at most; more are dropped (the client asks again)."""
LOG_LINES_PER_MINUTE: Final = 20
"""Lines about dropped messages per minute at most; the rest are counted and summed up."""
T = TypeVar("T")


@dataclass(slots=True)
class ArchiveStats:
    """What an archiver has seen since it started.

    Attributes:
        received: messages taken from the broker (requests included).
        stored: envelopes committed that were new.
        duplicates: envelopes committed that the archive held already (redeliveries).
        malformed: dropped: not a valid envelope, oversize, or the wrong type for the topic.
        ignored: dropped: not an archived topic (presence, another org, an emptied record).
        requests: history, gap and inbox requests answered (refusals included).
        refused: requests answered with a refusal.
        dropped_requests: malformed requests, or too many waiting.
        retention_runs: retention passes done.
    """

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    malformed: int = 0
    ignored: int = 0
    requests: int = 0
    refused: int = 0
    dropped_requests: int = 0
    retention_runs: int = 0


class _LogLimit:
    """At most `per_minute` lines a minute; what is left out is summed up in the next one."""

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._window = -1
        self._lines = 0
        self._suppressed = 0

    def allow(self, now: float) -> bool:
        window = int(now // 60)
        if window != self._window:
            if self._suppressed:
                logger.warning(
                    "%d more dropped messages were not logged one by one", self._suppressed
                )
            self._window, self._lines, self._suppressed = window, 0, 0
        if self._lines < self._per_minute:
            self._lines += 1
            return True
        self._suppressed += 1
        return False


class Archiver:
    """Archives the org's envelopes from a transport and answers history requests."""

    def __init__(
        self,
        path: Path,
        transport: Transport,
        *,
        org: str,
        snapshot: Callable[[], DirectorySnapshot | None] = lambda: None,
        directory_file: Path | None = None,
        share: str | None = None,
        retention_interval: float | None = DEFAULT_RETENTION_INTERVAL,
        inbox_retention_days: int | None = DEFAULT_INBOX_RETENTION_DAYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Archive into `path` what `transport` (entered, persistent session) receives.

        Args:
            path: the archive file (created when missing).
            transport: an entered transport: QoS 1, ``clean_session=False``, a stable client id.
            org: the org whose topics are archived.
            snapshot: the directory's current state, for membership and retention policy
                (None: no directory; requests are refused and retention does nothing).
            directory_file: the directory whose audit log records retention passes.
            share: subscribe through the shared subscription ``$share/{share}/...`` so that
                several archivers split the load (brokers that support it: Mosquitto, EMQX, ...).
            retention_interval: seconds between retention passes; None runs none.
            inbox_retention_days: days inbox history is kept; None keeps it forever.
            clock: the time source (unix seconds).

        Raises:
            TopicError: `org` or `share` is not a valid name.
        """
        validate_name(org, "org name")
        if share is not None:
            validate_name(share, "shared subscription name")
        self.path = path
        self.transport = transport
        self.org = org
        self._snapshot = snapshot
        self._directory_file = directory_file
        self._share = share
        self._retention_interval = retention_interval
        self._inbox_retention_days = inbox_retention_days
        self._clock = clock
        self._request_prefix = f"{ServiceTopic(org, ARCHIVE_SERVICE).topic}/"
        self._stats = ArchiveStats()
        self._writer: ArchiveWriter | None = None
        self._reader: ArchiveStore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._requests: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(MAX_WAITING_REQUESTS)
        self._log_limit = _LogLimit(LOG_LINES_PER_MINUTE)
        self._no_directory_logged = False
        self._waiters: list[tuple[Callable[[ArchiveStats], bool], asyncio.Future[None]]] = []
        self.ready = asyncio.Event()
        """Set once the subscriptions are in place."""

    @property
    def filters(self) -> list[str]:
        """The topic filters the archiver subscribes to."""
        archived = f"{PREFIX}/{self.org}/+/+"
        if self._share is not None:
            archived = f"$share/{self._share}/{archived}"
        return [archived, f"{self._request_prefix}+"]

    @property
    def stats(self) -> ArchiveStats:
        """Counts since start (a copy)."""
        stats = dataclasses.replace(self._stats)
        if self._writer is not None:
            stats.stored, stats.duplicates = self._writer.stored, self._writer.duplicates
        return stats

    async def wait_for(self, predicate: Callable[[ArchiveStats], bool]) -> ArchiveStats:
        """Wait until the counts satisfy `predicate` (callers bound it with `asyncio.timeout`)."""
        while not predicate(self.stats):
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((predicate, future))
            try:
                await future
            finally:
                if not future.done():
                    future.cancel()
                self._waiters = [w for w in self._waiters if w[1] is not future]
        return self.stats

    def _changed(self) -> None:
        """The counts changed: wake the waiters whose condition now holds."""
        if not self._waiters:
            return
        stats = self.stats
        for predicate, future in self._waiters:
            if not future.done() and predicate(stats):
                future.set_result(None)

    async def _run(self, func: Callable[[], T]) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, func)

    async def run(self) -> None:
        """Archive and answer until cancelled (or the transport closes).

        Raises:
            ConfigError: the archive file cannot be opened.
            PermissionDeniedError: the broker refused a subscription.
            MeshchatError: it ran before (an archiver runs once).
        """
        if self._executor is not None:
            raise MeshchatError("this archiver ran before; make a new Archiver to run again")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="meshchat[archive].reader")
        try:
            async with ArchiveWriter(self.path, on_settled=self._changed) as writer:
                self._writer = writer
                self._reader = await self._run(lambda: ArchiveStore(self.path))
                for topic_filter in self.filters:
                    await self.transport.subscribe(topic_filter, qos=1)
                logger.info("archiving %s into %s", ", ".join(self.filters), self.path)
                self.ready.set()
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._answer(), name="meshchat[archive].requests")
                    if self._retention_interval is not None:
                        tasks.create_task(self._retain(), name="meshchat[archive].retention")
                    await self._ingest()
        except* _TransportClosedError:
            logger.info("the archiver's transport closed")
        finally:
            if self._reader is not None:
                reader, self._reader = self._reader, None
                await self._run(reader.close)
            self._executor.shutdown(wait=False)

    # -- ingest ----------------------------------------------------------------------------

    async def _ingest(self) -> None:
        writer = self._writer
        assert writer is not None
        async for delivery in self.transport.messages(manual_ack=True):
            self._stats.received += 1
            if delivery.topic.startswith(self._request_prefix):
                self._take_request(delivery)
                continue
            try:
                record = classify(
                    delivery.topic, delivery.payload, org=self.org, received_at=self._clock()
                )
            except Rejected as rejected:
                self._drop(delivery, rejected)
                delivery.ack()
                self._changed()
                continue
            writer.submit(record, delivery.ack)
        raise _TransportClosedError  # the transport closed: stop answering and retaining too

    def _drop(self, delivery: Delivery, rejected: Rejected) -> None:
        if rejected.reason is RejectReason.IGNORED:
            self._stats.ignored += 1
            logger.debug("ignored a message on %s: %s", delivery.topic, rejected)
            return
        self._stats.malformed += 1
        if self._log_limit.allow(time.monotonic()):
            logger.warning(
                "dropped a malformed message on %s (%d bytes): %s",
                delivery.topic[:200],
                len(delivery.payload),
                str(rejected)[:300],
            )

    # -- requests --------------------------------------------------------------------------

    def _take_request(self, delivery: Delivery) -> None:
        delivery.ack()  # a request is answered once or not at all; the client asks again
        try:
            parsed = parse_topic(delivery.topic)
        except TopicError:
            self._stats.dropped_requests += 1
            return
        if not isinstance(parsed, ServiceTopic) or parsed.requester is None or parsed.reply:
            self._stats.dropped_requests += 1
            return
        try:
            self._requests.put_nowait((parsed.requester, delivery.payload))
        except asyncio.QueueFull:
            self._stats.dropped_requests += 1
            if self._log_limit.allow(time.monotonic()):
                logger.warning(
                    "too many history requests waiting: one of %s dropped", parsed.requester
                )

    async def _answer(self) -> None:
        while True:
            user, payload = await self._requests.get()
            try:
                request = decode_request(payload)
            except EnvelopeError as exc:
                self._stats.dropped_requests += 1
                logger.info("dropped a malformed request from %s: %s", user, exc)
                continue
            self._stats.requests += 1
            try:
                query = authorize(self._snapshot(), user, request, now=self._clock())
                reader = self._reader
                assert reader is not None
                value = await self._run(lambda: answer(reader, query))  # noqa: B023  # awaited here
                reply = Reply.success(request, value)
            except RefusedError as exc:
                self._stats.refused += 1
                reply = Reply.failure(request, str(exc))
            except (MeshchatError, sqlite3.Error):
                logger.exception("answering %s of %s failed", request.op, user)
                reply = Reply.failure(request, "the archive could not answer; try again later")
            topic = ServiceTopic(self.org, ARCHIVE_SERVICE, user, reply=True).topic
            try:
                self.transport.publish_nowait(topic, reply.encode())
            except MeshchatError as exc:
                logger.warning("could not send the reply to %s: %s", user, exc)
            self._changed()

    # -- retention -------------------------------------------------------------------------

    async def _retain(self) -> None:
        interval = self._retention_interval
        assert interval is not None
        while True:
            try:
                await self.retention_pass()
            except (MeshchatError, sqlite3.Error, OSError):
                logger.exception("the retention pass failed; trying again in %.0f s", interval)
            await asyncio.sleep(interval)

    async def retention_pass(self) -> RetentionReport | None:
        """Run one retention pass now (between two write batches) and audit it.

        Returns:
            What it did; None when there is no directory to read policies from.

        Raises:
            MeshchatError: the archiver is not running.
        """
        writer = self._writer
        if writer is None:
            raise MeshchatError("the archiver is not running")
        snapshot = self._snapshot()
        if snapshot is None:
            if not self._no_directory_logged:
                self._no_directory_logged = True
                logger.warning("no directory: retention keeps everything")
            return None
        policies = policies_of(snapshot.groups.values())
        now = self._clock()
        inbox_days = self._inbox_retention_days
        report = await writer.run_job(
            lambda store: run_retention(store, policies, now=now, inbox_retention_days=inbox_days)
        )
        directory_file = self._directory_file
        if directory_file is not None:
            await asyncio.to_thread(_audit, directory_file, report)
        self._stats.retention_runs += 1
        self._changed()
        logger.info(
            "retention: deleted %d envelopes, freed %d bytes; %d groups on legal hold",
            report.total_deleted,
            report.freed_bytes,
            len(report.held),
        )
        return report


class _TransportClosedError(Exception):
    """The transport's message stream ended: the archiver stops."""


def _audit(directory_file: Path, report: RetentionReport) -> None:
    with Directory(directory_file) as directory:
        record_run(directory, report)
