"""Broker benchmark: meshchat's brokers side by side with raw amqtt and Mosquitto, in one run.

Usage::

    .venv/bin/python benchmarks/broker_bench.py [--quick] [--json PATH] [--scenario NAME] [--no-pin]

The columns: meshchat's embedded broker without authentication, raw amqtt (the reference of
the budget "auth + ACL >= 95% of raw amqtt's throughput", DESIGN.md section 8), meshchat's site
broker with the directory's authentication and topic ACL on, and Mosquitto. Every scenario runs
against a fresh broker of each kind, started by this script on a free loopback port and stopped
when the scenario ends: fan-in (10 publishers to 1 subscriber of their 10 topics, QoS 0 and
QoS 1), the durable path (the same QoS 1 fan-in to a persistent session, on raw amqtt and the
site broker), fan-out (1 publisher to 100 subscribers), latency at a paced 500 msg/s, the
broker's resident set with 1,000 idle clients, and the load generator's own ceiling (publish
only, nobody subscribed). The table has one row per metric, the ratio embedded/Mosquitto and
the ratio auth+ACL/raw amqtt with the budget; the JSON keeps the raw numbers. See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
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
from scenarios import (
    QUICK,
    Measurement,
    Params,
    ceiling,
    fan_in,
    fan_out,
    idle_rss,
    latency,
    roster,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from brokers import RunningBroker

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "broker.json"
REFERENCE = "mosquitto"
"""The JSON's ``ratios`` divide every other broker by this one."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """A group of metrics measured together against one fresh broker."""

    name: str
    metrics: tuple[str, ...]
    run: Callable[[RunningBroker, Params], dict[str, Measurement]]
    repeat: bool = False
    """Repeat `Params.repeats` times and report the median: throughput and tail latency vary
    from run to run on a shared machine."""
    brokers: frozenset[str] | None = None
    """The brokers it runs on (keys); None: all of them."""
    durable: bool = False
    """Start the brokers with their durable session store, where they have one."""


@dataclass(frozen=True, slots=True)
class Row:
    """How one metric appears in the table.

    Attributes:
        key: the metric.
        label: the row's label for a run's parameters.
        digits: decimals shown.
        throughput: higher is better, and the cells show the broker's CPU share.
        budgeted: the budget of a `Ratio` that has one applies to this row.
    """

    key: str
    label: Callable[[Params], str]
    digits: int
    throughput: bool = False
    budgeted: bool = False


@dataclass(frozen=True, slots=True)
class Ratio:
    """A ratio column: one broker's value divided by another's, in every row.

    Attributes:
        numerator: the broker on top (its key).
        denominator: the broker below.
        label: the column header.
        budget: the least ratio the budgeted rows must reach (DESIGN.md section 8), if any.
    """

    numerator: str
    denominator: str
    label: str
    budget: float | None = None

    @property
    def key(self) -> str:
        """The ratio's key in the JSON."""
        return f"{self.numerator}/{self.denominator}"


