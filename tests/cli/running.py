"""Run `meshchat up` as a real process, the way a user does, and read what it prints."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["CLI_ENV", "MESHCHAT", "LineReader", "UpProcess", "read_line_matching", "run_meshchat"]

MESHCHAT = str(Path(sys.executable).with_name("meshchat"))
CLI_ENV = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "NO_COLOR": "1"}
"""Unbuffered, wide, plain output: what a test reads line by line."""


def run_meshchat(
    data: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`meshchat ARGS --data DATA` as a separate process, the way a user types it."""
    return subprocess.run(
        [MESHCHAT, *args, "--data", str(data)],
        input=stdin,
        capture_output=True,
        text=True,
        env=CLI_ENV,
        timeout=60,
        check=False,
    )


class LineReader:
    """Reads a text pipe on a thread, so a test can wait for a line with a deadline.

    (select() on the pipe is not enough: the text wrapper may already hold the next lines.)
    """

    def __init__(self, stream: IO[str]) -> None:
        """Start reading `stream` until it ends."""
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def rest(self, timeout: float = 20.0) -> list[str]:
        """Every line until the stream ends."""
        self._thread.join(timeout)
        found: list[str] = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return found
            if line is not None:
                found.append(line)


def read_line_matching(
    reader: LineReader, needle: str, *, timeout: float = 20.0
) -> tuple[str, list[str]]:
    """Wait for a line that contains `needle`; return it and every line read up to it."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = reader.lines.get(timeout=max(remaining, 0.001))
        except queue.Empty:
            msg = f"no line with {needle!r} within {timeout} s; read: {lines}"
            raise TimeoutError(msg) from None
        if line is None:
            msg = f"stream ended before a line with {needle!r}; read: {lines}"
            raise EOFError(msg)
        lines.append(line)
        if needle in line:
            return line, lines


@dataclass
class UpProcess:
    """A `meshchat up` process started with the given arguments."""

    args: list[str]
    process: subprocess.Popen[str] = field(init=False)
    stdout: LineReader = field(init=False)
    stdout_lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Start the process with unbuffered output."""
        env = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "NO_COLOR": "1"}
        self.process = subprocess.Popen(
            [MESHCHAT, "up", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        self.stdout = LineReader(self.process.stdout)

    def wait_ready(self, timeout: float = 20.0) -> dict[str, str]:
        """Wait for the 'Press Ctrl-C' line; return the listener URLs by scheme."""
        _, lines = read_line_matching(self.stdout, "Press Ctrl-C", timeout=timeout)
        self.stdout_lines += lines
        urls: dict[str, str] = {}
        for line in lines:
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].strip()
                urls[url.split("://", 1)[0]] = url
        return urls

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> tuple[int, str, str]:
        """Send `signum`, wait for the exit, and return (exit code, rest of stdout, stderr)."""
        self.process.send_signal(signum)
        return self.finish(timeout)

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        """Wait for the process to end on its own; return (exit code, rest of stdout, stderr)."""
        assert self.process.stderr is not None
        code = self.process.wait(timeout=timeout)
        out = "\n".join(self.stdout.rest(timeout))
        err = self.process.stderr.read()
        self.process.stderr.close()
        return code, out, err

    def kill(self) -> None:
        """Make sure the process is gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stdout.rest()
        if self.process.stderr is not None and not self.process.stderr.closed:
            self.process.stderr.close()
