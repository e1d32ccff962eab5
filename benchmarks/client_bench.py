"""Client benchmark: end-to-end E2EE messaging (encrypt, broker, decrypt) on meshchat and Mosquitto.

Usage::

    .venv/bin/python benchmarks/client_bench.py [--quick] [--json PATH] [--no-pin]

Two measurements, each through meshchat's site broker (`meshchat.server.SiteServer`, the
directory's authentication and topic ACL on) and through Mosquitto, side by side as ratios:

1. end-to-end latency at a paced 500 msg/s, one sender to one receiver: p50 and p99 against the
   budget p99 <= 5 ms (DESIGN.md section 8);
2. end-to-end throughput from 10 senders to one group of 50 receivers: messages decrypted per
   second at the receivers.

Every device is a `meshchat.e2ee.DeviceSession` with real keys, on meshchat's `Transport` (the
client library's MQTT layer) and again on raw paho-mqtt, which shows what the transport costs.
A last row is the load generator's own ceiling: the same E2EE work with no broker and no
network. Rosters and key records are signed by the benchmark and handed to every session on
every broker alike (Mosquitto runs no directory service); distributions and messages go
through the broker. See ``benchmarks/README.md``.
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
from typing import TYPE_CHECKING, Any, Final

from brokers import BROKERS, BrokerSpec, BrokerUnavailableError, temporary_workdir
from clientload import TEXT_LEN
from clientruns import QUICK, RUNS, Context, Params, ceiling
from loadgen import raise_fd_limit
from rich.console import Console
from rich.table import Table
from scenarios import Measurement

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from clientload import Stack

DEFAULT_JSON: Final = Path(__file__).resolve().parent / "results" / "client.json"
BROKER_KEYS: Final = ("meshchat", "mosquitto")
"""The columns: meshchat's site broker (auth + ACL) and Mosquitto, from `brokers.BROKERS`."""
LATENCY_BUDGET_MS: Final = 5.0
"""DESIGN.md section 8: end-to-end latency at 500 msg/s, p99 <= 5 ms."""

STACKS: Final[dict[Stack, str]] = {"transport": "Transport", "paho": "raw paho"}


@dataclass(frozen=True, slots=True)
class Row:
    """One metric in the table.

    Attributes:
        key: the metric.
        label: the row's label for a run's parameters.
        digits: decimals shown.
        throughput: higher is better, and the cells show the broker's and the clients' CPU.
        budget_ms: the latency budget of the meshchat cell, if any.
        run: the name of the run that measured it, when that run measured other rows too.
    """

    key: str
    label: Callable[[Params], str]
    digits: int
    throughput: bool = False
    budget_ms: float | None = None
    run: Callable[[Params], str] | None = None


def _latency_label(pct: int, stack: Stack) -> Callable[[Params], str]:
    return lambda p: f"latency p{pct} @ {p.latency_rate:.0f} msg/s, {STACKS[stack]} (ms)"


def _latency_run(stack: Stack) -> Callable[[Params], str]:
    return lambda p: f"latency @ {p.latency_rate:.0f} msg/s, {STACKS[stack]}"


def _throughput_label(stack: Stack) -> Callable[[Params], str]:
    return lambda p: (
        f"{p.senders} senders → group of {p.receivers}, {STACKS[stack]} (decrypted msg/s)"
    )


ROWS: Final = (
    Row("latency_p50_transport", _latency_label(50, "transport"), 2, run=_latency_run("transport")),
    Row(
        "latency_p99_transport",
        _latency_label(99, "transport"),
        2,
        budget_ms=LATENCY_BUDGET_MS,
        run=_latency_run("transport"),
    ),
    Row("latency_p50_paho", _latency_label(50, "paho"), 2, run=_latency_run("paho")),
    Row("latency_p99_paho", _latency_label(99, "paho"), 2, run=_latency_run("paho")),
    Row("throughput_transport", _throughput_label("transport"), 0, throughput=True),
    Row("throughput_paho", _throughput_label("paho"), 0, throughput=True),
    Row(
        "ceiling",
        lambda p: (
            f"generator ceiling: E2EE alone, {p.senders} → {p.receivers}, no broker "
            "(decrypted msg/s)"
        ),
        0,
    ),
)

Results = dict[str, dict[str, Measurement]]


# --- running -------------------------------------------------------------------------------------


def _skipped(keys: Sequence[str], why: str) -> dict[str, Measurement]:
    return {key: Measurement(None, failed=True, notes=[why]) for key in keys}


