"""The benchmark's scenarios, run from the parent: start workers, release them, measure.

Each scenario takes a running broker and the `Params`, spawns load-generator processes
(`loadgen.worker_main`), waits until every one is connected, records the start time, sets
``go`` and collects the reports, all against hard deadlines. It returns `Measurement`s keyed by
metric; a scenario that missed a deadline or lost workers still returns what it measured,
flagged `timed_out` or `failed`, with notes saying what happened.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from harness import CpuSampler, Workers
from loadgen import IdleJob, PublishJob, SubscribeJob
from roster import Roster

if TYPE_CHECKING:
    from collections.abc import Sequence

    from brokers import RunningBroker
    from loadgen import Report

__all__ = [
    "QUICK",
    "Measurement",
    "Params",
    "ceiling",
    "fan_in",
    "fan_out",
    "idle_rss",
    "latency",
    "roster",
]

T = TypeVar("T")

_GRACE_S = 5.0
_CONTENDED = 0.10
"""Above this share of the broker's core used by other processes, a number is flagged."""
_CONNECT_CONCURRENCY = 50


@dataclass(frozen=True, slots=True)
class Params:
    """Sizes and deadlines of one run (``--quick`` uses `QUICK`).

    Attributes:
        publishers: publisher clients of the fan-in and ceiling scenarios.
        publisher_procs: processes they are spread over.
        fanin_qos0_count: QoS 0 messages per publisher in fan-in.
        fanin_qos1_count: QoS 1 messages per publisher (fan-in and the durable row).
        ceiling_count: QoS 0 messages per publisher of the generator ceiling.
        inflight: unacknowledged QoS 1 messages allowed per publisher.
        fanout_subscribers: subscribers of the fan-out scenario.
        subscriber_procs: processes they are spread over.
        fanout_count: messages the fan-out publisher sends (each goes to every subscriber).
        latency_rate: paced publish rate of the latency scenario, messages per second.
        latency_count: messages of the latency scenario.
        latency_warmup: first messages left out of the latency percentiles.
        idle_clients: idle connections of the memory scenario.
        idle_procs: processes holding them.
        payload_size: bytes per payload (a meshchat envelope is at most 125 B).
        setup_timeout_s: deadline for connecting and subscribing, per scenario.
        run_timeout_s: deadline of the measured phase, per scenario.
        drain_idle_s: once publishers are done, how long subscribers wait for stragglers.
        settle_s: pause before reading a resident set size.
        repeats: runs of each throughput scenario; the table shows the median.
        budget_s: no new scenario or repetition starts after this many seconds.
    """

    publishers: int = 10
    publisher_procs: int = 2
    fanin_qos0_count: int = 4_000
    fanin_qos1_count: int = 2_000
    ceiling_count: int = 2_000
    inflight: int = 20
    fanout_subscribers: int = 100
    subscriber_procs: int = 4
    fanout_count: int = 800
    latency_rate: float = 500.0
    latency_count: int = 1_500
    latency_warmup: int = 150
    idle_clients: int = 1_000
    idle_procs: int = 2
    payload_size: int = 100
    setup_timeout_s: float = 30.0
    run_timeout_s: float = 30.0
    drain_idle_s: float = 2.0
    settle_s: float = 1.0
    repeats: int = 3
    budget_s: float = 290.0


QUICK = Params(
    fanin_qos0_count=500,
    fanin_qos1_count=200,
    ceiling_count=500,
    fanout_count=100,
    latency_count=500,
    latency_warmup=50,
    idle_clients=300,
    setup_timeout_s=15.0,
    run_timeout_s=15.0,
    drain_idle_s=1.0,
    settle_s=0.3,
    repeats=1,
    budget_s=45.0,
)


@dataclass(slots=True)
class Measurement:
    """One number for one broker, with what a reader needs to trust it.

    Attributes:
        value: the number, or None when nothing could be measured.
        timed_out: a deadline passed; the value covers what was measured until then.
        failed: workers failed (connection refused or lost, ...); see `notes`.
        broker_cpu: the broker's CPU time over the measured phase, as a share of one core;
            near 1.0 a single-threaded broker is the bottleneck.
        notes: what went wrong or looks odd, for the reader.
        detail: raw numbers for the JSON.
    """

    value: float | None
    timed_out: bool = False
    failed: bool = False
    broker_cpu: float | None = None
    notes: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


def roster(params: Params) -> Roster:
    """The clients and topics of a run with `params`."""
    return Roster(
        publishers=params.publishers,
        fanout_subscribers=params.fanout_subscribers,
        idle_clients=params.idle_clients,
    )


def _split(items: Sequence[T], parts: int) -> list[tuple[T, ...]]:
    """`items` in at most `parts` nearly equal, non-empty slices."""
    parts = max(1, min(parts, len(items)))
    return [tuple(items[i::parts]) for i in range(parts)]


