"""Broker benchmark: meshchat's embedded broker side by side with Mosquitto, in one run.

Usage::

    .venv/bin/python benchmarks/broker_bench.py [--quick] [--json PATH] [--scenario NAME] [--no-pin]

Every scenario runs against a fresh broker of each kind, started by this script on a free
loopback port and stopped when the scenario ends: fan-in (10 publishers to 1 wildcard
subscriber, QoS 0 and QoS 1), fan-out (1 publisher to 100 subscribers), latency at a paced
500 msg/s, the broker's resident set with 1,000 idle clients, and the load generator's own
ceiling (publish only, nobody subscribed). The table has one row per metric and the ratio
embedded/Mosquitto; the JSON keeps the raw numbers. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brokers import BROKERS, BrokerSpec, BrokerUnavailableError, temporary_workdir
from loadgen import raise_fd_limit
from rich.console import Console
from rich.table import Table
from scenarios import QUICK, Measurement, Params, ceiling, fan_in, fan_out, idle_rss, latency

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from brokers import RunningBroker

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "broker.json"
REFERENCE = "mosquitto"
"""The broker every other column is divided by in the ratio columns."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """A group of metrics measured together against one fresh broker."""

    name: str
    metrics: tuple[str, ...]
    run: Callable[[RunningBroker, Params], dict[str, Measurement]]
    repeat: bool = False
    """Repeat `Params.repeats` times and report the median: throughput and tail latency vary
    from run to run on a shared machine."""


@dataclass(frozen=True, slots=True)
class Row:
    """How one metric appears in the table."""

    key: str
    label: Callable[[Params], str]
    digits: int
    throughput: bool = False


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "fan-in QoS 0",
        ("fanin_qos0",),
        lambda b, p: {"fanin_qos0": fan_in(b, p, 0)},
        repeat=True,
    ),
    Scenario(
        "fan-in QoS 1",
        ("fanin_qos1",),
        lambda b, p: {"fanin_qos1": fan_in(b, p, 1)},
        repeat=True,
    ),
    Scenario("fan-out", ("fanout_qos0",), lambda b, p: {"fanout_qos0": fan_out(b, p)}, repeat=True),
    Scenario("latency", ("latency_p50", "latency_p99"), latency, repeat=True),
    Scenario("idle clients", ("rss_idle", "rss_clients", "rss_per_client"), idle_rss),
    Scenario(
        "generator ceiling",
        ("ceiling_qos0",),
        lambda b, p: {"ceiling_qos0": ceiling(b, p)},
        repeat=True,
    ),
)

ROWS: tuple[Row, ...] = (
    Row(
        "fanin_qos0",
        lambda p: f"fan-in QoS 0, {p.publishers} pub → 1 sub (msg/s)",
        0,
        throughput=True,
    ),
    Row(
        "fanin_qos1",
        lambda p: f"fan-in QoS 1, {p.publishers} pub → 1 sub (msg/s)",
        0,
        throughput=True,
    ),
    Row(
        "fanout_qos0",
        lambda p: f"fan-out QoS 0, 1 pub → {p.fanout_subscribers} sub (deliveries/s)",
        0,
        throughput=True,
    ),
    Row("latency_p50", lambda p: f"latency p50 @ {p.latency_rate:.0f} msg/s (ms)", 2),
    Row("latency_p99", lambda p: f"latency p99 @ {p.latency_rate:.0f} msg/s (ms)", 2),
    Row("rss_idle", lambda _: "broker RSS, no clients (MiB)", 1),
    Row("rss_clients", lambda p: f"broker RSS, {p.idle_clients:,} idle clients (MiB)", 1),
    Row("rss_per_client", lambda _: "RSS per idle client (KiB)", 1),
    Row(
        "ceiling_qos0",
        lambda p: f"generator ceiling: QoS 0 publish only, {p.publishers} pub (msg/s)",
        0,
        throughput=True,
    ),
)

Results = dict[str, dict[str, Measurement]]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write JSON ({DEFAULT_JSON})"
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[s.name for s in SCENARIOS],
        help="run only this scenario (repeatable); the default runs all of them",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not give the broker a core of its own (the load generator gets the others)",
    )
    return parser.parse_args(argv)


def _cpu_plan(pin: bool) -> tuple[set[int], set[int]] | None:
    """(broker cpus, load-generator cpus), or None when not pinning or with a single CPU."""
    if not pin:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


def _measure(
    scenario: Scenario,
    spec: BrokerSpec,
    params: Params,
    workdir: Path,
    broker_cpus: set[int] | None,
) -> dict[str, Measurement]:
    try:
        with spec.start(workdir) as broker:
            if broker_cpus:
                broker.pin(broker_cpus)
            return scenario.run(broker, params)
    except BrokerUnavailableError as exc:
        return _skipped(scenario, str(exc))


def _median(runs: Sequence[dict[str, Measurement]]) -> dict[str, Measurement]:
    """Per metric, the run with the median value; the others' values go to its detail."""
    combined: dict[str, Measurement] = {}
    for key in runs[0]:
        series = [run[key] for run in runs if key in run]
        ranked = sorted((m for m in series if m.value is not None), key=lambda m: m.value or 0.0)
        chosen = ranked[(len(ranked) - 1) // 2] if ranked else series[0]
        if len(series) > 1:
            chosen.detail = chosen.detail | {"runs": [m.value for m in series]}
            for n, other in enumerate(series, start=1):
                chosen.timed_out = chosen.timed_out or other.timed_out
                chosen.failed = chosen.failed or other.failed
                if other is not chosen:
                    chosen.notes += [f"run {n}: {note}" for note in other.notes]
        combined[key] = chosen
    return combined


def _skipped(scenario: Scenario, why: str) -> dict[str, Measurement]:
    return {key: Measurement(None, failed=True, notes=[why]) for key in scenario.metrics}


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _cell(result: Measurement | None, row: Row) -> str:
    if result is None:
        return "—"
    text = _number(result.value, row.digits)
    if result.timed_out or result.failed or result.notes:
        text += " †"
    if row.throughput and result.broker_cpu is not None:
        text += f" [dim](cpu {result.broker_cpu:.0%})[/dim]"
    return text


def _ratio(numerator: Measurement | None, denominator: Measurement | None, digits: int) -> str:
    if numerator is None or denominator is None:
        return "—"
    if numerator.value is None or not denominator.value:
        return "—"
    return f"{numerator.value / denominator.value:.{max(digits, 2)}f}x"


def _table(results: Results, specs: Sequence[BrokerSpec], params: Params) -> Table:
    others = [s for s in specs if s.key != REFERENCE]
    reference = next((s for s in specs if s.key == REFERENCE), None)
    table = Table(title="meshchat broker benchmark", title_justify="left")
    table.add_column("metric")
    for spec in specs:
        table.add_column(spec.label, justify="right")
    if reference is not None:
        for spec in others:
            table.add_column(f"ratio {spec.key}/{reference.key}", justify="right")
    for row in ROWS:
        if row.key == "ceiling_qos0":
            table.add_section()
        cells = [_cell(results.get(row.key, {}).get(s.key), row) for s in specs]
        if reference is not None:
            ref = results.get(row.key, {}).get(reference.key)
            cells += [_ratio(results.get(row.key, {}).get(s.key), ref, 2) for s in others]
        table.add_row(row.label(params), *cells)
    return table


def _notes(results: Results, specs: Sequence[BrokerSpec], params: Params) -> list[str]:
    labels = {s.key: s.label for s in specs}
    lines = []
    for row in ROWS:
        for key, result in results.get(row.key, {}).items():
            flags = [
                f for f, on in (("timed out", result.timed_out), ("failed", result.failed)) if on
            ]
            if flags or result.notes:
                text = "; ".join(flags + result.notes)
                lines.append(f"† {row.label(params)} [{labels.get(key, key)}]: {text}")
    return lines


def _machine(specs: Sequence[BrokerSpec], plan: tuple[set[int], set[int]] | None) -> dict[str, Any]:
    versions = {s.key: s.version() for s in specs}
    packages = {}
    for name in ("amqtt", "paho-mqtt", "psutil", "meshchat"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0) | (plan[0] if plan else set())),
        "pinning": {"broker": sorted(plan[0]), "load_generator": sorted(plan[1])} if plan else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "brokers": versions,
        "packages": packages,
    }


