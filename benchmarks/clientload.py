"""The client benchmark's load: E2EE devices on an MQTT client, in worker processes.

A worker holds some devices of one group, all senders or all receivers. Each device is a
`meshchat.e2ee.DeviceSession` on its own MQTT connection, through one of two stacks:

* ``transport``: meshchat's `meshchat.client.Transport` (aiomqtt; QoS 1, persistent session,
  an outbox with a window of unacknowledged messages), all devices of a worker on one asyncio
  loop. This is the message path of `meshchat.client.Client` without its SQLite store and
  without the directory service (see ``benchmarks/README.md``).
* ``paho``: raw paho-mqtt clients, QoS 1 and persistent sessions too, driven from one selector
  per process by the broker benchmark's `loadgen` pool, with TCP_NODELAY. The same sessions
  and the same work per message: the difference to ``transport`` is what the transport costs.

A worker follows the broker benchmark's protocol with one step more, for the keys:

1. connect every client, subscribe each receiver to its inbox and to the group: ``ready``;
2. on ``warm``, each sender sends one message, which carries its chain's distribution to every
   other member's inbox; a receiver is warm once it has read one message of every sender:
   ``warm``;
3. on ``go``, senders send their messages, flat out behind a window of unacknowledged
   messages or paced at a rate; receivers read them until all have arrived (or, once the parent
   says ``stop``, nothing has arrived for a while): ``done``.

Rosters and key records are signed with real keys by `clientkeys.E2EEOrg` (as ``tests/e2ee/org.py``
does: root, directory and identity keys) and handed to every session directly, on every broker
alike; distributions and messages go through the broker. Every text is 20 bytes: the latency
run's carry their send time (``CLOCK_MONOTONIC``, taken just before encrypting), which the
receiver subtracts from the time it finished decrypting.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal

from loadgen import Login, Report, _Pool, monotonic_ns, raise_fd_limit

from meshchat.client import Transport, TransportState
from meshchat.e2ee import Decrypted, DeviceSession, Event, Inner, Kind, Outgoing, Waiting
from meshchat.topics import GroupTopic, InboxTopic, parse_topic

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event as ProcessEvent

    import paho.mqtt.client as mqtt
    from clientkeys import Device, E2EEOrg, KeyMaterial
    from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "TEXT_LEN",
    "ClientJob",
    "Stack",
    "client_main",
    "e2ee_ceiling",
]

TEXT_LEN: Final = 20
"""Bytes of every text: the size of DESIGN.md's byte budget (envelope <= 125 B)."""
WARM: Final = "warm".ljust(TEXT_LEN, "-")
_POLL_S: Final = 0.01
_NOTES: Final = 5

Stack = Literal["transport", "paho"]
Role = Literal["send", "receive"]

# --- jobs ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientJob:
    """The devices of one worker process and what they do.

    Attributes:
        name: the worker's name in reports.
        role: ``send`` or ``receive``.
        stack: ``transport`` (meshchat's Transport) or ``paho`` (raw paho-mqtt).
        host: the broker's address.
        port: the broker's port.
        keys: trust, roster and key records for every session.
        devices: one MQTT client and one session each; the client id is the device name.
        logins: the credentials of each device, in order; empty for an anonymous broker.
        senders: the group's senders: a receiver is warm once it read a message of each.
        count: messages each sender sends once ``go`` is set.
        rate: messages per second per sender; 0 sends flat out behind `window`.
        window: unacknowledged QoS 1 messages a client may have in flight.
        latency: receivers record each message's latency from the send time in its text.
        drain_idle_s: after ``stop``, receivers end when nothing arrived for this long.
        setup_timeout_s: the longest wait for connections, keys and the parent's signals.
        run_timeout_s: the hard deadline of the measured phase, counted from ``go``.
    """

    name: str
    role: Role
    stack: Stack
    host: str
    port: int
    keys: KeyMaterial
    devices: tuple[Device, ...]
    logins: tuple[Login, ...]
    senders: int
    count: int
    rate: float = 0.0
    window: int = 20
    latency: bool = False
    drain_idle_s: float = 2.0
    setup_timeout_s: float = 30.0
    run_timeout_s: float = 60.0

    def expected(self) -> int:
        """Messages the worker's receivers should read in the measured phase, together."""
        return self.senders * self.count * len(self.devices) if self.role == "receive" else 0


class _WorkerError(Exception):
    """A worker cannot go on; the message says why."""


