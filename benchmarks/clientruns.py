"""The client benchmark's runs, from the parent: start workers, hand out keys, release, measure.

A run takes a running broker and the `Params`, spawns `clientload` workers (senders in one
process, receivers in one per core of the load generator), waits until every one is connected
(``ready``) and holds the group's keys (``warm``), records the start time, sets ``go`` and
collects the reports, all against hard deadlines, as the broker benchmark's scenarios do. It
returns `scenarios.Measurement`s keyed by metric; a run that missed a deadline or lost workers
still returns what it measured, flagged, with notes saying what happened.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Self

import psutil
from clientkeys import E2EEOrg
from clientload import ClientJob, client_main, e2ee_ceiling
from harness import CpuSampler, Workers, _main_not_rerun
from loadgen import monotonic_ns
from roster import ORG, Roster
from scenarios import Measurement

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType

    from brokers import RunningBroker
    from clientkeys import KeyMaterial
    from clientload import Stack
    from loadgen import Report

__all__ = [
    "QUICK",
    "RUNS",
    "ClientWorkers",
    "Context",
    "CoreSampler",
    "Params",
    "Run",
    "ceiling",
    "latency",
    "throughput",
]

_GRACE_S: Final = 5.0
_CONTENDED: Final = 0.10
"""Above this share of the broker's core, or of the load generator's, used by other processes
(the machine may be shared), a number is flagged."""


@dataclass(frozen=True, slots=True)
class Params:
    """Sizes and deadlines of one run (``--quick`` uses `QUICK`).

    Attributes:
        senders: sending devices of the throughput run.
        receivers: receiving devices of the throughput run, all in one group with the senders.
        throughput_count: messages each sender sends in the throughput run.
        window: unacknowledged QoS 1 messages a client may have in flight.
        latency_rate: paced send rate of the latency run, messages per second.
        latency_count: messages of the latency run.
        latency_warmup: first messages left out of the latency percentiles.
        ceiling_count: messages per sender of the no-broker ceiling.
        setup_timeout_s: deadline to connect, subscribe and hand out the keys, per run.
        run_timeout_s: deadline of the measured phase, per run.
        drain_idle_s: once the senders are done, how long receivers wait for stragglers.
        repeats: repetitions; the table shows the median run of each metric.
        budget_s: no new repetition starts after this many seconds.
    """

    senders: int = 10
    receivers: int = 50
    throughput_count: int = 100
    window: int = 20
    latency_rate: float = 500.0
    latency_count: int = 1_500
    latency_warmup: int = 150
    ceiling_count: int = 20
    setup_timeout_s: float = 30.0
    run_timeout_s: float = 60.0
    drain_idle_s: float = 2.0
    repeats: int = 3
    budget_s: float = 200.0


QUICK: Final = Params(
    throughput_count=10,
    latency_count=300,
    latency_warmup=50,
    ceiling_count=10,
    setup_timeout_s=15.0,
    run_timeout_s=20.0,
    drain_idle_s=1.0,
    repeats=1,
    budget_s=25.0,
)


class ClientWorkers(Workers):
    """The broker benchmark's `Workers`, running `clientload` jobs, with a ``warm`` signal."""

    def __init__(self) -> None:
        """Prepare the reports queue and the ``go``, ``warm`` and ``stop`` events."""
        super().__init__()
        self.warm = self._ctx.Event()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Release workers still waiting for ``warm``, then stop them all."""
        self.warm.set()
        super().__exit__(exc_type, exc, traceback)

    def spawn_client(self, job: ClientJob) -> str:
        """Start a worker process for `job`; returns its name."""
        proc = self._ctx.Process(
            target=client_main,
            args=(job, self.reports, self.go, self.warm, self.stop),
            name=f"clientload-{job.name}",
            daemon=True,
        )
        with _main_not_rerun():
            proc.start()
        self._procs[job.name] = proc
        return job.name


@dataclass(frozen=True, slots=True)
class Context:
    """What every run of one benchmark shares."""

    params: Params
    crew: Roster
    org: E2EEOrg
    receiver_procs: int
    generator_cpus: frozenset[int] | None
    """The load generator's own CPUs when the broker is pinned elsewhere, else None."""

    @classmethod
    def new(cls, params: Params, plan: tuple[set[int], set[int]] | None) -> Self:
        """The broker benchmark's roster, sized for twice the receivers (one set per stack)."""
        crew = Roster(
            publishers=params.senders, fanout_subscribers=2 * params.receivers, idle_clients=0
        )
        cpus = plan[1] if plan else os.sched_getaffinity(0)
        procs = max(1, min(len(cpus), 4))
        return cls(params, crew, E2EEOrg(ORG), procs, frozenset(plan[1]) if plan else None)


