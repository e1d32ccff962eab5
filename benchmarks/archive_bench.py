"""Archiver benchmark: durable ingest against the budget, history latency and export speed.

Usage::

    .venv/bin/python benchmarks/archive_bench.py [--quick] [--json PATH]

Rows, each measured in this run:

1. durable ingest (envelopes/s): what the archiver does with each message it receives, end to
   end on its side of the socket: classify the envelope (decode, header columns, SHA-256), hand
   it to the one writer thread, commit it (WAL, ``synchronous=NORMAL``: it survives ``kill -9``)
   and call back (where the archiver sends the PUBACK). Budget (DESIGN.md section 8): at least
   20,000/s. Beside it, the reference: a raw SQLite ``executemany`` of the same rows into a bare
   table, with the same batch size, same file settings; the ratio is archiver / raw.
2. ingest through a broker (envelopes/s): the same archiver behind a real `Transport`, fed by a
   publisher `Transport` in this process, on the embedded amqtt broker (in this process, as in
   ``meshchat up``) and on Mosquitto (its own process, ``max_queued_messages`` raised: with
   Mosquitto's default of 1000, a burst overruns the archiver's queue and Mosquitto drops
   messages). Informative: the broker and the MQTT client library bound these, not the archive.
3. history latency (ms): the newest 100 messages of one group, as a ``history`` request asks,
   in an archive of 1,000,000 envelopes over 100 groups; p50 and p99.
4. export (envelopes/s): `meshchat archive export` of one group of the archive above.

Each row runs three times (once with ``--quick``, with smaller counts); the table shows the
median and the JSON has every run. The benchmark always exits 0: it measures, it does not gate.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from brokers import BrokerUnavailableError, start_mosquitto
from rich.console import Console
from rich.table import Table

from meshchat.archive import (
    Archiver,
    ArchiveStore,
    ArchiveWriter,
    ExportHeader,
    classify,
    export_group,
)
from meshchat.broker import BrokerSettings, EmbeddedBroker
from meshchat.client import Backoff, Transport
from meshchat.envelope import GroupMessage, encode

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_JSON: Final = Path(__file__).resolve().parent / "results" / "archive.json"
BUDGET: Final = 20_000.0
ORG: Final = "bench"
TOPIC: Final = "mc/bench/ops/line1"
BATCH: Final = 5000
"""Rows per transaction of the raw reference: the writer's own `MAX_BATCH`."""


@dataclass(frozen=True, slots=True)
class Params:
    """Counts for one run."""

    ingest: int = 200_000
    broker: int = 20_000
    archive: int = 1_000_000
    groups: int = 100
    queries: int = 300
    reps: int = 3


QUICK: Final = Params(ingest=20_000, broker=3_000, archive=100_000, groups=20, queries=50, reps=1)


def envelopes(count: int, chain: int = 1) -> list[bytes]:
    """Group messages the size of a 20-byte text (the DESIGN.md section 8 envelope)."""
    body_len = 4 + 21 + 16  # guard, inner (kind, ts, text), tag
    return [
        encode(GroupMessage(chain, index, os.urandom(body_len), os.urandom(64)))
        for index in range(count)
    ]


async def measure_ingest(path: Path, payloads: list[bytes]) -> float:
    """Envelopes/s: classify, submit, commit and call back, for every payload."""
    done = asyncio.Event()
    left = len(payloads)

    def committed() -> None:
        nonlocal left
        left -= 1
        if not left:
            done.set()

    async with ArchiveWriter(path) as writer:
        started = time.perf_counter()
        for index, payload in enumerate(payloads):
            record = classify(TOPIC, payload, org=ORG, received_at=time.time())
            writer.submit(record, committed)
            if index % 1000 == 999:
                await asyncio.sleep(0)  # let hand-overs and callbacks run, as a live loop does
        await done.wait()
        seconds = time.perf_counter() - started
    return len(payloads) / seconds


