"""``kill -9`` the archiver in the middle of a 10,000-message burst: nothing is lost or doubled.

Real processes: `meshchat up` (durable broker, anonymous) and `meshchat archive` against it. The
archiver acknowledges an envelope only once it is committed, so what it had not committed when
it was killed stays in its persistent session at the broker and comes again after the restart;
what it had committed and the broker sends again (acknowledgement lost with the process) is
stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from meshchat.client import Transport
from meshchat.envelope import GroupMessage, encode
from tests.archive.helpers import FAST, LINE1
from tests.cli.running import MESHCHAT, LineReader, UpProcess, read_line_matching

BURST = 10_000
KILL_AT = 1_500
"""Envelopes in the archive when the archiver is killed."""
DEADLINE = 90.0


def _payload(index: int) -> bytes:
    return encode(GroupMessage(1, index, os.urandom(24), os.urandom(64)))


@dataclass
class ArchiveProcess:
    """`meshchat archive` as a process of its own."""

    args: list[str]
    process: subprocess.Popen[str] = field(init=False)
    stdout: LineReader = field(init=False)

    def __post_init__(self) -> None:
        env = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "NO_COLOR": "1"}
        self.process = subprocess.Popen(
            [MESHCHAT, "archive", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        self.stdout = LineReader(self.process.stdout)

    def wait_ready(self) -> None:
        read_line_matching(self.stdout, "Press Ctrl-C", timeout=30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@contextlib.contextmanager
def _processes() -> Iterator[list[UpProcess | ArchiveProcess]]:
    started: list[UpProcess | ArchiveProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()


def _rows(path: Path) -> int:
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        try:
            return int(conn.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0])
        except sqlite3.OperationalError:  # not created yet
            return 0


def _wait_rows(path: Path, at_least: int, deadline: float = DEADLINE) -> int:
    """Poll the archive (another process writes it) until it holds `at_least` envelopes."""
    end = time.monotonic() + deadline
    while (rows := _rows(path)) < at_least:
        if time.monotonic() > end:
            msg = f"the archive holds {rows} envelopes, not {at_least}, after {deadline} s"
            raise AssertionError(msg)
        time.sleep(0.02)
    return rows


async def test_kill_9_mid_burst_loses_nothing_and_stores_each_envelope_once(
    tmp_path: Path,
) -> None:
    broker_data, archive_data = tmp_path / "broker", tmp_path / "archive"
    archive_file = archive_data / "archive.db"
    with _processes() as running:
        up = UpProcess(["--anonymous", "--port", "0", "--data", str(broker_data)])
        running.append(up)
        port = int((await asyncio.to_thread(up.wait_ready))["mqtt"].rsplit(":", 1)[1])
        args = [
            "--broker",
            f"mqtt://127.0.0.1:{port}",
            "--org",
            "acme",
            "--data",
            str(archive_data),
        ]
        first = ArchiveProcess(args)
        running.append(first)
        await asyncio.to_thread(first.wait_ready)

        acked = 0
        all_acked = asyncio.Event()

        def on_sent(_message_id: int) -> None:
            nonlocal acked
            acked += 1
            if acked == BURST:
                all_acked.set()

        async with Transport(
            f"mqtt://127.0.0.1:{port}",
            client_id="burst.publisher",
            backoff=FAST,
            max_outbox=BURST,
            on_sent=on_sent,
        ) as publisher:
            for index in range(BURST):
                publisher.publish_nowait(LINE1, _payload(index))
            rows_before = await asyncio.to_thread(_wait_rows, archive_file, KILL_AT)
            first.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.process.wait)
            acked_at_kill = acked
            rows_at_kill = _rows(archive_file)
            async with asyncio.timeout(DEADLINE):
                await all_acked.wait()  # the broker took the rest while no archiver ran

        assert first.process.returncode == -signal.SIGKILL
        assert KILL_AT <= rows_before <= rows_at_kill < BURST  # killed in the middle of it,
        assert acked_at_kill < BURST  # and of the burst itself
        second = ArchiveProcess(args)
        running.append(second)
        await asyncio.to_thread(second.wait_ready)
        await asyncio.to_thread(_wait_rows, archive_file, BURST)
        second.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(second.process.wait, 30)
        said = "\n".join(second.stdout.rest())
    assert code == 0, said
    # The second process stored exactly what the first had not committed.
    assert f"stopped: {BURST - rows_at_kill} stored" in said
    with contextlib.closing(sqlite3.connect(archive_file)) as conn:
        indices = [row[0] for row in conn.execute("SELECT chain_index FROM envelopes")]
        digests = conn.execute("SELECT COUNT(DISTINCT digest) FROM envelopes").fetchone()[0]
    assert sorted(indices) == list(range(BURST))  # every one, exactly once
    assert digests == BURST