@dataclass(slots=True)
class _Tally:
    """What the receivers of one process have read."""

    readers: int
    expected: int
    latency: bool
    warm: int = 0
    received: int = 0
    first_ns: int = 0
    last_ns: int = 0
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    problems: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def read(self, text: str) -> None:
        now = monotonic_ns()
        if self.latency:
            self.latencies_ns.append(now - int(text))
        if not self.received:
            self.first_ns = now
        self.received += 1
        self.last_ns = now

    def problem(self, event: Event) -> None:
        kind = type(event).__name__
        self.problems[kind] += 1
        if len(self.notes) < _NOTES:
            self.notes.append(f"{kind}: {event}")

    def report(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "expected": self.expected,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "latencies_ns": self.latencies_ns.tolist(),
            "problems": dict(self.problems),
            "notes": self.notes,
        }


@dataclass(slots=True)
class _Reader:
    """One receiving device: what arrives goes to its session, as `Client` dispatches it."""

    session: DeviceSession
    tally: _Tally
    senders: int
    warm: int = 0

    def handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Feed one incoming message to the session; returns what the session wants sent."""
        match parse_topic(topic):
            case InboxTopic():
                step = self.session.on_inbox(payload)
            case GroupTopic():
                step = self.session.on_group_message(topic, payload)
            case _:
                return []
        for event in step.events:
            match event:
                case Decrypted(inner=Inner(fields=(str(text), *_))) if text == WARM:
                    self.warm += 1
                    if self.warm == self.senders:
                        self.tally.warm += 1
                case Decrypted(inner=Inner(fields=(str(text), *_))):
                    self.tally.read(text)
                case Waiting():
                    pass  # read when its key arrives (after a rotation, the message may lead)
                case _:
                    self.tally.problem(event)
        return step.outgoing


def _encrypt(session: DeviceSession, group_topic: str, text: str) -> list[Outgoing]:
    now = time.time()
    return session.encrypt(group_topic, Inner(Kind.TEXT, int(now), (text,)), now=now)


def _text(seq: int, *, latency: bool) -> str:
    """The send time (latency runs) or the sequence number, in `TEXT_LEN` digits."""
    return f"{monotonic_ns() if latency else seq:0{TEXT_LEN}d}"


def _done(
    tally: _Tally, start_ns: int, deadline_ns: int, drain_idle_s: float, stop: ProcessEvent
) -> tuple[bool, bool]:
    """(finished, timed out) for the receivers of a process."""
    if tally.received >= tally.expected:
        return True, False
    now = monotonic_ns()
    if now > deadline_ns:
        return True, True
    idle_ns = now - max(tally.last_ns, start_ns)
    return stop.is_set() and idle_ns > drain_idle_s * 1e9, False


# --- the worker ----------------------------------------------------------------------------------


def client_main(
    job: ClientJob,
    reports: Queue[Report],
    go: ProcessEvent,
    warm: ProcessEvent,
    stop: ProcessEvent,
) -> None:
    """Entry point of a worker process: run `job`, report errors instead of raising them.

    Args:
        job: what to do.
        reports: where ``ready``, ``warm``, ``done`` and ``error`` reports go.
        go: set by the parent when every worker is warm: the measured phase starts.
        warm: set by the parent when every worker is ready: senders send their first message.
        stop: set by the parent when the senders are done (or the scenario is over).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    try:
        if job.stack == "transport":
            asyncio.run(_TransportWorker(job, reports, go, warm, stop).run())
        else:
            _PahoWorker(job, reports, go, warm, stop).run()
    except Exception as exc:  # noqa: BLE001  # any failure must reach the parent as a report
        while isinstance(exc, ExceptionGroup):
            exc = exc.exceptions[0]
        reports.put(Report(job.name, "error", {"error": f"{type(exc).__name__}: {exc}"}))


def _phase(name: str, kind: str, data: dict[str, Any] | None = None) -> Report:
    # Workers files a report under any kind; loadgen's Literal names only its own three.
    return Report(name, kind, data or {})  # type: ignore[arg-type]


