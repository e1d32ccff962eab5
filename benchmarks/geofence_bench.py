"""Geofence benchmark: fixes evaluated per second against 10,000 sites, and join latency.

Usage::

    .venv/bin/python benchmarks/geofence_bench.py [--quick] [--json PATH] [--no-e2e]

Two tables:

1. fixes per second of CPU through the state machine (`meshchat.geofence.Tracker`) with 10,000
   sites (90% circles of 50-500 m, 10% eight-corner polygons, spread over 400 x 400 km), for the
   DESIGN.md section 8 budget of 100,000 fixes/s, beside the same state machine scanning every
   site for every fix (a naive all-sites scan, the reference ratio), and OwnTracks JSON parsing
   plus evaluation. 20,000 workers each report every 30 s; 70% of fixes fall within 1.5 radii of
   the worker's own site, 30% anywhere in the region. No MQTT: the budget is for the state
   machine and the index.
2. end to end through a real site server (embedded broker, directory, geofence worker, batching
   set to 0): from publishing the deciding OwnTracks fix to the user's device holding the join
   notice, and to its subscription to the site channel being granted.

CPU time is `time.process_time` of this single process; tables show medians (the JSON has every
run). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.table import Table

from meshchat.geofence import (
    Circle,
    Fix,
    Location,
    Polygon,
    SiteRule,
    Tracker,
    offset,
    parse_payload,
)

DEFAULT_JSON: Final = Path(__file__).resolve().parent / "results" / "geofence.json"
BUDGET_FIXES_PER_S: Final = 100_000.0
CENTRE: Final = (48.137, 11.575)
REGION_M: Final = 200_000.0
"""Sites and stray fixes lie within this many metres of the centre, east-west and north-south."""
T0: Final = 1_767_254_400.0


@dataclass(frozen=True, slots=True)
class Params:
    """How much to measure."""

    sites: int = 10_000
    workers: int = 20_000
    fixes: int = 300_000
    naive_fixes: int = 1_000
    owntracks_fixes: int = 60_000
    reps: int = 5
    naive_reps: int = 3
    e2e_reps: int = 10


QUICK: Final = Params(
    fixes=60_000, naive_fixes=300, owntracks_fixes=10_000, reps=3, naive_reps=1, e2e_reps=3
)


def make_sites(count: int, rnd: random.Random) -> list[SiteRule]:
    """`count` sites: nine circles in ten, the rest eight-corner polygons."""
    sites = []
    for number in range(count):
        lat, lon = offset(
            *CENTRE, rnd.uniform(-REGION_M, REGION_M), rnd.uniform(-REGION_M, REGION_M)
        )
        radius = rnd.uniform(50.0, 500.0)
        if number % 10:
            shape: Circle | Polygon = Circle(lat, lon, radius)
        else:
            corners = tuple(
                offset(lat, lon, r * math.cos(a), r * math.sin(a))
                for a, r in ((k * math.pi / 4, radius * rnd.uniform(0.7, 1.0)) for k in range(8))
            )
            shape = Polygon(corners)
        sites.append(SiteRule(f"site-{number}", shape))
    return sites


def make_fixes(
    params: Params, sites: list[SiteRule], rnd: random.Random
) -> list[tuple[str, str, Fix]]:
    """(subject, owner, fix) in time order: every worker every 30 s."""
    homes = [rnd.randrange(len(sites)) for _ in range(params.workers)]
    fixes = []
    for number in range(params.fixes):
        worker = number % params.workers
        ts = T0 + (number // params.workers) * 30.0 + worker * 30.0 / params.workers
        home = sites[homes[worker]]
        if rnd.random() < 0.7:
            distance, angle = rnd.uniform(0, 1.5 * home.radius_m), rnd.uniform(0, 2 * math.pi)
            lat, lon = offset(
                *home.shape.centre, distance * math.cos(angle), distance * math.sin(angle)
            )
        else:
            lat, lon = offset(
                *CENTRE, rnd.uniform(-REGION_M, REGION_M), rnd.uniform(-REGION_M, REGION_M)
            )
        fixes.append((f"w{worker}", f"u{worker}", Fix(ts, lat, lon, rnd.uniform(5.0, 80.0))))
    return fixes


def _rate(tracker: Tracker, fixes: list[tuple[str, str, Fix]]) -> float:
    observe = tracker.observe
    start = time.process_time()
    for subject, owner, fix in fixes:
        observe(subject, owner, fix)
    return len(fixes) / max(time.process_time() - start, 1e-9)


def measure_evaluation(params: Params) -> dict[str, Any]:
    """Fixes per second: indexed, naive scan, and OwnTracks JSON through the indexed tracker."""
    rnd = random.Random(8)  # noqa: S311  # a reproducible load, not a secret
    sites = make_sites(params.sites, rnd)
    fixes = make_fixes(params, sites, rnd)
    indexed, changes = [], 0
    for _ in range(params.reps):
        tracker = Tracker(sites)
        indexed.append(_rate(tracker, fixes))
        changes = sum(len(u) for u in tracker.membership().values())
    index = Tracker(sites).index
    # The same state machine with every site in one cell: every fix tests all 10,000.
    naive = [
        _rate(Tracker(sites, cell_deg=360.0), fixes[: params.naive_fixes])
        for _ in range(params.naive_reps)
    ]
    payloads = [
        (
            f"owntracks/{owner}/phone",
            json.dumps(
                {"_type": "location", "lat": f.lat, "lon": f.lon, "acc": f.acc, "tst": f.ts}
            ).encode(),
        )
        for _, owner, f in fixes[: params.owntracks_fixes]
    ]
    owntracks = []
    for _ in range(params.reps):
        tracker = Tracker(sites)
        start = time.process_time()
        for topic, payload in payloads:
            message = parse_payload(payload, topic)
            assert isinstance(message, Location)
            assert message.fix is not None
            tracker.observe(topic, message.user, message.fix)
        owntracks.append(len(payloads) / max(time.process_time() - start, 1e-9))
    return {
        "indexed": {"median": statistics.median(indexed), "runs": indexed},
        "naive_scan": {"median": statistics.median(naive), "runs": naive},
        "owntracks_json": {"median": statistics.median(owntracks), "runs": owntracks},
        "grid": {"cells": index.cells, "cell_deg": index.cell_deg},
        "members_at_end": changes,
    }


async def _end_to_end(reps: int) -> dict[str, Any]:
    """Seconds from the deciding fix to the join notice, and to the channel being readable."""
    from meshchat.broker import BrokerSettings  # noqa: PLC0415  # only this part needs a server
    from meshchat.client import Transport  # noqa: PLC0415
    from meshchat.datadir import DataDir  # noqa: PLC0415
    from meshchat.directory import Directory  # noqa: PLC0415
    from meshchat.directory.signing import OrgKeys  # noqa: PLC0415
    from meshchat.e2ee import BoxKeyPair, SigningKeyPair  # noqa: PLC0415
    from meshchat.geofence import GeofenceStore  # noqa: PLC0415
    from meshchat.server import SiteServer  # noqa: PLC0415

    # Throwaway accounts of a temporary data directory.
    root_password, carol_password = "root password", "carol password"
    notice_s: list[float] = []
    readable_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        DataDir(data).ensure()
        with Directory.in_data_dir(data) as directory:
            directory.init_org("bench", admin="root", password=root_password)
            directory.add_user("root", "carol", dept="ops", password=carol_password)
            directory.add_site(
                "root",
                "plant",
                lat=CENTRE[0],
                lon=CENTRE[1],
                radius_m=200,
                dwell_s=0,
                exit_dwell_s=0,
            )
            token = directory.add_device("root", "carol-phone", owner="carol")
            directory.set_device_keys(
                "carol-phone",
                SigningKeyPair.generate().public,
                BoxKeyPair.generate().public,
                actor="carol",
            )
            OrgKeys.create(data, "bench", "a benchmark passphrase").ensure_identities(directory)
        with GeofenceStore.in_data_dir(data) as store:
            store.set_settings(join_delay_s=0, leave_delay_s=0)
        async with SiteServer(DataDir(data), BrokerSettings(port=0)) as server:
            url = f"mqtt://127.0.0.1:{server.broker.listener('mqtt').port}"
            inbox = "mc/bench/_d/carol-phone"
            async with (
                Transport(url, client_id="carol-phone", username="carol", password=token) as phone,
                Transport(
                    url, client_id="carol.owntracks", username="carol", password=carol_password
                ) as owntracks,
            ):
                await phone.subscribe(inbox)
                messages = phone.messages()
                for rep in range(reps):
                    for inside in (True, False):
                        east = 0.0 if inside else 5000.0
                        lat, lon = offset(*CENTRE, east, 0.0)
                        ts = time.time() - 100 + rep
                        fix = {"_type": "location", "lat": lat, "lon": lon, "acc": 10, "tst": ts}
                        start = time.perf_counter()
                        await owntracks.publish("owntracks/carol/phone", json.dumps(fix).encode())
                        async with asyncio.timeout(30):
                            message = await anext(messages)
                            while message.topic != inbox:
                                message = await anext(messages)
                        noticed = time.perf_counter() - start
                        if inside:
                            await phone.subscribe("mc/bench/sites/plant")
                            readable_s.append(time.perf_counter() - start)
                            notice_s.append(noticed)
                        else:
                            await phone.unsubscribe("mc/bench/sites/plant")
    return {
        "notice_s": {"median": statistics.median(notice_s), "runs": notice_s},
        "readable_s": {"median": statistics.median(readable_s), "runs": readable_s},
    }


def _machine() -> dict[str, object]:
    packages = {}
    for name in ("meshchat", "pynacl", "amqtt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": packages,
    }


def evaluation_table(result: dict[str, Any], params: Params, *, quick: bool) -> Table:
    """Table 1: fixes per second against the budget and the naive reference."""
    indexed = result["indexed"]["median"]
    naive = result["naive_scan"]["median"]
    table = Table(
        title=f"fixes evaluated per CPU second, {params.sites:,} sites", title_justify="left"
    )
    for column in ("evaluation", "fixes/s", "budget", "ratio to naive scan"):
        table.add_column(column, justify="left" if column == "evaluation" else "right")
    verdict = "(not judged)" if quick else ("pass" if indexed >= BUDGET_FIXES_PER_S else "MISS")
    table.add_row(
        "state machine + grid index",
        f"{indexed:,.0f}",
        f">= 100,000 {verdict}",
        f"{indexed / naive:,.0f}x",
    )
    table.add_row("naive scan of every site (reference)", f"{naive:,.0f}", "", "1x")
    owntracks = result["owntracks_json"]["median"]
    table.add_row(
        "OwnTracks JSON parse + grid index", f"{owntracks:,.0f}", "", f"{owntracks / naive:,.0f}x"
    )
    return table


def e2e_table(result: dict[str, Any]) -> Table:
    """Table 2: from the deciding fix to the client."""
    table = Table(title="end to end through the site server (batching 0)", title_justify="left")
    table.add_column("from the deciding fix to")
    table.add_column("median ms", justify="right")
    table.add_column("max ms", justify="right")
    for key, label in (
        ("notice_s", "the join notice in the device's inbox"),
        ("readable_s", "the site channel readable (subscription granted)"),
    ):
        runs = result[key]["runs"]
        table.add_row(label, f"{statistics.median(runs) * 1000:.1f}", f"{max(runs) * 1000:.1f}")
    return table


def main(argv: list[str] | None = None) -> int:
    """Measure, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--no-e2e", action="store_true", help="skip the site-server measurement")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write JSON ({DEFAULT_JSON})"
    )
    args = parser.parse_args(argv)
    params = QUICK if args.quick else Params()
    console = Console(width=None if sys.stdout.isatty() else 150)
    started = datetime.now(UTC)
    clock = time.monotonic()
    console.print(f"[dim]evaluating {params.fixes:,} fixes against {params.sites:,} sites[/dim]")
    evaluation = measure_evaluation(params)
    e2e = None
    if not args.no_e2e:
        console.print(f"[dim]end to end: {params.e2e_reps} joins through a site server[/dim]")
        e2e = asyncio.run(_end_to_end(params.e2e_reps))
    seconds = time.monotonic() - clock
    console.print(evaluation_table(evaluation, params, quick=args.quick))
    if e2e is not None:
        console.print(e2e_table(e2e))
    indexed = evaluation["indexed"]["median"]
    passed = None if args.quick else indexed >= BUDGET_FIXES_PER_S
    document = {
        "benchmark": "geofence",
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "mode": "quick" if args.quick else "default",
        "machine": _machine(),
        "parameters": asdict(params) | {"clock": "time.process_time (this single process)"},
        "fixes_per_s": evaluation,
        "end_to_end": e2e,
        "ratios": {
            "indexed/naive_scan": indexed / evaluation["naive_scan"]["median"],
            "indexed/budget": indexed / BUDGET_FIXES_PER_S,
        },
        "budgets": {
            "fixes_per_s": {"value": indexed, "budget": ">= 100000", "passed": passed},
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    console.print(f"[dim]{seconds:.1f} s; JSON in {args.json}[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