class CoreSampler:
    """The busy time of the load generator's CPUs over a window, whoever used them.

    What the clients did not use of it went to other processes (the machine is shared): a
    load generator whose cores are busy is the limit, however little of them it got itself.
    """

    def __init__(self, cpus: frozenset[int] | None) -> None:
        """Watch `cpus` (None: watch nothing)."""
        self._cpus = sorted(cpus) if cpus else []
        self._start: tuple[int, float, float] | None = None

    def _busy(self) -> tuple[int, float, float]:
        """(now, busy seconds of the CPUs, CPU seconds of this process)."""
        times = psutil.cpu_times(percpu=True)
        busy = sum(times[c].user + times[c].nice + times[c].system for c in self._cpus)
        own = psutil.Process().cpu_times()
        return monotonic_ns(), busy, own.user + own.system

    def start(self) -> None:
        """Begin the window."""
        if self._cpus:
            self._start = self._busy()

    def stop(self, clients_cpu_s: float) -> tuple[float, float] | None:
        """(busy share of the CPUs, share other processes used) since `start`, in cores."""
        if self._start is None:
            return None
        now, busy, own = self._busy()
        seconds = (now - self._start[0]) / 1e9
        if seconds <= 0:
            return None
        ours = clients_cpu_s + own - self._start[2]
        used = (busy - self._start[1]) / seconds
        return used, max(0.0, used - ours / seconds)


@dataclass(slots=True)
class _Flow:
    """What one run of senders and receivers reported."""

    go_ns: int
    setup_s: float
    senders: dict[str, Report]
    receivers: dict[str, Report]
    cpu: CpuSampler
    generator: tuple[float, float] | None
    """Busy share of the load generator's cores over the run, and the part other processes
    used (in cores), when the broker is pinned."""

    def sum(self, reports: dict[str, Report], key: str) -> int:
        return sum(int(r.data[key]) for r in reports.values())

    def last_ns(self) -> int:
        return max((int(r.data["last_ns"]) for r in self.receivers.values()), default=self.go_ns)

    def sent_ns(self) -> int:
        return max((int(r.data["end_ns"]) for r in self.senders.values()), default=self.go_ns)

    def clients_cpu_s(self) -> float:
        reports = [*self.senders.values(), *self.receivers.values()]
        return sum(float(r.data["cpu_s"]) for r in reports)

    def timed_out(self) -> bool:
        return any(r.data["timed_out"] for r in [*self.senders.values(), *self.receivers.values()])


def _flag(result: Measurement, workers: Workers) -> None:
    for name, error in sorted(workers.errors.items()):
        result.failed = True
        result.notes.append(f"{name}: {error}")


def _split(items: Sequence[str], parts: int) -> list[tuple[str, ...]]:
    """`items` in at most `parts` nearly equal, non-empty slices."""
    parts = max(1, min(parts, len(items)))
    return [tuple(items[i::parts]) for i in range(parts)]