class _Worker:
    """What both stacks share: the job, the parent's signals and the sessions."""

    def __init__(
        self,
        job: ClientJob,
        reports: Queue[Report],
        go: ProcessEvent,
        warm: ProcessEvent,
        stop: ProcessEvent,
    ) -> None:
        self.job = job
        self.reports = reports
        self.go = go
        self.warm = warm
        self.stop = stop
        self.sessions = job.keys.sessions(job.devices)
        self.tally = _Tally(len(job.devices), job.expected(), job.latency)
        self.readers = [_Reader(s, self.tally, job.senders) for s in self.sessions]
        self.setup_deadline_ns = monotonic_ns() + int(job.setup_timeout_s * 1e9)
        if job.logins and len(job.logins) != len(job.devices):
            raise _WorkerError(f"{len(job.logins)} logins for {len(job.devices)} devices")

    def remaining_s(self) -> float:
        return max(0.0, (self.setup_deadline_ns - monotonic_ns()) / 1e9)

    def login(self, n: int) -> Login | None:
        return self.job.logins[n] if self.job.logins else None

    def inbox(self, n: int) -> str:
        return InboxTopic(self.sessions[n].org, self.job.devices[n].name).topic

    def sent_report(self, sent: int, start_ns: int, cpu_s: float, *, timed_out: bool) -> Report:
        return _phase(
            self.job.name,
            "done",
            {
                "sent": sent,
                "start_ns": start_ns,
                "end_ns": monotonic_ns(),
                "cpu_s": time.process_time() - cpu_s,
                "timed_out": timed_out,
            },
        )

    def read_report(self, cpu_s: float, *, timed_out: bool) -> Report:
        data = self.tally.report() | {
            "cpu_s": time.process_time() - cpu_s,
            "timed_out": timed_out,
        }
        return _phase(self.job.name, "done", data)