def _repetition(
    spec: BrokerSpec,
    ctx: Context,
    workdir: Path,
    broker_cpus: set[int] | None,
    log: Callable[[str], None],
) -> dict[str, Measurement]:
    """Every run against one fresh broker of `spec`."""
    measured: dict[str, Measurement] = {}
    started = time.monotonic()
    try:
        with spec.start(workdir, ctx.crew) as broker:
            if broker_cpus:
                broker.pin(broker_cpus)
            log(f"{spec.label}: started [dim]({time.monotonic() - started:.1f} s)[/dim]")
            for run in RUNS:
                started = time.monotonic()
                got = run(broker, ctx)
                measured |= got
                summary = ", ".join(
                    f"{key}={_number(m.value, 2)}{' †' if m.notes or m.failed else ''}"
                    for key, m in got.items()
                )
                log(f"{spec.label}: {summary} [dim]({time.monotonic() - started:.1f} s)[/dim]")
    except BrokerUnavailableError as exc:
        for run in RUNS:
            measured |= _skipped(run.keys, str(exc))
    return measured


def _median(runs: Sequence[Measurement]) -> Measurement:
    """The run with the median value; every run's value goes to its detail."""
    ranked = sorted((m for m in runs if m.value is not None), key=lambda m: m.value or 0.0)
    chosen = ranked[(len(ranked) - 1) // 2] if ranked else runs[0]
    if len(runs) > 1:
        chosen.detail = chosen.detail | {"runs": [m.value for m in runs]}
        for n, other in enumerate(runs, start=1):
            chosen.timed_out = chosen.timed_out or other.timed_out
            chosen.failed = chosen.failed or other.failed
            if other is not chosen:
                chosen.notes += [f"run {n}: {note}" for note in other.notes]
    return chosen


def _run(
    ctx: Context,
    specs: Sequence[BrokerSpec],
    *,
    workdir: Path,
    broker_cpus: set[int] | None,
    console: Console,
) -> Results:
    """Every repetition: the ceiling, then each broker in turn, every run against it."""
    clock = time.monotonic()

    def log(text: str) -> None:
        console.print(f"[dim]{time.monotonic() - clock:6.1f}s[/dim] {text}", highlight=False)

    params = ctx.params
    ceilings: list[Measurement] = []
    runs: dict[str, dict[str, list[Measurement]]] = {}
    for rep in range(params.repeats):
        if rep and time.monotonic() - clock > params.budget_s:
            log(f"[yellow]over the {params.budget_s:.0f} s budget[/yellow]: no more repetitions")
            break
        # Measured in every repetition, so that it sees the machine as the brokers' runs do.
        ceilings.append(ceiling(ctx))
        log(f"generator ceiling: {_number(ceilings[-1].value, 0)} decrypted msg/s")
        for spec in specs:
            for key, result in _repetition(spec, ctx, workdir, broker_cpus, log).items():
                runs.setdefault(key, {}).setdefault(spec.key, []).append(result)
    results: Results = {
        key: {broker: _median(series) for broker, series in by_broker.items()}
        for key, by_broker in runs.items()
    }
    results["ceiling"] = {"harness": _median(ceilings)}
    return results


# --- the table, the summary and the JSON ---------------------------------------------------------


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _cell(result: Measurement | None, row: Row) -> str:
    if result is None:
        return "—"
    text = _number(result.value, row.digits)
    if result.timed_out or result.failed or result.notes:
        text += " †"
    clients = result.detail.get("clients_cpu")
    if row.throughput and result.broker_cpu is not None and clients is not None:
        text += f" [dim](broker {result.broker_cpu:.0%}, clients {clients:.0%})[/dim]"
    return text


def _paired(results: Results, key: str) -> list[float]:
    """The ratio meshchat / Mosquitto per repetition: the two ran back to back in each."""
    top = results.get(key, {}).get("meshchat")
    bottom = results.get(key, {}).get("mosquitto")
    if top is None or bottom is None:
        return []
    tops = top.detail.get("runs", [top.value])
    bottoms = bottom.detail.get("runs", [bottom.value])
    return [a / b for a, b in zip(tops, bottoms, strict=False) if a is not None and b]


def _ratio(results: Results, key: str) -> float | None:
    paired = _paired(results, key)
    return statistics.median(paired) if paired else None


def _verdict(results: Results, row: Row, *, judge: bool) -> dict[str, Any] | None:
    """The budget of `row` on the meshchat cell, for the table, the summary and the JSON."""
    if row.budget_ms is None:
        return None
    result = results.get(row.key, {}).get("meshchat")
    value = None if result is None else result.value
    passed = None if not judge or value is None else value <= row.budget_ms
    runs = [] if result is None else result.detail.get("runs", [value])
    return {
        "broker": "meshchat",
        "value": value,
        "at_most": row.budget_ms,
        "passed": passed,
        "runs": runs,
    }


def _budget_cell(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return ""
    text = f"≤ {verdict['at_most']:g} ms (meshchat)"
    match verdict["passed"]:
        case True:
            return text + " [green]✓ pass[/green]"
        case False:
            return text + " [red]✗ FAIL[/red]"
    return text + " [dim](not judged)[/dim]"


def _table(results: Results, specs: Sequence[BrokerSpec], params: Params, *, judge: bool) -> Table:
    table = Table(
        title="meshchat client benchmark: end to end (encrypt → broker → decrypt), QoS 1",
        title_justify="left",
        caption=(
            "Every device: a DeviceSession (real keys) on its own MQTT connection, Transport or "
            "raw paho. The same clients, keys and topics on both brokers; rosters and key "
            "records handed to the sessions directly (Mosquitto runs no directory service), "
            "distributions and messages through the broker. meshchat = `meshchat up`'s site "
            "server: auth + ACL, and its directory, archiver and geofence services in the same "
            "process (every group message is archived); Mosquitto: anonymous, nothing else."
        ),
        caption_justify="left",
    )
    table.add_column("metric")
    for spec in specs:
        table.add_column(spec.label, justify="right")
    table.add_column("ratio meshchat/mosquitto", justify="right")
    table.add_column("budget", justify="right")
    for row in ROWS:
        if row.key in {"throughput_transport", "ceiling"}:
            table.add_section()
        if row.key == "ceiling":
            result = results.get("ceiling", {}).get("harness")
            cells = [_number(None if result is None else result.value, 0)]
            cells += ["[dim](no broker)[/dim]"] * (len(specs) - 1)
            table.add_row(row.label(params), *cells, "", "")
            continue
        cells = [_cell(results.get(row.key, {}).get(s.key), row) for s in specs]
        ratio = _ratio(results, row.key)
        cells.append("—" if ratio is None else f"{ratio:.2f}x")
        cells.append(_budget_cell(_verdict(results, row, judge=judge)))
        table.add_row(row.label(params), *cells)
    return table


def _notes(results: Results, specs: Sequence[BrokerSpec], params: Params) -> list[str]:
    labels = {s.key: s.label for s in specs}
    lines: list[str] = []
    for row in ROWS:
        for key, result in results.get(row.key, {}).items():
            flags = [
                f for f, on in (("timed out", result.timed_out), ("failed", result.failed)) if on
            ]
            if flags or result.notes:
                name = (row.run or row.label)(params)
                line = f"† {name} [{labels.get(key, key)}]: {'; '.join(flags + result.notes)}"
                if line not in lines:  # p50 and p99 of one run share their notes
                    lines.append(line)
    return lines


def _summary(results: Results, params: Params, *, judge: bool) -> list[str]:
    """The budget, what the transport costs, and who limited the throughput."""
    lines = []
    for row in ROWS:
        verdict = _verdict(results, row, judge=judge)
        if verdict is None:
            continue
        head = f"budget: {row.label(params)} ≤ {verdict['at_most']:g} on meshchat:"
        runs = ", ".join(_number(v, 2) for v in verdict["runs"])
        if verdict["value"] is None:
            lines.append(f"{head} not measured")
        elif verdict["passed"] is None:
            lines.append(f"{head} {verdict['value']:.2f} ms, not judged: --quick is a smoke test")
        else:
            met = "met" if verdict["passed"] else "MISSED"
            lines.append(f"{head} {met}, {verdict['value']:.2f} ms (runs: {runs})")
    for broker in BROKER_KEYS:
        transport = results.get("throughput_transport", {}).get(broker)
        paho = results.get("throughput_paho", {}).get(broker)
        p50t = results.get("latency_p50_transport", {}).get(broker)
        p50p = results.get("latency_p50_paho", {}).get(broker)
        if transport and paho and transport.value and paho.value:
            extra = ""
            if p50t and p50p and p50t.value is not None and p50p.value is not None:
                extra = f"; latency p50 {p50t.value - p50p.value:+.2f} ms"
            lines.append(
                f"Transport against raw paho on {broker}: throughput "
                f"{transport.value / paho.value:.2f}x{extra}"
            )
    ceiling_result = results.get("ceiling", {}).get("harness")
    for key in ("throughput_transport", "throughput_paho"):
        for broker, result in results.get(key, {}).items():
            if result.value is not None:
                lines.append(f"{key} on {broker}: {_bound(result, ceiling_result)}")
    return lines


def _bound(result: Measurement, ceiling_result: Measurement | None) -> str:
    """Who limited a throughput run: the broker, the load generator, or neither."""
    broker = result.broker_cpu
    clients = result.detail.get("clients_cpu")
    busy = result.detail.get("generator_busy")
    others = result.detail.get("others_on_generator")
    shares = [f"broker {_share(broker)}", f"clients {_share(clients)}"]
    if others is not None:
        shares.append(f"other processes {_share(others)} of the load generator's core")
    if result.value is not None and ceiling_result is not None and ceiling_result.value:
        shares.append(f"{result.value / ceiling_result.value:.0%} of the generator ceiling")
    if broker is not None and broker >= 0.9:
        who = "bound by the broker"
    elif busy is not None and busy >= 0.9:
        who = f"bound by the load generator's core (busy {busy:.0%})"
    elif clients is not None and clients >= 0.9:
        who = "bound by the load generator"
    else:
        who = "neither the broker nor the load generator at full CPU"
    return f"{who} ({', '.join(shares)})"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _cpu_plan(pin: bool) -> tuple[set[int], set[int]] | None:
    """(broker cpus, load-generator cpus), or None when not pinning or with a single CPU."""
    if not pin:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


def _machine(specs: Sequence[BrokerSpec], plan: tuple[set[int], set[int]] | None) -> dict[str, Any]:
    packages = {}
    for name in ("amqtt", "aiomqtt", "paho-mqtt", "pynacl", "psutil", "meshchat"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0) | (plan[0] if plan else set())),
        "pinning": {"broker": sorted(plan[0]), "load_generator": sorted(plan[1])} if plan else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "brokers": {s.key: s.version() for s in specs},
        "packages": packages,
    }