def _write_json(
    path: Path,
    results: Results,
    specs: Sequence[BrokerSpec],
    params: Params,
    *,
    quick: bool,
    machine: dict[str, Any],
    started: datetime,
    seconds: float,
) -> None:
    ratios: dict[str, dict[str, float | None]] = {}
    for row in ROWS:
        ref = results.get(row.key, {}).get(REFERENCE)
        for spec in specs:
            mine = results.get(row.key, {}).get(spec.key)
            if spec.key == REFERENCE or mine is None or ref is None:
                continue
            ok = mine.value is not None and bool(ref.value)
            value = mine.value / ref.value if ok else None  # type: ignore[operator]  # ok checks
            ratios.setdefault(row.key, {})[f"{spec.key}/{REFERENCE}"] = value
    document = {
        "benchmark": "broker",
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "mode": "quick" if quick else "default",
        "machine": machine,
        "parameters": asdict(params),
        "metrics": {row.key: row.label(params) for row in ROWS},
        "results": {
            key: {broker: asdict(result) for broker, result in by_broker.items()}
            for key, by_broker in results.items()
        },
        "ratios": ratios,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def _run(
    args: argparse.Namespace,
    params: Params,
    specs: Sequence[BrokerSpec],
    *,
    workdir: Path,
    broker_cpus: set[int] | None,
    console: Console,
) -> Results:
    """Every chosen scenario against every broker, interleaved so that neighbours compare."""
    clock = time.monotonic()
    results: Results = {}
    for scenario in [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]:
        runs: dict[str, list[dict[str, Measurement]]] = {spec.key: [] for spec in specs}
        for rep in range(params.repeats if scenario.repeat else 1):
            if time.monotonic() - clock > params.budget_s:
                console.print(f"[yellow]over the {params.budget_s:.0f} s budget[/yellow]: skipped")
                if rep == 0:
                    for spec in specs:
                        runs[spec.key].append(_skipped(scenario, "skipped: over the time budget"))
                break
            for spec in specs:
                t0 = time.monotonic()
                measured = _measure(scenario, spec, params, workdir, broker_cpus)
                runs[spec.key].append(measured)
                summary = ", ".join(
                    f"{key}={_number(m.value, 2)}{' †' if m.notes or m.failed else ''}"
                    for key, m in measured.items()
                )
                console.print(
                    f"[dim]{time.monotonic() - clock:6.1f}s[/dim] {scenario.name} on "
                    f"{spec.label}: {summary} [dim]({time.monotonic() - t0:.1f} s)[/dim]",
                    highlight=False,
                )
        for spec in specs:
            for key, result in _median(runs[spec.key]).items():
                results.setdefault(key, {})[spec.key] = result
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run every scenario against every broker, print the table, write the JSON."""
    args = _parse(argv)
    # SIGTERM unwinds like Ctrl-C, through the finally blocks that stop brokers and workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    params = QUICK if args.quick else Params()
    # Piped output would wrap the table at 80 columns; a log file is read wide.
    console = Console(width=None if sys.stdout.isatty() else 150)
    raise_fd_limit()
    plan = _cpu_plan(args.pin)
    if plan is not None:
        # Workers inherit this; the broker gets the remaining core once it runs.
        os.sched_setaffinity(0, plan[1])
    specs = BROKERS
    machine = _machine(specs, plan)
    started = datetime.now(UTC)
    clock = time.monotonic()
    try:
        with temporary_workdir() as workdir:
            results = _run(
                args,
                params,
                specs,
                workdir=Path(workdir),
                broker_cpus=plan[0] if plan else None,
                console=console,
            )
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: every broker and worker has been stopped")
        return 130
    seconds = time.monotonic() - clock
    console.print()
    console.print(_table(results, specs, params))
    for line in _notes(results, specs, params):
        console.print(line, highlight=False, markup=False)
    console.print(
        "(cpu N%): broker CPU time over the measured phase; 100% = one core, the limit of both "
        "brokers. Far below it, the load generator is the bottleneck.\n"
        f"generator ceiling: the {REFERENCE} cell is how fast the load generator can publish; "
        "the other cells are each broker's ingest rate under the same load.\n"
        f"† see the notes above. Total {seconds:.0f} s.",
        style="dim",
        highlight=False,
    )
    _write_json(
        args.json,
        results,
        specs,
        params,
        quick=args.quick,
        machine=machine,
        started=started,
        seconds=seconds,
    )
    console.print(f"wrote {args.json}", style="dim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