def measure_raw(path: Path, payloads: list[bytes]) -> float:
    """Envelopes/s of a bare executemany into a bare table, same batches, same settings."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE raw (id INTEGER PRIMARY KEY, topic TEXT, payload BLOB)")
    started = time.perf_counter()
    for start in range(0, len(payloads), BATCH):
        with conn:
            conn.executemany(
                "INSERT INTO raw (topic, payload) VALUES (?, ?)",
                [(TOPIC, payload) for payload in payloads[start : start + BATCH]],
            )
    seconds = time.perf_counter() - started
    conn.close()
    return len(payloads) / seconds


async def measure_broker(path: Path, payloads: list[bytes]) -> float:
    """Envelopes/s through the embedded broker (in this process, as in ``meshchat up``)."""
    async with EmbeddedBroker(BrokerSettings(port=0)) as broker:
        return await measure_url(broker.listener("mqtt").url, path, payloads)


def measure_mosquitto(workdir: Path, path: Path, payloads: list[bytes]) -> float | None:
    """Envelopes/s through Mosquitto in its own process; None when it is not installed."""
    try:
        with start_mosquitto(workdir, None) as broker:  # type: ignore[arg-type]  # anonymous: no roster
            return asyncio.run(measure_url(f"mqtt://{broker.host}:{broker.port}", path, payloads))
    except BrokerUnavailableError:
        return None


async def measure_url(url: str, path: Path, payloads: list[bytes]) -> float:
    """Envelopes/s from the first publish until the archiver committed the last."""
    fast = Backoff(initial=0.01, maximum=0.2)
    async with Transport(url, client_id="svc.archive.bench", backoff=fast) as link:
        archiver = Archiver(path, link, org=ORG, retention_interval=None)
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(archiver.run(), name="bench[archive].loop")
            await archiver.ready.wait()
            async with Transport(
                url, client_id="bench.pub", max_outbox=len(payloads) + 1, backoff=fast
            ) as publisher:
                started = time.perf_counter()
                for payload in payloads:
                    publisher.publish_nowait(TOPIC, payload)
                await archiver.wait_for(lambda stats: stats.stored >= len(payloads))
                seconds = time.perf_counter() - started
            running.cancel()
    return len(payloads) / seconds


def build_archive(path: Path, params: Params) -> None:
    """An archive of `params.archive` envelopes spread over `params.groups` groups."""
    per_group = params.archive // params.groups
    sample = envelopes(per_group)
    base = time.time() - 86400
    with ArchiveStore(path) as store:
        for group in range(params.groups):
            topic = f"mc/{ORG}/ops/g{group}"
            for start in range(0, per_group, BATCH):
                store.insert(
                    [
                        classify(topic, payload, org=ORG, received_at=base + start + i)
                        for i, payload in enumerate(sample[start : start + BATCH])
                    ]
                )


def measure_history(path: Path, params: Params) -> tuple[float, float]:
    """p50 and p99 (ms) of "the newest 100 messages of one group"."""
    timings: list[float] = []
    with ArchiveStore(path) as store:
        for query in range(params.queries):
            group = f"ops/g{query % params.groups}"
            started = time.perf_counter()
            page = store.history(group, newest_first=True, limit=100)
            timings.append((time.perf_counter() - started) * 1000)
            assert len(page.items) == 100
    timings.sort()
    return statistics.median(timings), timings[int(len(timings) * 0.99) - 1]


def measure_export(path: Path) -> float:
    """Envelopes/s of exporting one group (to memory, as the file system is not measured)."""
    with ArchiveStore(path) as store:
        header = ExportHeader(ORG, "ops/g0", None, None, time.time())
        out = io.StringIO()
        started = time.perf_counter()
        summary = export_group(store, out, header, path=Path("bench.jsonl"))
        seconds = time.perf_counter() - started
    return summary.count / seconds


@dataclass(slots=True)
class Results:
    """Every run of every row."""

    ingest: list[float]
    raw: list[float]
    broker: list[float]
    mosquitto: list[float]
    history_p50: list[float]
    history_p99: list[float]
    export: list[float]


def run(params: Params, workdir: Path, progress: Console) -> Results:
    """Measure every row `params.reps` times."""
    results = Results([], [], [], [], [], [], [])
    payloads = envelopes(params.ingest)
    for rep in range(params.reps):
        progress.print(f"[dim]run {rep + 1}/{params.reps}: ingest of {params.ingest:,}[/dim]")
        results.ingest.append(asyncio.run(measure_ingest(workdir / f"ingest{rep}.db", payloads)))
        results.raw.append(measure_raw(workdir / f"raw{rep}.db", payloads))
        progress.print(f"[dim]run {rep + 1}/{params.reps}: through the broker[/dim]")
        results.broker.append(
            asyncio.run(measure_broker(workdir / f"broker{rep}.db", payloads[: params.broker]))
        )
        mosquitto = measure_mosquitto(workdir, workdir / f"mosq{rep}.db", payloads[: params.broker])
        if mosquitto is not None:
            results.mosquitto.append(mosquitto)
    progress.print(f"[dim]building an archive of {params.archive:,} envelopes[/dim]")
    big = workdir / "big.db"
    build_archive(big, params)
    for _ in range(params.reps):
        p50, p99 = measure_history(big, params)
        results.history_p50.append(p50)
        results.history_p99.append(p99)
        results.export.append(measure_export(big))
    return results


def table(results: Results, params: Params) -> Table:
    """The results, medians, with the budget and the reference ratio."""
    median = statistics.median
    ingest, raw = median(results.ingest), median(results.raw)
    out = Table(title="archiver (median of runs)")
    for column in ("what", "value", "budget", "reference", "ratio"):
        out.add_column(column, justify="left" if column == "what" else "right")
    verdict = "[green]met[/green]" if ingest >= BUDGET else "[red]missed[/red]"
    out.add_row(
        "durable ingest (envelopes/s)",
        f"{ingest:,.0f}",
        f">= {BUDGET:,.0f} {verdict}",
        f"raw SQLite {raw:,.0f}",
        f"{ingest / raw:.2f}",
    )
    out.add_row(
        "  through the embedded broker", f"{median(results.broker):,.0f}", "(broker-bound)", "", ""
    )
    through = f"{median(results.mosquitto):,.0f}" if results.mosquitto else "— (not installed)"
    out.add_row("  through Mosquitto", through, "(client-bound)", "", "")
    out.add_row(
        f"history: newest 100 of {params.archive:,} (ms)",
        f"p50 {median(results.history_p50):.2f} / p99 {median(results.history_p99):.2f}",
        "",
        "",
        "",
    )
    out.add_row("export (envelopes/s)", f"{median(results.export):,.0f}", "", "", "")
    return out


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write JSON ({DEFAULT_JSON})"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, write the JSON."""
    args = _parse(argv)
    params = QUICK if args.quick else Params()
    console = Console(width=None if sys.stdout.isatty() else 150)
    started = datetime.now(UTC)
    clock = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="archive-bench-") as workdir:
        results = run(params, Path(workdir), console)
    seconds = time.monotonic() - clock
    console.print(table(results, params))
    ingest = statistics.median(results.ingest)
    document = {
        "benchmark": "archive",
        "started": started.isoformat(),
        "seconds": seconds,
        "quick": args.quick,
        "params": asdict(params),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "sqlite": sqlite3.sqlite_version,
        "median": {
            "ingest_per_s": ingest,
            "raw_sqlite_per_s": statistics.median(results.raw),
            "ingest_over_raw": ingest / statistics.median(results.raw),
            "broker_ingest_per_s": statistics.median(results.broker),
            "mosquitto_ingest_per_s": (
                statistics.median(results.mosquitto) if results.mosquitto else None
            ),
            "history_p50_ms": statistics.median(results.history_p50),
            "history_p99_ms": statistics.median(results.history_p99),
            "export_per_s": statistics.median(results.export),
        },
        "budgets": {
            "ingest_per_s": {
                "budget": BUDGET,
                "value": ingest,
                "passed": None if args.quick else ingest >= BUDGET,
            }
        },
        "runs": asdict(results),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"Total {seconds:.1f} s. wrote {args.json}", style="dim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