AUTH_BUDGET = 0.95
"""DESIGN.md section 8: the embedded broker with auth + ACL on reaches 95% of raw amqtt."""
RATIOS: tuple[Ratio, ...] = (
    Ratio("embedded", "mosquitto", "ratio embedded/mosquitto"),
    Ratio("meshchat", "amqtt", f"auth+ACL/raw amqtt (≥ {AUTH_BUDGET:.2f})", AUTH_BUDGET),
)


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
    Scenario(
        "durable",
        ("durable_qos1",),
        lambda b, p: {"durable_qos1": fan_in(b, p, 1, persistent=True)},
        repeat=True,
        brokers=frozenset({"amqtt", "meshchat"}),
        durable=True,
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
        budgeted=True,
    ),
    Row(
        "fanin_qos1",
        lambda p: f"fan-in QoS 1, {p.publishers} pub → 1 sub (msg/s)",
        0,
        throughput=True,
        budgeted=True,
    ),
    Row(
        "durable_qos1",
        lambda p: f"durable QoS 1, {p.publishers} pub → 1 persistent sub (msg/s)",
        0,
        throughput=True,
    ),
    Row(
        "fanout_qos0",
        lambda p: f"fan-out QoS 0, 1 pub → {p.fanout_subscribers} sub (deliveries/s)",
        0,
        throughput=True,
        budgeted=True,
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
        with spec.start(workdir, roster(params), durable=scenario.durable) as broker:
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


def _ratio_value(results: Results, row: Row, ratio: Ratio) -> float | None:
    """`ratio` in `row`: the median of its values repetition by repetition, or None.

    In each repetition the brokers ran one after the other, within a minute, so a slow spell
    of the machine (it is shared, and a virtual machine's host is too) tends to hit both sides
    of a pair; the two brokers' own median runs may come from different repetitions.
    """
    paired = _paired(results, row, ratio)
    return statistics.median(paired) if paired else None


def _ratio_of_medians(results: Results, row: Row, ratio: Ratio) -> float | None:
    """The two cells of `row` divided, or None when either has no value."""
    top = results.get(row.key, {}).get(ratio.numerator)
    bottom = results.get(row.key, {}).get(ratio.denominator)
    if top is None or bottom is None or top.value is None or not bottom.value:
        return None
    return top.value / bottom.value


def _passed(value: float | None, row: Row, ratio: Ratio, *, judge: bool) -> bool | None:
    """Whether a budgeted row meets the ratio's budget.

    None when no budget applies, or when the run is not to be judged (``--quick``).
    """
    if not judge or ratio.budget is None or not row.budgeted or value is None:
        return None
    return value >= ratio.budget


def _ratio_cell(results: Results, row: Row, ratio: Ratio, *, judge: bool) -> str:
    value = _ratio_value(results, row, ratio)
    if value is None:
        return "—"
    text = f"{value:.{max(row.digits, 2)}f}x"
    match _passed(value, row, ratio, judge=judge):
        case True:
            text += " [green]✓ pass[/green]"
        case False:
            text += " [red]✗ FAIL[/red]"
        case None if ratio.budget is not None and row.budgeted:
            text += " [dim](not judged)[/dim]"
        case None if ratio.budget is not None and row.throughput:
            text += " [dim](no budget)[/dim]"
    return text


def _table(results: Results, specs: Sequence[BrokerSpec], params: Params, *, judge: bool) -> Table:
    keys = {s.key for s in specs}
    ratios = [r for r in RATIOS if {r.numerator, r.denominator} <= keys]
    table = Table(title="meshchat broker benchmark", title_justify="left")
    table.add_column("metric")
    for spec in specs:
        table.add_column(spec.label, justify="right")
    for ratio in ratios:
        table.add_column(ratio.label, justify="right")
    for row in ROWS:
        if row.key == "ceiling_qos0":
            table.add_section()
        cells = [_cell(results.get(row.key, {}).get(s.key), row) for s in specs]
        cells += [_ratio_cell(results, row, ratio, judge=judge) for ratio in ratios]
        table.add_row(row.label(params), *cells)
    return table


def _verdicts(results: Results, *, judge: bool) -> dict[str, dict[str, Any]]:
    """Every budgeted row against every ratio with a budget, for the JSON and the summary."""
    verdicts: dict[str, dict[str, Any]] = {}
    for ratio in RATIOS:
        for row in ROWS:
            if ratio.budget is None or not row.budgeted:
                continue
            value = _ratio_value(results, row, ratio)
            verdicts.setdefault(ratio.key, {})[row.key] = {
                "ratio": value,
                "at_least": ratio.budget,
                "passed": _passed(value, row, ratio, judge=judge),
                "paired_ratios": _paired(results, row, ratio),
                "ratio_of_medians": _ratio_of_medians(results, row, ratio),
            }
    return verdicts


def _paired(results: Results, row: Row, ratio: Ratio) -> list[float]:
    """The ratio repetition by repetition: the two brokers ran back to back in each one."""
    top = results.get(row.key, {}).get(ratio.numerator)
    bottom = results.get(row.key, {}).get(ratio.denominator)
    if top is None or bottom is None:
        return []
    tops = top.detail.get("runs", [top.value])
    bottoms = bottom.detail.get("runs", [bottom.value])
    return [a / b for a, b in zip(tops, bottoms, strict=False) if a is not None and b]


def _summary(results: Results, params: Params, *, judge: bool) -> list[str]:
    """One line per budget: met, or which rows missed it and by how much."""
    labels = {row.key: row.label(params) for row in ROWS}
    lines = []
    for ratio in RATIOS:
        rows = _verdicts(results, judge=judge).get(ratio.key, {})
        if ratio.budget is None or not rows:
            continue
        measured = {k: v for k, v in rows.items() if v["ratio"] is not None}
        missed = {k: v for k, v in measured.items() if not v["passed"]}
        head = f"budget {ratio.numerator}/{ratio.denominator} ≥ {ratio.budget:.2f}:"
        if not measured:
            lines.append(f"{head} not measured")
        elif not judge:
            lines.append(f"{head} not judged: --quick measures too briefly (a smoke test)")
        elif not missed:
            lines.append(f"{head} met in all {len(measured)} throughput rows")
        else:
            misses = "; ".join(f"{labels[k]}: {v['ratio']:.2f}x" for k, v in missed.items())
            lines.append(f"{head} MISSED in {len(missed)} of {len(measured)} rows ({misses})")
        for key, verdict in measured.items():
            runs = ", ".join(f"{r:.2f}" for r in verdict["paired_ratios"])
            cells = verdict["ratio_of_medians"]
            lines.append(
                f"  {labels[key]}: repetition by repetition {runs}"
                + (f"; the cells divided {cells:.2f}" if cells is not None else "")
            )
    return lines


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


def _durable_note(results: Results, specs: Sequence[BrokerSpec]) -> str:
    """How each broker of the durable row kept the persistent session."""
    labels = {s.key: s.label for s in specs}
    kept = [
        f"{labels.get(key, key)} {result.detail['sessions']}"
        for key, result in results.get("durable_qos1", {}).items()
        if result.detail.get("sessions")
    ]
    return (
        "durable: a persistent-session subscriber (clean session 0) that stays online; raw amqtt "
        "and auth+ACL only, no budget. Sessions: " + ("; ".join(kept) or "not measured") + "."
    )


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
    pairs = [
        *(Ratio(spec.key, REFERENCE, "") for spec in specs if spec.key != REFERENCE),
        *(r for r in RATIOS if r.denominator != REFERENCE),
    ]
    for row in ROWS:
        for ratio in pairs:
            by_broker = results.get(row.key, {})
            if ratio.numerator in by_broker and ratio.denominator in by_broker:
                ratios.setdefault(row.key, {})[ratio.key] = _ratio_value(results, row, ratio)
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
        "budgets": _verdicts(results, judge=not quick),
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
        chosen = [s for s in specs if scenario.brokers is None or s.key in scenario.brokers]
        runs: dict[str, list[dict[str, Measurement]]] = {spec.key: [] for spec in chosen}
        for rep in range(params.repeats if scenario.repeat else 1):
            if time.monotonic() - clock > params.budget_s:
                console.print(f"[yellow]over the {params.budget_s:.0f} s budget[/yellow]: skipped")
                if rep == 0:
                    for spec in chosen:
                        runs[spec.key].append(_skipped(scenario, "skipped: over the time budget"))
                break
            for spec in chosen:
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
        for spec in chosen:
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
    console = Console(width=None if sys.stdout.isatty() else 220)
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
    console.print(_table(results, specs, params, judge=not args.quick))
    for line in _notes(results, specs, params):
        console.print(line, highlight=False, markup=False)
    for line in _summary(results, params, judge=not args.quick):
        console.print(line, style="bold", highlight=False)
    console.print(
        "(cpu N%): broker CPU time over the measured phase; 100% = one core, the limit of every "
        "broker here. Far below it, the load generator is the bottleneck.\n"
        f"{_durable_note(results, specs)}\n"
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