def document(
    results: Results,
    ctx: Context,
    *,
    quick: bool,
    machine: dict[str, Any],
    started: datetime,
    seconds: float,
) -> dict[str, Any]:
    """Everything measured, the ratios and the budget, as written to the JSON file."""
    params = ctx.params
    return {
        "benchmark": "client",
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "mode": "quick" if quick else "default",
        "machine": machine,
        "parameters": asdict(params)
        | {
            "text_bytes": TEXT_LEN,
            "qos": 1,
            "clean_session": False,
            "receiver_procs": ctx.receiver_procs,
            "sender_procs": 1,
            "stacks": {
                "transport": "meshchat.client.Transport (aiomqtt), one asyncio loop per process",
                "paho": "paho-mqtt driven by loadgen's selector pool, TCP_NODELAY",
            },
            "clock": "CLOCK_MONOTONIC, send time taken before encrypt, receive after decrypt",
        },
        "metrics": {row.key: row.label(params) for row in ROWS},
        "results": {
            key: {broker: asdict(result) for broker, result in by_broker.items()}
            for key, by_broker in results.items()
        },
        "ratios": {
            row.key: {"meshchat/mosquitto": _ratio(results, row.key)}
            for row in ROWS
            if _paired(results, row.key)
        },
        "budgets": {
            row.key: verdict
            for row in ROWS
            if (verdict := _verdict(results, row, judge=not quick)) is not None
        },
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write JSON ({DEFAULT_JSON})"
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not give the broker a core of its own (the load generator gets the others)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every run on every broker, print the table, write the JSON."""
    args = _parse(argv)
    # SIGTERM unwinds like Ctrl-C, through the finally blocks that stop brokers and workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    params = QUICK if args.quick else Params()
    # Piped output would wrap the table at 80 columns; a log file is read wide.
    console = Console(width=None if sys.stdout.isatty() else 200)
    raise_fd_limit()
    plan = _cpu_plan(args.pin)
    if plan is not None:
        # Workers (and the in-process ceiling) run here; the broker gets the remaining core.
        os.sched_setaffinity(0, plan[1])
    specs = [spec for spec in BROKERS if spec.key in BROKER_KEYS]
    machine = _machine(specs, plan)
    ctx = Context.new(params, plan)
    started = datetime.now(UTC)
    clock = time.monotonic()
    try:
        with temporary_workdir() as workdir:
            results = _run(
                ctx,
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
        "(broker N%, clients M%): CPU time over the measured phase, 100% = one core. "
        + (
            f"The broker has core {sorted(plan[0])} to itself, the clients {sorted(plan[1])}. "
            if plan
            else "Not pinned (--no-pin): the broker and the clients share every core. "
        )
        + "Clients near 100% with the broker well below: the number is the load generator's, "
        f"and the broker could do more. Group messages/s = decrypted msg/s ÷ {params.receivers}."
        f"\n† see the notes above. Total {seconds:.0f} s.",
        style="dim",
        highlight=False,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            document(
                results, ctx, quick=args.quick, machine=machine, started=started, seconds=seconds
            ),
            indent=2,
        )
        + "\n"
    )
    console.print(f"wrote {args.json}", style="dim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
