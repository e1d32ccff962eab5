"""The brokers under test: how to start each one on a free loopback port and stop it again.

A broker is a `BrokerSpec` in `BROKERS`; adding a column to the benchmark's table means adding
a spec whose `start` yields a `RunningBroker` (for example amqtt without meshchat's wrapper).
Every broker runs in its own process, in its own session so that Ctrl-C reaches only the
benchmark, which stops it in a ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from contextlib import AbstractContextManager

__all__ = [
    "BROKERS",
    "BrokerSpec",
    "BrokerUnavailableError",
    "RunningBroker",
    "free_port",
    "mosquitto_path",
    "mosquitto_version",
]

HOST = "127.0.0.1"
_HERE = Path(__file__).resolve().parent
_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 5.0


class BrokerUnavailableError(RuntimeError):
    """A broker cannot be started here (not installed, or it failed to come up)."""


@dataclass(frozen=True, slots=True)
class RunningBroker:
    """A broker process that accepts MQTT connections."""

    host: str
    port: int
    pid: int

    def process(self) -> psutil.Process:
        """The broker's process, for its resident set and CPU time."""
        return psutil.Process(self.pid)

    def rss_mib(self) -> float:
        """The broker's resident set size in MiB."""
        return self.process().memory_info().rss / 2**20

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the broker has used so far."""
        times = self.process().cpu_times()
        return times.user + times.system

    def pin(self, cpus: set[int]) -> None:
        """Restrict every thread of the broker to `cpus` (threads started later inherit it)."""
        for thread in self.process().threads():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(thread.id, cpus)


@dataclass(frozen=True, slots=True)
class BrokerSpec:
    """One column of the table.

    Attributes:
        key: the broker's key in the JSON results.
        label: the column header.
        version: what runs, for the JSON (for example ``amqtt 0.12.1``).
        start: a context manager that starts the broker in `workdir` and stops it on exit.
    """

    key: str
    label: str
    version: Callable[[], str]
    start: Callable[[Path], AbstractContextManager[RunningBroker]]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _wait_accepting(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until `port` accepts TCP connections, or fail with the broker's log."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrokerUnavailableError(
                f"the broker exited with {process.returncode}: {log.read_text()[-2000:]}"
            )
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BrokerUnavailableError(f"the broker did not accept connections on port {port}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the process lingers; never leaves an orphan."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT_S)


def _read_port(stream: IO[bytes], process: subprocess.Popen[bytes], log: Path) -> int:
    """Read the ``PORT <n>`` line the embedded broker prints once it listens."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    os.set_blocking(stream.fileno(), False)
    buffer = b""
    while time.monotonic() < deadline:
        chunk = stream.read()
        if chunk:
            buffer += chunk
            match = re.search(rb"^PORT (\d+)$", buffer, re.MULTILINE)
            if match:
                return int(match.group(1))
        if process.poll() is not None:
            raise BrokerUnavailableError(
                f"the embedded broker exited with {process.returncode}: {log.read_text()[-2000:]}"
            )
        time.sleep(0.02)
    raise BrokerUnavailableError("the embedded broker did not report its port in time")


@contextlib.contextmanager
def start_embedded(workdir: Path) -> Iterator[RunningBroker]:
    """Run meshchat's embedded broker (amqtt) in a child Python process."""
    log = workdir / "embedded.log"
    with log.open("wb") as errors:
        process = subprocess.Popen(
            [sys.executable, str(_HERE / "embedded_broker.py")],
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None  # stdout=PIPE above
            port = _read_port(process.stdout, process, log)
            _wait_accepting(port, process, log)
            yield RunningBroker(HOST, port, process.pid)
        finally:
            _stop(process)
            if process.stdout is not None:
                process.stdout.close()


def mosquitto_path() -> str | None:
    """Where Mosquitto is installed (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def mosquitto_version() -> str:
    """``mosquitto 2.0.11`` or ``not installed``."""
    path = mosquitto_path()
    if path is None:
        return "not installed"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        run = subprocess.run([path, "-h"], capture_output=True, timeout=5, check=False)
        match = re.search(rb"mosquitto version (\S+)", run.stdout + run.stderr)
        if match:
            return f"mosquitto {match.group(1).decode()}"
    return "mosquitto (unknown version)"


_MOSQUITTO_CONF = """\
# Written by benchmarks/broker_bench.py for one run; deleted afterwards.
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 1000000
max_queued_bytes 0
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
"""


@contextlib.contextmanager
def start_mosquitto(workdir: Path) -> Iterator[RunningBroker]:
    """Run Mosquitto on a free loopback port with a temporary configuration."""
    path = mosquitto_path()
    if path is None:
        raise BrokerUnavailableError("Mosquitto is not installed (make mosquitto)")
    port = free_port()
    conf = workdir / f"mosquitto-{port}.conf"
    conf.write_text(_MOSQUITTO_CONF.format(port=port))
    log = workdir / "mosquitto.log"
    with log.open("ab") as errors:
        process = subprocess.Popen(
            [path, "-c", str(conf)],
            stdout=errors,
            stderr=errors,
            start_new_session=True,
        )
        try:
            _wait_accepting(port, process, log)
            yield RunningBroker(HOST, port, process.pid)
        finally:
            _stop(process)


BROKERS: tuple[BrokerSpec, ...] = (
    BrokerSpec(
        key="embedded",
        label="embedded (amqtt)",
        version=lambda: f"amqtt {metadata.version('amqtt')}",
        start=start_embedded,
    ),
    BrokerSpec(
        key="mosquitto",
        label="mosquitto",
        version=mosquitto_version,
        start=start_mosquitto,
    ),
)


def temporary_workdir() -> tempfile.TemporaryDirectory[str]:
    """A private directory for configuration files and broker logs."""
    return tempfile.TemporaryDirectory(prefix="meshchat-bench-")
