"""Real brokers for tests: the embedded amqtt broker in-process, and Mosquitto as a subprocess."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshchat.broker import BrokerSettings, EmbeddedBroker

__all__ = [
    "MOSQUITTO_MISSING",
    "Mosquitto",
    "embedded_broker",
    "find_mosquitto",
    "free_port",
    "mosquitto_broker",
    "wait_for_port",
]

MOSQUITTO_MISSING = (
    "Mosquitto is not installed and could not be installed here (`make test` installs it from "
    "Debian's packages when run as root: apt-get install mosquitto mosquitto-clients)"
)


@contextlib.asynccontextmanager
async def embedded_broker(**settings: object) -> AsyncIterator[EmbeddedBroker]:
    """An embedded broker on a free loopback port; ``broker.listener("mqtt")`` says where."""
    options: dict[str, object] = {"host": "127.0.0.1", "port": 0} | settings
    async with EmbeddedBroker(BrokerSettings(**options)) as broker:  # type: ignore[arg-type]  # test helper passes through
        yield broker


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, *, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            msg = f"process exited with {proc.returncode} before listening on {port}"
            raise RuntimeError(msg)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            msg = f"nothing listens on 127.0.0.1:{port} after {timeout} s"
            raise TimeoutError(msg)
        time.sleep(0.02)


def find_mosquitto() -> str | None:
    """The Mosquitto binary, also where Debian puts it outside a normal user's PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    candidate = Path("/usr/sbin/mosquitto")
    return str(candidate) if candidate.exists() else None


@dataclass(frozen=True, slots=True)
class Mosquitto:
    """A running Mosquitto."""

    host: str
    port: int
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def mosquitto_broker(workdir: Path) -> Iterator[Mosquitto]:
    """Start Mosquitto on a free loopback port with a temporary config; skip if it is missing."""
    binary = find_mosquitto()
    if binary is None:
        pytest.skip(MOSQUITTO_MISSING)
    for _attempt in range(3):  # a port picked free can be taken before Mosquitto binds it
        port = free_port()
        config = workdir / f"mosquitto-{port}.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\n",
            encoding="utf-8",
        )
        process = subprocess.Popen(
            [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_for_port(port, proc=process)
        except RuntimeError:
            continue
        try:
            yield Mosquitto("127.0.0.1", port, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()
        return
    msg = "Mosquitto did not start on three free ports"
    raise RuntimeError(msg)
