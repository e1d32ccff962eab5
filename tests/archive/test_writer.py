"""The one writer: batches commit before anyone hears of them, in order, and failures wait."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from meshchat.archive import ArchiveStore, ArchiveWriter, WriterState
from meshchat.archive.writer import THREAD_NAME
from meshchat.errors import MeshchatError
from tests.archive.helpers import DEADLINE, LINE1, message, record


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0])


async def test_each_record_is_committed_before_its_callback_and_callbacks_keep_order(
    tmp_path: Path,
) -> None:
    path = tmp_path / "archive.db"
    seen: list[tuple[int, int]] = []
    done = asyncio.Event()
    async with ArchiveWriter(path) as writer:
        for index in range(300):

            def committed(index: int = index) -> None:
                # Another connection sees the row by now: it is on disk, not in a buffer.
                seen.append((index, _rows(path)))
                if index == 299:
                    done.set()

            writer.submit(record(LINE1, message(1, index), float(index)), committed)
        async with asyncio.timeout(DEADLINE):
            await done.wait()
        assert (writer.stored, writer.duplicates, writer.pending) == (300, 0, 0)
    assert [index for index, _ in seen] == list(range(300))
    assert all(rows > index for index, rows in seen)
    assert writer.state is WriterState.CLOSED
    assert not [t for t in threading.enumerate() if t.name == THREAD_NAME]


async def test_a_job_runs_after_what_was_submitted_before_it(tmp_path: Path) -> None:
    async with ArchiveWriter(tmp_path / "archive.db") as writer:
        for index in range(50):
            writer.submit(record(LINE1, message(1, index), 0.0), lambda: None)
        count = await writer.run_job(lambda store: store.count())
        assert count == 50
        with pytest.raises(ZeroDivisionError):
            await writer.run_job(lambda _store: 1 // 0)
        assert await writer.run_job(ArchiveStore.count) == 50  # a failed job harms nothing
    with pytest.raises(MeshchatError, match="closed"):
        await writer.run_job(ArchiveStore.count)


class _Signal(logging.Handler):
    """Sets an event (on the loop) when a matching line is logged, from any thread."""

    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle
        self.loop = asyncio.get_running_loop()
        self.seen = asyncio.Event()

    def emit(self, log_record: logging.LogRecord) -> None:
        if self.needle in log_record.getMessage():
            self.loop.call_soon_threadsafe(self.seen.set)


async def test_a_batch_that_cannot_be_stored_is_retried_and_nothing_is_acknowledged_meanwhile(
    tmp_path: Path,
) -> None:
    path = tmp_path / "archive.db"
    with ArchiveStore(path) as store:
        # A disk that refuses writes until the test says otherwise.
        store.conn.executescript(
            "CREATE TABLE fail (x); INSERT INTO fail VALUES (1);"
            "CREATE TRIGGER refuse BEFORE INSERT ON envelopes "
            "WHEN (SELECT COUNT(*) FROM fail) > 0 BEGIN SELECT RAISE(ABORT, 'disk full'); END;"
        )
    signal = _Signal("storing 3 envelopes failed (disk full)")
    logger = logging.getLogger("meshchat.archive.writer")
    logger.addHandler(signal)
    committed: list[int] = []
    try:
        async with ArchiveWriter(path) as writer:
            for index in range(3):

                def done(index: int = index) -> None:
                    committed.append(index)

                writer.submit(record(LINE1, message(1, index), 0.0), done)
            async with asyncio.timeout(DEADLINE):
                await signal.seen.wait()
            assert committed == []
            assert writer.pending == 3
            with sqlite3.connect(path) as conn:
                conn.execute("DELETE FROM fail")  # the disk has room again
            async with asyncio.timeout(DEADLINE):
                # Jobs run in order after the held batch, whose callbacks come first.
                await writer.run_job(lambda _store: None)
    finally:
        logger.removeHandler(signal)
    assert committed == [0, 1, 2]
    assert _rows(path) == 3
