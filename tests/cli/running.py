"""Run `meshchat up` as a real process, the way a user does, and read what it prints."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MESHCHAT", "UpProcess", "read_line_matching"]

MESHCHAT = str(Path(sys.executable).with_name("meshchat"))


def read_line_matching(
    stream: object, needle: str, *, timeout: float = 20.0
) -> tuple[str, list[str]]:
    """Read lines from a text pipe until one contains `needle`; return it and all lines read."""
    assert hasattr(stream, "readline")
    assert hasattr(stream, "fileno")
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            msg = f"no line with {needle!r} within {timeout} s; read: {lines}"
            raise TimeoutError(msg)
        ready, _, _ = select.select([stream], [], [], remaining)
        if not ready:
            continue
        line: str = stream.readline()
        if not line:
            msg = f"stream ended before a line with {needle!r}; read: {lines}"
            raise EOFError(msg)
        lines.append(line.rstrip("\n"))
        if needle in line:
            return line.rstrip("\n"), lines


@dataclass
class UpProcess:
    """A `meshchat up` process started with the given arguments."""

    args: list[str]
    process: subprocess.Popen[str] = field(init=False)
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

    def wait_ready(self, timeout: float = 20.0) -> dict[str, str]:
        """Wait for the 'Press Ctrl-C' line; return the listener URLs by scheme."""
        _, lines = read_line_matching(self.process.stdout, "Press Ctrl-C", timeout=timeout)
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
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out, err

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        """Wait for the process to end on its own."""
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out, err

    def kill(self) -> None:
        """Make sure the process is gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