def _flag(result: Measurement, workers: Workers) -> None:
    for name, error in sorted(workers.errors.items()):
        result.failed = True
        result.notes.append(f"{name}: {error}")


def _publishers(
    broker: RunningBroker,
    params: Params,
    *,
    client_ids: Sequence[str],
    topics: Sequence[str],
    qos: int,
    count: int,
    procs: int,
    rate: float = 0.0,
) -> list[PublishJob]:
    """Publisher jobs: client `n` publishes to `topics[n]`, clients spread over `procs`."""
    logins = broker.logins_of(tuple(client_ids))
    return [
        PublishJob(
            name=f"pub{i}",
            host=broker.host,
            port=broker.port,
            client_ids=tuple(client_ids[n] for n in chunk),
            topics=tuple(topics[n] for n in chunk),
            fence_topic=Roster.fence_topic,
            qos=qos,
            count=count,
            payload_size=params.payload_size,
            rate=rate,
            inflight=params.inflight,
            logins=tuple(logins[n] for n in chunk) if logins else (),
            setup_timeout_s=params.setup_timeout_s,
            run_timeout_s=params.run_timeout_s,
        )
        for i, chunk in enumerate(_split(range(len(client_ids)), procs))
    ]


def _subscribers(
    broker: RunningBroker,
    params: Params,
    *,
    client_ids: Sequence[str],
    topic_filters: tuple[str, ...],
    qos: int,
    expected: int,
    procs: int,
    latency: bool = False,
    clean_session: bool = True,
) -> list[SubscribeJob]:
    """Subscriber jobs: every client subscribes to every filter, clients spread over `procs`."""
    logins = broker.logins_of(tuple(client_ids))
    return [
        SubscribeJob(
            name=f"sub{i}",
            host=broker.host,
            port=broker.port,
            client_ids=tuple(client_ids[n] for n in chunk),
            topic_filters=topic_filters,
            qos=qos,
            expected=expected,
            latency=latency,
            clean_session=clean_session,
            logins=tuple(logins[n] for n in chunk) if logins else (),
            drain_idle_s=params.drain_idle_s,
            setup_timeout_s=params.setup_timeout_s,
            run_timeout_s=params.run_timeout_s + params.drain_idle_s + _GRACE_S,
        )
        for i, chunk in enumerate(_split(range(len(client_ids)), procs))
    ]


@dataclass(slots=True)
class _Flow:
    """What one publish/subscribe run measured."""

    go_ns: int
    planned: int
    pub: dict[str, Report]
    sub: dict[str, Report]
    cpu: CpuSampler

    def sent(self) -> int:
        return sum(int(r.data["sent"]) for r in self.pub.values())

    def received(self) -> int:
        return sum(int(r.data["received"]) for r in self.sub.values())

    def expected(self) -> int:
        return sum(int(r.data["expected"]) for r in self.sub.values())

    def pub_end_ns(self) -> int:
        return max((int(r.data["end_ns"]) for r in self.pub.values()), default=self.go_ns)

    def last_ns(self) -> int:
        return max((int(r.data["last_ns"]) for r in self.sub.values()), default=self.go_ns)

    def timed_out(self) -> bool:
        return any(r.data["timed_out"] for r in [*self.pub.values(), *self.sub.values()])


def _flow(
    broker: RunningBroker,
    params: Params,
    pubs: Sequence[PublishJob],
    subs: Sequence[SubscribeJob],
    result: Measurement,
) -> _Flow | None:
    """Run publishers against subscribers; None when they could not even start."""
    with Workers() as workers, CpuSampler(broker) as cpu:
        sub_names = [workers.spawn(job) for job in subs]
        pub_names = [workers.spawn(job) for job in pubs]
        workers.collect("ready", [*sub_names, *pub_names], params.setup_timeout_s + _GRACE_S)
        if workers.errors:
            _flag(result, workers)
            return None
        go_ns = workers.start()
        pub = workers.collect("done", pub_names, params.run_timeout_s + _GRACE_S)
        workers.stop.set()
        sub = workers.collect("done", sub_names, params.drain_idle_s + 2 * _GRACE_S)
        _flag(result, workers)
        planned = sum(job.count * len(job.client_ids) for job in pubs)
        return _Flow(go_ns, planned, pub, sub, cpu)


def _contention(flow: _Flow, result: Measurement, end_ns: int) -> None:
    """Flag a number measured while other processes took a share of the broker's core."""
    others = flow.cpu.others(flow.go_ns, end_ns)
    result.detail["others_on_broker_core"] = others
    if others is not None and others > _CONTENDED:
        result.notes.append(
            f"other processes used {others:.0%} of the broker's core meanwhile: not reliable"
        )


