"""The brokers under test: how to start each one on a free loopback port and stop it again.

A broker is a `BrokerSpec` in `BROKERS`; adding a column to the benchmark's table means adding
a spec whose `start` yields a `RunningBroker`. The columns: meshchat's embedded broker without
authentication, plain amqtt (the reference of the 95% budget), meshchat's site broker with the
directory's authentication and topic ACL on, and Mosquitto. Every broker runs in its own
process, in its own session so that Ctrl-C reaches only the benchmark, which stops it in a
``finally``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Protocol

import psutil
from loadgen import Login
from roster import DEPT, IDLE_USER, ORG, PUBLISHER_USER, SUBSCRIBER_USER, Roster

from meshchat.directory import Directory

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from contextlib import AbstractContextManager

__all__ = [
    "BROKERS",
    "BrokerSpec",
    "BrokerUnavailableError",
    "RunningBroker",
    "build_directory",
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
    """A broker process that accepts MQTT connections.

    Attributes:
        host: its address.
        port: its MQTT port.
        pid: its process.
        logins: the credentials of every client id of the `Roster`, for a broker that
            authenticates; empty when it takes anonymous clients.
        sessions: how it keeps persistent sessions, when it says (``in memory``, ...).
    """

    host: str
    port: int
    pid: int
    logins: Mapping[str, Login] = field(default_factory=dict, repr=False)
    sessions: str = ""

    def logins_of(self, client_ids: tuple[str, ...]) -> tuple[Login, ...]:
        """The credentials of `client_ids`, in order; empty for an anonymous broker.

        Raises:
            KeyError: the broker authenticates and has no credentials for one of them.
        """
        if not self.logins:
            return ()
        return tuple(self.logins[client_id] for client_id in client_ids)

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


class Starter(Protocol):
    """Starts a broker whose files go in `workdir`, for the clients of `roster`.

    `durable` asks for the broker's durable session store, where it has one.
    """

    def __call__(
        self, workdir: Path, roster: Roster, *, durable: bool = False
    ) -> AbstractContextManager[RunningBroker]:
        """A context manager that starts the broker and stops it on exit."""
        ...


@dataclass(frozen=True, slots=True)
class BrokerSpec:
    """One column of the table.

    Attributes:
        key: the broker's key in the JSON results.
        label: the column header.
        version: what runs, for the JSON (for example ``amqtt 0.12.1``).
        start: starts the broker and stops it on exit.
    """

    key: str
    label: str
    version: Callable[[], str]
    start: Starter


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


def _read_port(stream: IO[bytes], process: subprocess.Popen[bytes], log: Path) -> tuple[int, str]:
    """Read the ``PORT <n> [<sessions>]`` line a Python broker child prints once it listens."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    os.set_blocking(stream.fileno(), False)
    buffer = b""
    while time.monotonic() < deadline:
        chunk = stream.read()
        if chunk:
            buffer += chunk
            match = re.search(rb"^PORT (\d+) ?(.*)\n", buffer, re.MULTILINE)
            if match:
                return int(match.group(1)), match.group(2).decode()
        if process.poll() is not None:
            raise BrokerUnavailableError(
                f"the broker exited with {process.returncode}: {log.read_text()[-2000:]}"
            )
        time.sleep(0.02)
    raise BrokerUnavailableError("the broker did not report its port in time")


@contextlib.contextmanager
def _python_broker(
    script: str, args: list[str], log: Path, logins: Mapping[str, Login] | None = None
) -> Iterator[RunningBroker]:
    """Run one of the broker scripts beside this module in a child Python process."""
    with log.open("ab") as errors:
        process = subprocess.Popen(
            [sys.executable, str(_HERE / script), *args],
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None  # stdout=PIPE above
            port, sessions = _read_port(process.stdout, process, log)
            _wait_accepting(port, process, log)
            yield RunningBroker(HOST, port, process.pid, logins or {}, sessions)
        finally:
            _stop(process)
            if process.stdout is not None:
                process.stdout.close()


def start_embedded(
    workdir: Path, roster: Roster, *, durable: bool = False
) -> AbstractContextManager[RunningBroker]:
    """Run meshchat's embedded broker (amqtt), anonymous clients from loopback, in a child."""
    del roster, durable  # anonymous clients; sessions in memory
    return _python_broker("embedded_broker.py", [], workdir / "embedded.log")


def start_raw_amqtt(
    workdir: Path, roster: Roster, *, durable: bool = False
) -> AbstractContextManager[RunningBroker]:
    """Run plain `amqtt.broker.Broker` (anonymous plugin only) in a child Python process."""
    del roster, durable  # anonymous clients; amqtt keeps sessions in memory only
    return _python_broker("raw_amqtt_broker.py", [], workdir / "raw-amqtt.log")


ADMIN = "admin"


def build_directory(path: Path, roster: Roster) -> dict[str, Login]:
    """A meshchat directory at `path` with a device for every client of `roster`.

    One org (`roster.ORG`), users that own the devices, every group with the publishing and
    subscribing users as members. Devices log in with their token (a fast hash check; a
    password is argon2id, about 0.17 s a connect).

    Returns:
        The credentials of every client id.
    """
    with Directory(path) as directory:
        directory.init_org(ORG, admin=ADMIN, password=secrets.token_urlsafe(16), dept=DEPT)
        for user in (PUBLISHER_USER, SUBSCRIBER_USER, IDLE_USER):
            directory.add_user(ADMIN, user, dept=DEPT)
        for group in roster.groups():
            directory.create_group(ADMIN, group)
            directory.add_members(ADMIN, group, [PUBLISHER_USER, SUBSCRIBER_USER])
        return {
            device: Login(owner, directory.add_device(ADMIN, device, owner=owner))
            for device, owner in roster.devices().items()
        }


@functools.cache
def _directory_template(workdir: Path, roster: Roster) -> tuple[Path, Mapping[str, Login]]:
    """The directory of `roster`, built once per run; every site broker starts from a copy."""
    path = workdir / (
        f"directory-{roster.publishers}-{roster.fanout_subscribers}-{roster.idle_clients}.db"
    )
    return path, MappingProxyType(build_directory(path, roster))


_site_starts = itertools.count()


def start_site(
    workdir: Path, roster: Roster, *, durable: bool = False
) -> AbstractContextManager[RunningBroker]:
    """Run meshchat's site broker (auth + ACL from a directory) in a child Python process."""
    template, logins = _directory_template(workdir, roster)
    data = workdir / f"site-{next(_site_starts)}"
    args = ["--directory", str(template), "--data", str(data)]
    return _python_broker(
        "site_broker.py", [*args, "--durable"] if durable else args, workdir / "site.log", logins
    )


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
def start_mosquitto(
    workdir: Path, roster: Roster, *, durable: bool = False
) -> Iterator[RunningBroker]:
    """Run Mosquitto on a free loopback port with a temporary configuration."""
    del roster, durable  # anonymous clients; persistence off
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


def _amqtt_version() -> str:
    return f"amqtt {metadata.version('amqtt')}"


BROKERS: tuple[BrokerSpec, ...] = (
    BrokerSpec(
        key="embedded",
        label="embedded (amqtt)",
        version=_amqtt_version,
        start=start_embedded,
    ),
    BrokerSpec(
        key="amqtt",
        label="raw amqtt",
        version=_amqtt_version,
        start=start_raw_amqtt,
    ),
    BrokerSpec(
        key="meshchat",
        label="meshchat (auth+ACL)",
        version=lambda: f"meshchat site broker on {_amqtt_version()}",
        start=start_site,
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
