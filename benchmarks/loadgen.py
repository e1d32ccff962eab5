"""The load generator: worker processes that publish, subscribe or hold idle connections.

Each worker runs in its own process (multiprocessing, spawn) and follows one protocol with the
parent: connect every client and report ``ready``; wait for the ``go`` event; do the job with a
hard deadline; report ``done`` (or ``error``). Workers ignore SIGINT so that Ctrl-C reaches only
the parent, which terminates them.

Publishers and subscribers are paho-mqtt clients driven by paho's own network steps
(``loop_read``, ``loop_write``, ``loop_misc``) from one selector per process, so one process
serves many clients without a thread per client. Idle clients are raw asyncio sockets that send
CONNECT and wait for CONNACK, which is all an idle client costs a broker. Every client logs in
with its own `Login` when the broker authenticates (device tokens on meshchat's site broker).

Every timestamp is ``CLOCK_MONOTONIC`` in nanoseconds: on Linux that clock is system-wide, so
the parent and all workers can compare their times directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import selectors
import signal
import socket
import struct
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event

    from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "IdleJob",
    "Login",
    "PublishJob",
    "Report",
    "SubscribeJob",
    "monotonic_ns",
    "raise_fd_limit",
    "worker_main",
]

_STAMP = struct.Struct("!Q")
_KEEPALIVE_S = 60
_STOP_POLL_NS = 50_000_000
_READ_BURST = 64


def monotonic_ns() -> int:
    """The system-wide monotonic clock, comparable across processes on one Linux machine."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True, slots=True)
class Login:
    """The user name and password (or device token) a client sends in its CONNECT."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class PublishJob:
    """Publish `count` messages from each client, flat out or paced at `rate` per second.

    Attributes:
        name: the worker's name in reports.
        host: the broker's address.
        port: the broker's port.
        client_ids: one paho client per id, all in this process.
        topics: the topic each client publishes to, in the order of `client_ids`.
        fence_topic: where the QoS 1 fence goes (see `fence`); nobody subscribes to it.
        qos: 0 or 1.
        count: messages per client.
        payload_size: bytes per payload; the first 8 carry the send time.
        rate: messages per second per client; 0 publishes as fast as the socket takes them.
        inflight: the most unacknowledged QoS 1 messages per client.
        fence: after the last QoS 0 message, publish one QoS 1 message and wait for its
            PUBACK, which proves the broker has read everything sent before it.
        logins: the credentials of each client, in the order of `client_ids`; empty for a
            broker that takes anonymous clients.
        setup_timeout_s: the longest wait for connections and for ``go``.
        run_timeout_s: the hard deadline of the job, counted from ``go``.
    """

    name: str
    host: str
    port: int
    client_ids: tuple[str, ...]
    topics: tuple[str, ...]
    fence_topic: str
    qos: int
    count: int
    payload_size: int
    rate: float = 0.0
    inflight: int = 20
    fence: bool = True
    logins: tuple[Login, ...] = ()
    setup_timeout_s: float = 30.0
    run_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class SubscribeJob:
    """Subscribe each client to `topic_filters` and count what arrives.

    Attributes:
        name: the worker's name in reports.
        host: the broker's address.
        port: the broker's port.
        client_ids: one paho client per id, all in this process.
        topic_filters: the filters every client subscribes to, in one SUBSCRIBE.
        qos: the subscriptions' QoS.
        expected: messages each client should receive; the job ends when all have arrived.
        latency: record the latency of every message from the send time in its payload.
        clean_session: False connects with a persistent session (MQTT clean session 0).
        logins: the credentials of each client, in the order of `client_ids`; empty for a
            broker that takes anonymous clients.
        drain_idle_s: after the parent sets ``stop`` (publishers are done), end when nothing
            has arrived for this long; what is missing then is reported as lost.
        setup_timeout_s: the longest wait for connections and for ``go``.
        run_timeout_s: the hard deadline of the job, counted from ``go``.
    """

    name: str
    host: str
    port: int
    client_ids: tuple[str, ...]
    topic_filters: tuple[str, ...]
    qos: int
    expected: int
    latency: bool = False
    clean_session: bool = True
    logins: tuple[Login, ...] = ()
    drain_idle_s: float = 2.0
    setup_timeout_s: float = 30.0
    run_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class IdleJob:
    """Open one MQTT connection per client id; they stay idle until the parent sets ``stop``.

    Attributes:
        name: the worker's name in reports.
        host: the broker's address.
        port: the broker's port.
        client_ids: one connection per id.
        logins: the credentials of each client, in the order of `client_ids`; empty for a
            broker that takes anonymous clients.
        concurrency: connections being opened at once (the listen backlog is finite).
        keepalive_s: the keep-alive announced in CONNECT; longer than the run, so no pings.
        setup_timeout_s: the longest wait for all connections.
        run_timeout_s: the longest time to hold them, counted from ``go``.
    """

    name: str
    host: str
    port: int
    client_ids: tuple[str, ...]
    logins: tuple[Login, ...] = ()
    concurrency: int = 50
    keepalive_s: int = 900
    setup_timeout_s: float = 60.0
    run_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Report:
    """A message from a worker to the parent."""

    worker: str
    kind: Literal["ready", "done", "error"]
    data: dict[str, Any] = field(default_factory=dict)


def worker_main(
    job: PublishJob | SubscribeJob | IdleJob,
    reports: Queue[Report],
    go: Event,
    stop: Event,
) -> None:
    """Entry point of a worker process: run `job`, report errors instead of raising them.

    Args:
        job: what to do.
        reports: where ``ready``, ``done`` and ``error`` reports go.
        go: set by the parent when every worker is ready.
        stop: set by the parent when the producers are done (or the scenario is over).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    try:
        match job:
            case PublishJob():
                _Publisher(job, reports, go, stop).run()
            case SubscribeJob():
                _Subscriber(job, reports, go, stop).run()
            case IdleJob():
                asyncio.run(_hold_idle(job, reports, go, stop))
    except Exception as exc:  # noqa: BLE001  # any failure must reach the parent as a report
        reports.put(Report(job.name, "error", {"error": f"{type(exc).__name__}: {exc}"}))