class _TransportWorker(_Worker):
    """Devices on meshchat's `Transport`, on one asyncio loop."""

    async def run(self) -> None:
        job = self.job
        url = f"mqtt://{job.host}:{job.port}"
        sent_events = [asyncio.Event() for _ in job.devices]
        async with contextlib.AsyncExitStack() as stack:
            transports: list[Transport] = []
            for n, device in enumerate(job.devices):
                login = self.login(n)
                transport = Transport(
                    url,
                    client_id=device.name,
                    username=login.username if login else None,
                    password=login.password if login else None,
                    window=job.window,
                    # Room for every message of the run: a full inbox leaves messages
                    # unacknowledged until the next connection.
                    max_incoming=job.expected() + 10_000,
                    on_sent=partial(_set, sent_events[n]),
                )
                transports.append(await stack.enter_async_context(transport))
            async with asyncio.timeout(self.remaining_s()):
                for transport in transports:
                    await transport.wait_state(TransportState.CONNECTED)
            if job.role == "send":
                await self._send(transports, sent_events)
                return
            async with asyncio.TaskGroup() as tasks:
                consumers = []
                for n, transport in enumerate(transports):
                    await transport.subscribe(self.inbox(n))
                    await transport.subscribe(job.keys.group_topic)
                    consumers.append(
                        tasks.create_task(
                            self._consume(transport, self.readers[n]),
                            name=f"bench[client].consume-{n}",
                        )
                    )
                await self._receive()
                for task in consumers:  # they read until cancelled
                    task.cancel()

    @staticmethod
    async def _consume(transport: Transport, reader: _Reader) -> None:
        async for message in transport.messages():
            for item in reader.handle(message.topic, message.payload):
                transport.publish_nowait(item.topic, item.payload, retain=item.retain)

    async def _wait(self, event: ProcessEvent, what: str) -> None:
        if not await asyncio.to_thread(event.wait, self.remaining_s()):
            raise _WorkerError(f"timed out waiting for {what}")

    async def _receive(self) -> None:
        job = self.job
        self.reports.put(_phase(job.name, "ready"))
        await self._wait(self.warm, "warm")
        while self.tally.warm < self.tally.readers:
            if monotonic_ns() > self.setup_deadline_ns:
                raise _WorkerError(
                    f"{self.tally.readers - self.tally.warm} receivers got no keys in time"
                )
            await asyncio.sleep(_POLL_S)
        self.reports.put(_phase(job.name, "warm"))
        await self._wait(self.go, "go")
        cpu = time.process_time()
        start = monotonic_ns()
        deadline = start + int(job.run_timeout_s * 1e9)
        while True:
            finished, timed_out = _done(self.tally, start, deadline, job.drain_idle_s, self.stop)
            if finished:
                break
            await asyncio.sleep(_POLL_S)
        self.reports.put(self.read_report(cpu, timed_out=timed_out))

    async def _send(self, transports: Sequence[Transport], sent: Sequence[asyncio.Event]) -> None:
        job = self.job
        self.reports.put(_phase(job.name, "ready"))
        await self._wait(self.warm, "warm")
        for transport, session in zip(transports, self.sessions, strict=True):
            for item in _encrypt(session, job.keys.group_topic, WARM):
                transport.publish_nowait(item.topic, item.payload, retain=item.retain)
        async with asyncio.timeout(self.remaining_s()):
            for transport, event in zip(transports, sent, strict=True):
                await _drained(transport, event, 0)
        self.reports.put(_phase(job.name, "warm"))
        await self._wait(self.go, "go")
        cpu = time.process_time()
        start = monotonic_ns()
        counts = [0] * len(transports)
        timed_out = False
        try:
            async with asyncio.timeout(job.run_timeout_s), asyncio.TaskGroup() as tasks:
                for n, transport in enumerate(transports):
                    tasks.create_task(
                        self._send_one(n, transport, sent[n], start, counts),
                        name=f"bench[client].send-{n}",
                    )
        except TimeoutError:
            timed_out = True
        self.reports.put(self.sent_report(sum(counts), start, cpu, timed_out=timed_out))

    async def _send_one(
        self, n: int, transport: Transport, sent: asyncio.Event, start_ns: int, counts: list[int]
    ) -> None:
        job = self.job
        period_ns = 1e9 / job.rate if job.rate > 0 else 0.0
        for seq in range(job.count):
            if period_ns:
                delay = (start_ns + seq * period_ns - monotonic_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
            await _drained(transport, sent, job.window - 1)
            for item in _encrypt(
                self.sessions[n], job.keys.group_topic, _text(seq, latency=job.latency)
            ):
                transport.publish_nowait(item.topic, item.payload, retain=item.retain)
            counts[n] += 1
        await _drained(transport, sent, 0)


def _set(event: asyncio.Event, _message_id: int) -> None:
    event.set()


async def _drained(transport: Transport, sent: asyncio.Event, at_most: int) -> None:
    """Wait until at most `at_most` messages of `transport` wait for the broker's PUBACK."""
    while transport.queued > at_most:
        sent.clear()
        await sent.wait()


class _PahoWorker(_Worker):
    """Devices on raw paho-mqtt clients, driven from one selector."""

    def __init__(
        self,
        job: ClientJob,
        reports: Queue[Report],
        go: ProcessEvent,
        warm: ProcessEvent,
        stop: ProcessEvent,
    ) -> None:
        super().__init__(job, reports, go, warm, stop)
        self.pool = _Pool(job.host, job.port)
        self.published = [0] * len(job.devices)
        self.acked: dict[mqtt.Client, int] = {}
        self.subacks = 0
        self.denied: list[str] = []

    def run(self) -> None:
        job = self.job
        try:
            self.pool.connect(
                [d.name for d in job.devices],
                self.setup_deadline_ns,
                inflight=job.window,
                logins=job.logins,
                clean_session=False,
            )
            for n, client in enumerate(self.pool.clients):
                self.acked[client] = 0
                client.on_publish = self._on_publish
                if job.role == "receive":
                    client.on_message = partial(self._on_message, self.readers[n])
                    client.on_subscribe = self._on_subscribe
                    client.subscribe([(self.inbox(n), 1), (job.keys.group_topic, 1)])
            if job.role == "receive":
                self._until(lambda: self.subacks >= len(self.pool.clients), "SUBACK")
                if self.denied:
                    raise _WorkerError(f"the broker refused the subscription {self.denied[0]}")
            self.reports.put(_phase(job.name, "ready"))
            self._wait(self.warm, "warm")
            if job.role == "receive":
                self._until(lambda: self.tally.warm >= self.tally.readers, "keys")
                self.reports.put(_phase(job.name, "warm"))
                self._wait(self.go, "go")
                self.reports.put(self._receive())
            else:
                for n, session in enumerate(self.sessions):
                    self._publish(n, _encrypt(session, job.keys.group_topic, WARM))
                self._until(self._all_acked, "PUBACK")
                self.reports.put(_phase(job.name, "warm"))
                self._wait(self.go, "go")
                self.reports.put(self._send())
        finally:
            self.pool.close()

    def _wait(self, event: ProcessEvent, what: str) -> None:
        if not event.wait(self.remaining_s()):
            raise _WorkerError(f"timed out waiting for {what}")

    def _until(self, condition: Callable[[], bool], what: str) -> None:
        if not self.pool.pump_until(condition, self.setup_deadline_ns, what):
            raise _WorkerError(f"timed out waiting for {what}")

    def _all_acked(self) -> bool:
        return all(self.acked[c] >= self.published[n] for n, c in enumerate(self.pool.clients))

    def _publish(self, n: int, items: Sequence[Outgoing]) -> None:
        client = self.pool.clients[n]
        for item in items:
            client.publish(item.topic, item.payload, 1, item.retain)
            self.published[n] += 1

    def _on_publish(
        self, client: mqtt.Client, _userdata: object, _mid: int, _rc: object, _props: object
    ) -> None:
        self.acked[client] += 1
        self.pool.progress += 1

    def _on_subscribe(
        self,
        client: mqtt.Client,
        _userdata: object,
        _mid: int,
        reasons: list[ReasonCode],
        _properties: object,
    ) -> None:
        self.subacks += 1
        if any(reason.is_failure for reason in reasons):
            self.denied.append(f"of {self.pool.client_id(client)}")

    def _on_message(
        self, reader: _Reader, client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage
    ) -> None:
        # paho types the payload as bytes | bytearray; it hands out bytes.
        for item in reader.handle(msg.topic, bytes(msg.payload)):
            client.publish(item.topic, item.payload, 1, item.retain)
        self.pool.progress += 1

    def _receive(self) -> Report:
        job = self.job
        cpu = time.process_time()
        start = monotonic_ns()
        deadline = start + int(job.run_timeout_s * 1e9)
        while True:
            finished, timed_out = _done(self.tally, start, deadline, job.drain_idle_s, self.stop)
            if finished:
                break
            self.pool.pump(0.05)
            if self.pool.lost:
                raise _WorkerError(f"lost the connection of {self.pool.lost[0]} while reading")
        return self.read_report(cpu, timed_out=timed_out)

    def _send(self) -> Report:
        job = self.job
        pool = self.pool
        cpu = time.process_time()
        start = monotonic_ns()
        deadline = start + int(job.run_timeout_s * 1e9)
        period_ns = int(1e9 / job.rate) if job.rate > 0 else 0
        sent = [0] * len(pool.clients)
        timed_out = False
        while min(sent) < job.count:
            if monotonic_ns() > deadline:
                timed_out = True
                break
            progressed = False
            for n, client in enumerate(pool.clients):
                if sent[n] >= job.count:
                    continue
                if period_ns and monotonic_ns() < start + sent[n] * period_ns:
                    continue
                if self.published[n] - self.acked[client] >= job.window:
                    continue  # backpressure: wait for PUBACKs
                text = _text(sent[n], latency=job.latency)
                self._publish(n, _encrypt(self.sessions[n], job.keys.group_topic, text))
                sent[n] += 1
                progressed = True
            if period_ns:
                due = start + min(sent) * period_ns
                pool.pump(max((due - monotonic_ns()) / 1e9, 0.0005))
            else:
                pool.pump(0 if progressed else 0.05)
            if pool.lost:
                raise _WorkerError(f"lost the connection of {pool.lost[0]} while sending")
        if not timed_out:
            timed_out = not pool.pump_until(self._all_acked, deadline, "PUBACK")
        return self.sent_report(sum(sent), start, cpu, timed_out=timed_out)


# --- the harness's own ceiling -------------------------------------------------------------------


def e2ee_ceiling(
    org: E2EEOrg, group_topic: str, senders: int, receivers: int, count: int
) -> dict[str, float]:
    """The clients' E2EE work alone: `senders` to `receivers` in this process, no network.

    The same sessions and the same per-message code as a worker (encrypt; for every receiver,
    dispatch by topic, verify and decrypt, count), handing each envelope over in memory: what
    the load generator could reach if MQTT cost nothing.

    Returns:
        ``decrypted``, ``seconds`` (wall clock) and ``cpu_s`` (this process) of the timed part.
    """
    send_devices = [org.device(f"ceiling-s{n}") for n in range(senders)]
    receive_devices = [org.device(f"ceiling-r{n}") for n in range(receivers)]
    names = [d.name for d in (*send_devices, *receive_devices)]
    sending = org.keys(group_topic, names, names).sessions(send_devices)
    receiving_keys = org.keys(group_topic, names, [d.name for d in send_devices])
    tally = _Tally(receivers, senders * count * receivers, latency=False)
    readers = {
        InboxTopic(org.org, device.name).topic: _Reader(session, tally, senders)
        for device, session in zip(
            receive_devices, receiving_keys.sessions(receive_devices), strict=True
        )
    }

    def deliver(items: Sequence[Outgoing]) -> None:
        for item in items:
            if item.topic == group_topic:
                for reader in readers.values():
                    reader.handle(item.topic, item.payload)
            elif item.topic in readers:
                readers[item.topic].handle(item.topic, item.payload)

    for session in sending:
        deliver(_encrypt(session, group_topic, WARM))
    if tally.warm != receivers:
        raise RuntimeError("the in-memory warm-up did not hand every receiver its keys")
    cpu = time.process_time()
    start = time.perf_counter()
    for seq in range(count):
        for session in sending:
            deliver(_encrypt(session, group_topic, _text(seq, latency=False)))
    seconds = time.perf_counter() - start
    return {
        "decrypted": tally.received,
        "expected": tally.expected,
        "seconds": seconds,
        "cpu_s": time.process_time() - cpu,
    }