def _flow(
    broker: RunningBroker,
    ctx: Context,
    *,
    stack: Stack,
    group_topic: str,
    senders: Sequence[str],
    receivers: Sequence[str],
    count: int,
    rate: float,
    latency: bool,
    result: Measurement,
) -> _Flow | None:
    """Run senders against receivers through `broker`; None when they could not start."""
    params, org = ctx.params, ctx.org
    members = [*senders, *receivers]
    send_keys = org.keys(group_topic, members, members)
    receive_keys: KeyMaterial = dataclasses.replace(
        send_keys, records=tuple((name, org.record(name)) for name in senders)
    )

    def job(name: str, role: Literal["send", "receive"], ids: tuple[str, ...]) -> ClientJob:
        return ClientJob(
            name=name,
            role=role,
            stack=stack,
            host=broker.host,
            port=broker.port,
            keys=send_keys if role == "send" else receive_keys,
            devices=tuple(org.device(i) for i in ids),
            logins=broker.logins_of(ids),
            senders=len(senders),
            count=count,
            rate=rate,
            window=params.window,
            latency=latency,
            drain_idle_s=params.drain_idle_s,
            setup_timeout_s=params.setup_timeout_s,
            run_timeout_s=params.run_timeout_s,
        )

    spawned_ns = monotonic_ns()
    with ClientWorkers() as workers, CpuSampler(broker) as cpu:
        receive_names = [
            workers.spawn_client(job(f"recv{i}", "receive", ids))
            for i, ids in enumerate(_split(receivers, ctx.receiver_procs))
        ]
        send_names = [workers.spawn_client(job("send", "send", tuple(senders)))]
        names = [*receive_names, *send_names]
        for phase in ("ready", "warm"):
            workers.collect(phase, names, params.setup_timeout_s + _GRACE_S)
            if phase == "ready":
                workers.warm.set()
            if workers.errors:
                _flag(result, workers)
                return None
        cores = CoreSampler(ctx.generator_cpus)
        cores.start()
        go_ns = workers.start()
        sent = workers.collect("done", send_names, params.run_timeout_s + _GRACE_S)
        workers.stop.set()
        # Receivers may still work through a backlog; they stop at their own deadline.
        left_s = params.run_timeout_s - (monotonic_ns() - go_ns) / 1e9
        read = workers.collect(
            "done", receive_names, max(left_s, params.drain_idle_s) + 2 * _GRACE_S
        )
        used = cores.stop(sum(float(r.data["cpu_s"]) for r in [*sent.values(), *read.values()]))
        _flag(result, workers)
        return _Flow(go_ns, (go_ns - spawned_ns) / 1e9, sent, read, cpu, used)


def _common(flow: _Flow, result: Measurement, *, planned: int, end_ns: int) -> None:
    """What every run reports: CPU shares, contention, shortfalls, problems."""
    seconds = (end_ns - flow.go_ns) / 1e9
    sent, received = flow.sum(flow.senders, "sent"), flow.sum(flow.receivers, "received")
    expected = flow.sum(flow.receivers, "expected") * sent // planned if planned else 0
    result.timed_out = result.timed_out or flow.timed_out()
    result.broker_cpu = flow.cpu.share(flow.go_ns, end_ns)
    others = flow.cpu.others(flow.go_ns, end_ns)
    clients = flow.clients_cpu_s() / seconds if seconds > 0 else None
    generator_busy, generator_others = flow.generator or (None, None)
    contended = [
        f"{share:.0%} of the {whose}"
        for share, whose in ((others, "broker's core"), (generator_others, "load generator's"))
        if share is not None and share > _CONTENDED
    ]
    if contended:
        result.notes.append(f"other processes used {' and '.join(contended)}: not reliable")
    if sent < planned:
        result.notes.append(f"sent {sent} of {planned} messages before the deadline")
    if received < expected:
        result.notes.append(f"{expected - received} of {expected} decrypted messages missing")
    problems: dict[str, int] = {}
    for report in flow.receivers.values():
        for kind, n in report.data["problems"].items():
            problems[kind] = problems.get(kind, 0) + n
        result.notes.extend(report.data["notes"][:2])
    if problems:
        result.notes.append(f"events other than messages read: {problems}")
    result.detail |= {
        "sent": sent,
        "decrypted": received,
        "expected": expected,
        "seconds": seconds,
        "send_rate_per_s": _rate(sent, flow.go_ns, flow.sent_ns()),
        "setup_s": flow.setup_s,
        "clients_cpu": clients,
        "others_on_broker_core": others,
        "generator_busy": generator_busy,
        "others_on_generator": generator_others,
        "problems": problems,
    }


def _rate(count: int, start_ns: int, end_ns: int) -> float | None:
    return count / ((end_ns - start_ns) / 1e9) if count and end_ns > start_ns else None


def _percentile(ordered: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    return float(ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)])