def _rate(count: int, start_ns: int, end_ns: int) -> float | None:
    return count / ((end_ns - start_ns) / 1e9) if count and end_ns > start_ns else None


def _shortfall(flow: _Flow, result: Measurement) -> None:
    """Say so when the publishers could not send everything before their deadline."""
    result.timed_out = result.timed_out or flow.timed_out()
    if flow.pub and flow.sent() < flow.planned:
        result.notes.append(f"published {flow.sent()} of {flow.planned} before the deadline")


def _delivery(flow: _Flow, result: Measurement) -> Measurement:
    """Fill `result` with the delivered rate of a publish/subscribe run."""
    received, sent = flow.received(), flow.sent()
    # Each published message should reach this many clients (1 for fan-in).
    copies = flow.expected() // flow.planned if flow.planned else 0
    expected = sent * copies
    last = flow.last_ns()
    result.value = _rate(received, flow.go_ns, last)
    result.broker_cpu = flow.cpu.share(flow.go_ns, last)
    _contention(flow, result, last)
    offered = _rate(sent, flow.go_ns, flow.pub_end_ns())
    _shortfall(flow, result)
    if received < expected:
        lost = expected - received
        result.notes.append(
            f"{lost} of {expected} deliveries of published messages missing ({lost / expected:.1%})"
        )
    elif received > expected:
        result.notes.append(f"{received - expected} duplicate deliveries")
    result.detail |= {
        "planned": flow.planned,
        "sent": sent,
        "delivered": received,
        "expected": expected,
        "seconds": (last - flow.go_ns) / 1e9,
        "publisher_rate_per_s": offered,
    }
    return result


def fan_in(
    broker: RunningBroker, params: Params, qos: int, *, persistent: bool = False
) -> Measurement:
    """Publishers on their own topics, one subscriber of all of them: messages/s delivered.

    With `persistent` the subscriber has a persistent session (clean session 0): the durable
    path of the broker, with the subscriber online.
    """
    crew = roster(params)
    count = params.fanin_qos1_count if qos else params.fanin_qos0_count
    pubs = _publishers(
        broker,
        params,
        client_ids=crew.publisher_ids(),
        topics=crew.fanin_topics(),
        qos=qos,
        count=count,
        procs=params.publisher_procs,
    )
    subscriber = crew.durable_subscriber if persistent else crew.fanin_subscriber
    subs = _subscribers(
        broker,
        params,
        client_ids=(subscriber,),
        topic_filters=crew.fanin_topics(),
        qos=qos,
        expected=params.publishers * count,
        procs=1,
        clean_session=not persistent,
    )
    detail: dict[str, Any] = {"qos": qos, "per_publisher": count}
    if persistent:
        detail["sessions"] = broker.sessions
    result = Measurement(None, detail=detail)
    flow = _flow(broker, params, pubs, subs, result)
    return result if flow is None else _delivery(flow, result)


def fan_out(broker: RunningBroker, params: Params) -> Measurement:
    """One publisher, many subscribers of its topic, QoS 0: deliveries/s."""
    crew = roster(params)
    pubs = _publishers(
        broker,
        params,
        client_ids=crew.publisher_ids()[:1],
        topics=(crew.fanout_topic,),
        qos=0,
        count=params.fanout_count,
        procs=1,
    )
    subs = _subscribers(
        broker,
        params,
        client_ids=crew.fanout_subscriber_ids(),
        topic_filters=(crew.fanout_topic,),
        qos=0,
        expected=params.fanout_count,
        procs=params.subscriber_procs,
    )
    result = Measurement(None, detail={"messages": params.fanout_count})
    flow = _flow(broker, params, pubs, subs, result)
    return result if flow is None else _delivery(flow, result)


def ceiling(broker: RunningBroker, params: Params) -> Measurement:
    """Publishers with nobody subscribed, QoS 0: how fast the generator can push.

    Each publisher ends with a QoS 1 fence and waits for its PUBACK, so the rate counts what the
    broker has read, not what sits in socket buffers.
    """
    crew = roster(params)
    pubs = _publishers(
        broker,
        params,
        client_ids=crew.publisher_ids(),
        topics=crew.fanin_topics(),
        qos=0,
        count=params.ceiling_count,
        procs=params.publisher_procs,
    )
    result = Measurement(None)
    flow = _flow(broker, params, pubs, [], result)
    if flow is None:
        return result
    end = flow.pub_end_ns()
    result.value = _rate(flow.sent(), flow.go_ns, end)
    _shortfall(flow, result)
    result.broker_cpu = flow.cpu.share(flow.go_ns, end)
    _contention(flow, result, end)
    result.detail |= {"sent": flow.sent(), "seconds": (end - flow.go_ns) / 1e9}
    return result


def _percentile(ordered: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    return float(ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)])