class _WorkerError(Exception):
    """A worker cannot go on (connection refused, setup timed out, ...)."""


class _Pool:
    """Many paho clients driven by one selector, with paho's own read, write and misc steps."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.clients: list[mqtt.Client] = []
        self.lost: list[str] = []
        self.refused: list[str] = []
        self._selector = selectors.DefaultSelector()
        self._masks: dict[mqtt.Client, int] = {}
        self._ids: dict[mqtt.Client, str] = {}
        self._next_misc_ns = 0
        self.progress = 0
        """Packets handled so far, counted by the callbacks; lets `pump` read in bursts."""

    def connect(
        self,
        client_ids: Sequence[str],
        deadline_ns: int,
        *,
        inflight: int = 20,
        logins: Sequence[Login] = (),
        clean_session: bool = True,
    ) -> None:
        """Connect one client per id, `inflight` QoS 1 messages at most, and wait for CONNACK.

        Args:
            client_ids: one client per id.
            deadline_ns: when to give up waiting for CONNACK (monotonic ns).
            inflight: the most unacknowledged QoS 1 messages per client.
            logins: credentials, one per client id; empty for anonymous clients.
            clean_session: False asks the broker for persistent sessions.

        Raises:
            _WorkerError: a connection failed or was refused, or the deadline passed.
        """
        if logins and len(logins) != len(client_ids):
            raise _WorkerError(f"{len(logins)} logins for {len(client_ids)} clients")
        for n, client_id in enumerate(client_ids):
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=mqtt.MQTTv311,
                clean_session=clean_session,
            )
            if logins:
                client.username_pw_set(logins[n].username, logins[n].password)
            client.on_connect = self._on_connect
            client.on_socket_close = self._on_socket_close
            client.on_disconnect = self._on_disconnect
            client.max_inflight_messages_set(max(inflight, 1))
            client.connect(self.host, self.port, keepalive=_KEEPALIVE_S)
            sock = client.socket()
            if not isinstance(sock, socket.socket):
                raise _WorkerError(f"{client_id}: no TCP socket after connect")
            # paho leaves Nagle on; it would hold back small messages and blur latencies.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._selector.register(sock, selectors.EVENT_READ, client)
            self._masks[client] = selectors.EVENT_READ
            self._ids[client] = client_id
            self.clients.append(client)
        if not self.pump_until(
            lambda: all(c.is_connected() for c in self.clients), deadline_ns, "CONNACK"
        ):
            raise _WorkerError("timed out waiting for CONNACK")

    def pump_until(self, condition: Callable[[], bool], deadline_ns: int, what: str) -> bool:
        """Drive the clients until `condition` holds; False when the deadline passed first.

        Raises:
            _WorkerError: a client lost its connection.
        """
        while not condition():
            if self.refused:
                raise _WorkerError(f"the broker refused {self.refused[0]}")
            if self.lost:
                raise _WorkerError(f"lost the connection of {self.lost[0]} waiting for {what}")
            if monotonic_ns() > deadline_ns:
                return False
            self.pump(0.05)
        return True

    def pump(self, timeout: float) -> None:
        """One round: wait up to `timeout` seconds for socket events and let paho handle them."""
        for client, mask in self._masks.items():
            wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
            if wanted != mask:
                sock = client.socket()
                if sock is not None:
                    self._selector.modify(sock, wanted, client)
                    self._masks[client] = wanted
        for key, events in self._selector.select(timeout):
            client = key.data
            if events & selectors.EVENT_READ:
                # loop_read handles one packet; go on while packets keep arriving, which
                # saves a select per message for subscribers.
                for _ in range(_READ_BURST):
                    before = self.progress
                    client.loop_read()
                    if self.progress == before:
                        break
            if events & selectors.EVENT_WRITE:
                client.loop_write()
        now = monotonic_ns()
        if now >= self._next_misc_ns:
            self._next_misc_ns = now + 1_000_000_000
            for client in list(self._masks):
                client.loop_misc()

    def client_id(self, client: mqtt.Client) -> str:
        """The id `client` connected with."""
        return self._ids.get(client, "?")

    def close(self) -> None:
        """Disconnect every client politely, then close the selector."""
        for client in list(self._masks):
            with contextlib.suppress(Exception):
                client.disconnect()
        self._selector.close()

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _properties: object,
    ) -> None:
        if reason.is_failure:
            self.refused.append(f"the connection of {self.client_id(client)}: {reason}")

    def _on_socket_close(
        self, client: mqtt.Client, _userdata: object, sock: mqtt.SocketLike
    ) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        self._masks.pop(client, None)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: object,
        reason: object,
        _properties: object,
    ) -> None:
        if getattr(reason, "is_failure", True):
            self.lost.append(self.client_id(client))


class _Publisher:
    """The `PublishJob` of one worker process."""

    def __init__(self, job: PublishJob, reports: Queue[Report], go: Event, stop: Event) -> None:
        self.job = job
        self.reports = reports
        self.go = go
        self.stop = stop
        self.pool = _Pool(job.host, job.port)
        self.acked: dict[mqtt.Client, int] = {}
        self.padding = b"x" * max(0, job.payload_size - _STAMP.size)

    def run(self) -> None:
        """Connect, wait for ``go``, publish, report."""
        job = self.job
        setup_deadline = monotonic_ns() + int(job.setup_timeout_s * 1e9)
        try:
            if len(job.topics) != len(job.client_ids):
                raise _WorkerError(f"{len(job.topics)} topics for {len(job.client_ids)} clients")
            self.pool.connect(
                job.client_ids, setup_deadline, inflight=job.inflight, logins=job.logins
            )
            for client in self.pool.clients:
                # Only QoS 1 needs the callback; for QoS 0 paho would build a reason code and
                # properties per message just to call it, a third of the generator's time.
                if job.qos > 0:
                    client.on_publish = self._on_publish
                self.acked[client] = 0
            self.reports.put(Report(job.name, "ready"))
            if not self.go.wait(max(0.0, (setup_deadline - monotonic_ns()) / 1e9)):
                raise _WorkerError("timed out waiting for go")
            if self.stop.is_set():
                return  # the scenario was called off before it started
            self.reports.put(Report(job.name, "done", self._publish()))
        finally:
            self.pool.close()

    def _on_publish(
        self, client: mqtt.Client, _userdata: object, _mid: int, _rc: object, _props: object
    ) -> None:
        self.acked[client] += 1
        self.pool.progress += 1

    def _publish(self) -> dict[str, Any]:
        job = self.job
        pool = self.pool
        start = monotonic_ns()
        deadline = start + int(job.run_timeout_s * 1e9)
        period_ns = int(1e9 / job.rate) if job.rate > 0 else 0
        topics = job.topics
        sent = [0] * len(pool.clients)
        timed_out = False
        while min(sent) < job.count:
            if monotonic_ns() > deadline:
                timed_out = True
                break
            if self._publish_round(topics, sent, start, period_ns) and not period_ns:
                pool.pump(0)
            elif period_ns:
                due = start + min(sent) * period_ns
                pool.pump(max((due - monotonic_ns()) / 1e9, 0.0005))
            else:
                pool.pump(0.05)  # every client is held back: wait for the socket or PUBACKs
            if pool.lost:
                raise _WorkerError(f"lost the connection of {pool.lost[0]} while publishing")
        written = monotonic_ns()
        total = sum(sent)
        if job.qos > 0:
            done = pool.pump_until(lambda: sum(self.acked.values()) >= total, deadline, "PUBACK")
            timed_out = timed_out or not done
        elif job.fence and not timed_out:
            fences = [c.publish(job.fence_topic, b"", 1) for c in pool.clients]
            done = pool.pump_until(lambda: all(f.is_published() for f in fences), deadline, "fence")
            timed_out = not done
        return {
            "sent": total,
            "acked": sum(self.acked.values()) if job.qos > 0 else None,
            "start_ns": start,
            "written_ns": written,
            "end_ns": monotonic_ns(),
            "timed_out": timed_out,
        }

    def _publish_round(
        self, topics: Sequence[str], sent: list[int], start: int, period_ns: int
    ) -> bool:
        """Offer each client one message; returns whether any was published."""
        job = self.job
        now = monotonic_ns()
        progressed = False
        for i, client in enumerate(self.pool.clients):
            if sent[i] >= job.count or (period_ns and now < start + sent[i] * period_ns):
                continue
            # Backpressure: QoS 0 waits for the socket to drain, QoS 1 for PUBACKs.
            if (
                client.want_write()
                if job.qos == 0
                else sent[i] - self.acked[client] >= job.inflight
            ):
                continue
            client.publish(topics[i], _STAMP.pack(monotonic_ns()) + self.padding, job.qos)
            sent[i] += 1
            progressed = True
        return progressed


class _Subscriber:
    """The `SubscribeJob` of one worker process."""

    def __init__(self, job: SubscribeJob, reports: Queue[Report], go: Event, stop: Event) -> None:
        self.job = job
        self.reports = reports
        self.go = go
        self.stop = stop
        self.pool = _Pool(job.host, job.port)
        self.received = 0
        self.first_ns = 0
        self.last_ns = 0
        self.latencies_ns = array("q")
        self.subacks = 0
        self.denied: list[str] = []

    def run(self) -> None:
        """Connect, subscribe, wait for ``go``, count until done, report."""
        job = self.job
        setup_deadline = monotonic_ns() + int(job.setup_timeout_s * 1e9)
        try:
            self.pool.connect(
                job.client_ids,
                setup_deadline,
                logins=job.logins,
                clean_session=job.clean_session,
            )
            for client in self.pool.clients:
                client.on_message = self._on_latency if job.latency else self._on_message
                client.on_subscribe = self._on_subscribe
                client.subscribe([(f, job.qos) for f in job.topic_filters])
            subscribed = self.pool.pump_until(
                lambda: self.subacks >= len(self.pool.clients), setup_deadline, "SUBACK"
            )
            if self.denied:
                raise _WorkerError(f"the broker refused the subscription {self.denied[0]}")
            if not subscribed:
                raise _WorkerError("timed out waiting for SUBACK")
            self.reports.put(Report(job.name, "ready"))
            if not self.go.wait(max(0.0, (setup_deadline - monotonic_ns()) / 1e9)):
                raise _WorkerError("timed out waiting for go")
            if self.stop.is_set():
                return  # the scenario was called off before it started
            self.reports.put(Report(job.name, "done", self._count()))
        finally:
            self.pool.close()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        _userdata: object,
        _mid: int,
        reasons: list[ReasonCode],
        _properties: object,
    ) -> None:
        self.subacks += 1
        # An ACL refusal is a SUBACK with 0x80 in place of a granted QoS.
        for topic_filter, reason in zip(self.job.topic_filters, reasons, strict=False):
            if reason.is_failure:
                self.denied.append(f"of {self.pool.client_id(client)} to {topic_filter!r}")

    def _on_message(self, _client: mqtt.Client, _userdata: object, _msg: mqtt.MQTTMessage) -> None:
        now = monotonic_ns()
        if not self.received:
            self.first_ns = now
        self.received += 1
        self.last_ns = now
        self.pool.progress += 1

    def _on_latency(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = monotonic_ns()
        self.latencies_ns.append(now - _STAMP.unpack_from(msg.payload)[0])
        if not self.received:
            self.first_ns = now
        self.received += 1
        self.last_ns = now
        self.pool.progress += 1

    def _count(self) -> dict[str, Any]:
        job = self.job
        expected = job.expected * len(self.pool.clients)
        start = monotonic_ns()
        deadline = start + int(job.run_timeout_s * 1e9)
        next_poll = 0
        stopping = False
        timed_out = False
        while self.received < expected:
            self.pool.pump(0.05)
            now = monotonic_ns()
            if now > deadline:
                timed_out = True
                break
            if now >= next_poll:
                next_poll = now + _STOP_POLL_NS
                stopping = stopping or self.stop.is_set()
                idle_since = max(self.last_ns, start)
                if stopping and now - idle_since > job.drain_idle_s * 1e9:
                    break
            if self.pool.lost:
                raise _WorkerError(f"lost the connection of {self.pool.lost[0]} while receiving")
        return {
            "received": self.received,
            "expected": expected,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "timed_out": timed_out,
            "latencies_ns": self.latencies_ns.tolist() if job.latency else [],
        }


def _field(value: str) -> bytes:
    """An MQTT UTF-8 string: two length bytes, then the bytes."""
    data = value.encode()
    return len(data).to_bytes(2, "big") + data


def _connect_packet(client_id: str, keepalive_s: int, login: Login | None = None) -> bytes:
    """An MQTT 3.1.1 CONNECT with a clean session, and credentials when `login` is given."""
    flags = 0x02 | (0xC0 if login is not None else 0)  # clean session; user name and password
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + keepalive_s.to_bytes(2, "big")
    body += _field(client_id)
    if login is not None:
        body += _field(login.username) + _field(login.password)
    length = len(body)
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return b"\x10" + bytes(encoded) + body


async def _hold_idle(job: IdleJob, reports: Queue[Report], go: Event, stop: Event) -> None:
    """Open the connections of an `IdleJob`, report, hold them until ``stop``, close them."""
    if job.logins and len(job.logins) != len(job.client_ids):
        raise _WorkerError(f"{len(job.logins)} logins for {len(job.client_ids)} clients")
    gate = asyncio.Semaphore(max(job.concurrency, 1))
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failures: list[str] = []

    async def open_one(n: int) -> None:
        async with gate:
            try:
                async with asyncio.timeout(10):
                    reader, writer = await asyncio.open_connection(job.host, job.port)
                    login = job.logins[n] if job.logins else None
                    writer.write(_connect_packet(job.client_ids[n], job.keepalive_s, login))
                    connack = await reader.readexactly(4)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            if connack[0] != 0x20 or connack[3] != 0:
                failures.append(f"CONNACK {connack.hex()}")
                writer.close()
                return
            streams.append((reader, writer))

    started = monotonic_ns()
    try:
        async with asyncio.timeout(job.setup_timeout_s), asyncio.TaskGroup() as group:
            for n in range(len(job.client_ids)):
                group.create_task(open_one(n), name=f"loadgen[idle].connect-{n}")
    except TimeoutError:
        failures.append("timed out opening the connections")
    reports.put(
        Report(
            job.name,
            "ready",
            {
                "connected": len(streams),
                "failed": len(job.client_ids) - len(streams),
                "errors": sorted(set(failures))[:5],
                "connect_s": (monotonic_ns() - started) / 1e9,
            },
        )
    )
    await asyncio.to_thread(go.wait, job.setup_timeout_s)
    await asyncio.to_thread(stop.wait, job.run_timeout_s)
    # The broker closing an idle client would show as end of stream.
    alive = sum(not reader.at_eof() for reader, _ in streams)
    for _, writer in streams:
        with contextlib.suppress(OSError):
            writer.write(b"\xe0\x00")  # DISCONNECT
            writer.close()
    reports.put(Report(job.name, "done", {"alive_at_end": alive}))