def latency(broker: RunningBroker, ctx: Context, stack: Stack) -> dict[str, Measurement]:
    """One sender paced at `Params.latency_rate`, one receiver: p50 and p99 in ms."""
    params, crew = ctx.params, ctx.crew
    # Each stack has its own receiver: a persistent session never meets the other's leftovers.
    receiver = crew.latency_subscriber if stack == "transport" else crew.fanin_subscriber
    base = Measurement(None, detail={"stack": stack})
    flow = _flow(
        broker,
        ctx,
        stack=stack,
        group_topic=crew.latency_topic,
        senders=(crew.latency_publisher,),
        receivers=(receiver,),
        count=params.latency_count,
        rate=params.latency_rate,
        latency=True,
        result=base,
    )
    keys = (f"latency_p50_{stack}", f"latency_p99_{stack}")
    if flow is None:
        return {key: dataclasses.replace(base, notes=list(base.notes)) for key in keys}
    _common(flow, base, planned=params.latency_count, end_ns=flow.last_ns())
    samples = [s for r in flow.receivers.values() for s in r.data["latencies_ns"]]
    kept = sorted(samples[params.latency_warmup :])
    base.detail |= {
        "rate_target_per_s": params.latency_rate,
        "warmup_dropped": min(params.latency_warmup, len(samples)),
    }
    if kept:
        base.detail |= {f"p{p}_ms": _percentile(kept, p) / 1e6 for p in (50, 90, 99, 99.9)}
        base.detail |= {"max_ms": kept[-1] / 1e6, "mean_ms": sum(kept) / len(kept) / 1e6}
    results = {}
    for key, pct in zip(keys, (50, 99), strict=True):
        value = _percentile(kept, pct) / 1e6 if kept else None
        results[key] = dataclasses.replace(
            base, value=value, notes=list(base.notes), detail=dict(base.detail)
        )
    return results


def throughput(broker: RunningBroker, ctx: Context, stack: Stack) -> dict[str, Measurement]:
    """`Params.senders` flat out to one group of `Params.receivers`: decrypted messages/s."""
    params, crew = ctx.params, ctx.crew
    offset = 0 if stack == "transport" else params.receivers
    receivers = crew.fanout_subscriber_ids()[offset : offset + params.receivers]
    result = Measurement(None, detail={"stack": stack, "per_sender": params.throughput_count})
    flow = _flow(
        broker,
        ctx,
        stack=stack,
        group_topic=crew.fanout_topic,
        senders=crew.publisher_ids()[: params.senders],
        receivers=receivers,
        count=params.throughput_count,
        rate=0.0,
        latency=False,
        result=result,
    )
    if flow is not None:
        last = flow.last_ns()
        _common(flow, result, planned=params.senders * params.throughput_count, end_ns=last)
        result.value = _rate(flow.sum(flow.receivers, "received"), flow.go_ns, last)
        if result.value is not None:
            result.detail["group_msg_per_s"] = result.value / params.receivers
    return {f"throughput_{stack}": result}


@dataclass(frozen=True, slots=True)
class Run:
    """One measurement against a running broker, with one client stack.

    Attributes:
        stack: the client stack.
        keys: the metrics it returns.
        measure: what it does.
    """

    stack: Stack
    keys: tuple[str, ...]
    measure: Callable[[RunningBroker, Context, Stack], dict[str, Measurement]]

    def __call__(self, broker: RunningBroker, ctx: Context) -> dict[str, Measurement]:
        """Measure against `broker`."""
        return self.measure(broker, ctx, self.stack)


RUNS: Final = (
    Run("transport", ("latency_p50_transport", "latency_p99_transport"), latency),
    Run("paho", ("latency_p50_paho", "latency_p99_paho"), latency),
    Run("transport", ("throughput_transport",), throughput),
    Run("paho", ("throughput_paho",), throughput),
)
"""In this order against each broker: latency, then throughput; Transport, then raw paho."""


def ceiling(ctx: Context) -> Measurement:
    """The clients' E2EE work alone, in this process (on the load generator's cores)."""
    params = ctx.params
    got = e2ee_ceiling(
        ctx.org, ctx.crew.fanout_topic, params.senders, params.receivers, params.ceiling_count
    )
    return Measurement(
        got["decrypted"] / got["seconds"],
        detail=got | {"cpu_share": got["cpu_s"] / got["seconds"]},
    )