def latency(broker: RunningBroker, params: Params) -> dict[str, Measurement]:
    """One publisher paced at `Params.latency_rate`, one subscriber: p50 and p99 in ms."""
    crew = roster(params)
    pubs = _publishers(
        broker,
        params,
        client_ids=(crew.latency_publisher,),
        topics=(crew.latency_topic,),
        qos=0,
        count=params.latency_count,
        procs=1,
        rate=params.latency_rate,
    )
    subs = _subscribers(
        broker,
        params,
        client_ids=(crew.latency_subscriber,),
        topic_filters=(crew.latency_topic,),
        qos=0,
        expected=params.latency_count,
        procs=1,
        latency=True,
    )
    base = Measurement(None)
    flow = _flow(broker, params, pubs, subs, base)
    if flow is None:
        return {key: _copy(base) for key in ("latency_p50", "latency_p99")}
    samples = [s for r in flow.sub.values() for s in r.data["latencies_ns"]]
    kept = sorted(samples[params.latency_warmup :])
    sent = flow.sent()
    _shortfall(flow, base)
    _contention(flow, base, flow.last_ns())
    base.broker_cpu = flow.cpu.share(flow.go_ns, flow.last_ns())
    base.detail |= {
        "rate_target_per_s": params.latency_rate,
        "rate_achieved_per_s": _rate(sent, flow.go_ns, flow.pub_end_ns()),
        "sent": sent,
        "received": len(samples),
        "warmup_dropped": min(params.latency_warmup, len(samples)),
    }
    if kept:
        base.detail |= {f"p{p}_ms": _percentile(kept, p) / 1e6 for p in (50, 90, 99, 99.9)}
        base.detail |= {"max_ms": kept[-1] / 1e6, "mean_ms": sum(kept) / len(kept) / 1e6}
    if len(samples) < sent:
        base.notes.append(f"{sent - len(samples)} of {sent} messages missing")
    results: dict[str, Measurement] = {}
    for key, pct in (("latency_p50", 50), ("latency_p99", 99)):
        results[key] = _copy(base)
        results[key].value = _percentile(kept, pct) / 1e6 if kept else None
    return results


def _copy(result: Measurement) -> Measurement:
    """An independent copy (notes and detail are shared by reference otherwise)."""
    return Measurement(
        result.value,
        timed_out=result.timed_out,
        failed=result.failed,
        broker_cpu=result.broker_cpu,
        notes=list(result.notes),
        detail=dict(result.detail),
    )


def idle_rss(broker: RunningBroker, params: Params) -> dict[str, Measurement]:
    """The broker's resident set before and with `Params.idle_clients` idle connections."""
    time.sleep(params.settle_s)
    before = broker.rss_mib()
    results = {
        "rss_idle": Measurement(before),
        "rss_clients": Measurement(None),
        "rss_per_client": Measurement(None),
    }
    ids = roster(params).idle_ids()
    logins = broker.logins_of(ids)
    with Workers() as workers:
        names = [
            workers.spawn(
                IdleJob(
                    name=f"idle{i}",
                    host=broker.host,
                    port=broker.port,
                    client_ids=tuple(ids[n] for n in chunk),
                    logins=tuple(logins[n] for n in chunk) if logins else (),
                    concurrency=_CONNECT_CONCURRENCY,
                    setup_timeout_s=params.setup_timeout_s,
                    run_timeout_s=params.run_timeout_s,
                )
            )
            for i, chunk in enumerate(_split(range(len(ids)), params.idle_procs))
        ]
        ready = workers.collect("ready", names, params.setup_timeout_s + _GRACE_S)
        connected = sum(int(r.data["connected"]) for r in ready.values())
        connect_s = max((float(r.data["connect_s"]) for r in ready.values()), default=0.0)
        time.sleep(params.settle_s)
        after = broker.rss_mib()
        workers.start()
        workers.stop.set()
        done = workers.collect("done", names, _GRACE_S * 2)
        alive = sum(int(r.data["alive_at_end"]) for r in done.values())
        errors = sorted({e for r in ready.values() for e in r.data["errors"]})
        for result in results.values():
            _flag(result, workers)
    clients = results["rss_clients"]
    clients.value = after
    per_client = results["rss_per_client"]
    per_client.value = (after - before) * 1024 / connected if connected else None
    detail = {
        "clients_wanted": params.idle_clients,
        "clients_connected": connected,
        "clients_alive_at_end": alive,
        "connect_seconds": connect_s,
        "rss_before_mib": before,
        "rss_after_mib": after,
    }
    for result in (clients, per_client):
        result.detail = detail
        if connected < params.idle_clients:
            result.failed = True
            result.notes.append(
                f"only {connected} of {params.idle_clients} clients connected: {'; '.join(errors)}"
            )
    return results
