"""Device telemetry benchmark: bytes per GPS fix on the wire, and fixes per second end to end.

Usage::

    .venv/bin/python benchmarks/device_bench.py [--quick] [--json PATH] [--devices N]

Three tables:

1. bytes per GPS fix (time, position, accuracy, speed, heading, battery) as MQTT payload and as
   the whole MQTT 3.1.1 PUBLISH (QoS 1): meshchat's compact telemetry profile (the issue's
   budget: at most 100 bytes of payload) beside the same fix in the signed group profile, and
   an OwnTracks JSON location of the same data, plain and encrypted (the app's secretbox form).
2. CPU only: fixes opened and decoded per second (`decode_fix`) beside OwnTracks JSON parsing.
3. end to end: 1,000 simulated devices (each its own key and topic, published by a separate
   process over a few connections, QoS 0) through the embedded broker into a geofence consumer
   that opens each fix with its device's key and runs it through the geofence state machine
   (`meshchat.geofence.Tracker`, 1,000 sites), beside the same pipeline carrying OwnTracks JSON.
   Fixes per second from the first fix received to the last; lost fixes are counted. A third
   run feeds the geofence worker's own telemetry reader (`meshchat.geofence.gps.GpsIntake`:
   each device's key share sealed to the worker's reader key and signed by the device, then
   every fix through its keyring, replay check and schema) into the same state machine.

Tables show medians; the JSON (``benchmarks/results/device.json``) has every run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import nacl.secret
import nacl.utils
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from meshchat.broker import BrokerSettings, EmbeddedBroker
from meshchat.client import Transport
from meshchat.device import GpsFix, decode_fix, encode_gps, seal_key_share
from meshchat.e2ee import BoxKeyPair, OutboundChain, SigningKeyPair
from meshchat.e2ee.telemetry import TelemetryKey, TelemetrySealer
from meshchat.envelope import encode
from meshchat.geofence import Circle, Fix, Location, SiteRule, Tracker, offset, parse_payload
from meshchat.geofence.gps import GpsIntake
from meshchat.geofence.owntracks import encrypt_payload
from meshchat.topics import TelemetryTopic

DEFAULT_JSON: Final = Path(__file__).resolve().parent / "results" / "device.json"
BUDGET_BYTES: Final = 100
ORG: Final = "demo"
T0: Final = 1_800_000_000
CENTRE: Final = (52.52, 13.405)
FIX: Final = GpsFix(T0, 52.5200066, 13.404954, accuracy=8, speed=12.5, heading=270, battery=87)


@dataclass(frozen=True, slots=True)
class Params:
    """How much to measure."""

    devices: int = 1000
    fixes_per_device: int = 20
    publishers: int = 4
    sites: int = 1000
    cpu_fixes: int = 50_000
    reps: int = 3


QUICK: Final = Params(
    devices=100, fixes_per_device=5, publishers=2, sites=100, cpu_fixes=2000, reps=1
)


def publish_size(topic: str, payload: int) -> int:
    """Bytes of an MQTT 3.1.1 PUBLISH at QoS 1: header, length, topic, packet id, payload."""
    remaining = 2 + len(topic.encode()) + 2 + payload
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


def owntracks_json(fix: GpsFix) -> bytes:
    """The OwnTracks location the apps send for the same data (compact separators)."""
    record = {
        "_type": "location",
        "lat": fix.lat,
        "lon": fix.lon,
        "acc": round(fix.accuracy or 0),
        "vel": round((fix.speed or 0) * 3.6),
        "cog": round(fix.heading or 0),
        "batt": fix.battery,
        "tst": fix.ts,
        "tid": "v1",
    }
    return json.dumps(record, separators=(",", ":")).encode()


def measure_sizes() -> dict[str, dict[str, int]]:
    """Payload and PUBLISH bytes of one fix in each format."""
    telemetry_topic = TelemetryTopic(ORG, "van-1", "gps").topic
    sealer = TelemetrySealer(TelemetryKey.generate(), T0)
    first = sealer.seal(TelemetryTopic(ORG, "van-1", "gps"), encode_gps(FIX))
    sealer.counter = 2**32 - 2  # the largest counter: the worst case
    worst = sealer.seal(TelemetryTopic(ORG, "van-1", "gps"), encode_gps(FIX))
    chain = OutboundChain.new(now=T0)
    group_topic = f"mc/{ORG}/ops/dispatch"
    signed = encode(chain.encrypt(group_topic, b"\x0c" + encode_gps(FIX)))
    owntracks_topic = "owntracks/van-1/tracker"
    plain = owntracks_json(FIX)
    key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    encrypted = encrypt_payload(key, plain)
    rows = {
        "meshchat_telemetry": (telemetry_topic, len(first)),
        "meshchat_telemetry_worst_counter": (telemetry_topic, len(worst)),
        "meshchat_signed_group_profile": (group_topic, len(signed)),
        "owntracks_json": (owntracks_topic, len(plain)),
        "owntracks_json_encrypted": (owntracks_topic, len(encrypted)),
    }
    return {
        name: {"payload": size, "publish": publish_size(topic, size)}
        for name, (topic, size) in rows.items()
    }


def _keys(count: int) -> dict[str, TelemetrySealer]:
    return {f"dev-{n}": TelemetrySealer.new(now=T0) for n in range(count)}


def _fixes(params: Params, rnd: random.Random) -> list[tuple[str, GpsFix]]:
    fixes = []
    for step in range(params.fixes_per_device):
        for number in range(params.devices):
            north, east = rnd.uniform(-20_000, 20_000), rnd.uniform(-20_000, 20_000)
            lat, lon = offset(*CENTRE, north, east)
            fixes.append(
                (
                    f"dev-{number}",
                    GpsFix(T0 + step * 10, lat, lon, accuracy=rnd.randint(3, 30), battery=80),
                )
            )
    return fixes


def measure_cpu(params: Params) -> dict[str, Any]:
    """Fixes decoded per CPU second: meshchat telemetry beside OwnTracks JSON."""
    sealer = TelemetrySealer.new(now=T0)
    topic = TelemetryTopic(ORG, "van-1", "gps")
    sealed = [sealer.seal(topic, encode_gps(FIX)) for _ in range(params.cpu_fixes)]
    plain = [owntracks_json(FIX)] * params.cpu_fixes
    runs: dict[str, list[float]] = {"meshchat": [], "owntracks": []}
    for _ in range(params.reps):
        start = time.process_time()
        for payload in sealed:
            decode_fix(payload, topic=topic, key=sealer.key)
        runs["meshchat"].append(len(sealed) / max(time.process_time() - start, 1e-9))
        start = time.process_time()
        for payload in plain:
            parse_payload(payload, "owntracks/van-1/tracker")
        runs["owntracks"].append(len(plain) / max(time.process_time() - start, 1e-9))
    return {name: {"median": statistics.median(v), "runs": v} for name, v in runs.items()}


def _publisher(host: str, port: int, batch: list[tuple[str, bytes]], ready: Any, go: Any) -> None:  # noqa: ANN401  # multiprocessing events
    """A load-generator process: publish every (topic, payload) at QoS 0 as fast as it can."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"load-{os.getpid()}")
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    ready.set()
    go.wait()
    infos = [client.publish(topic, payload, qos=0) for topic, payload in batch]
    for info in infos[-1:]:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


async def _pipeline(
    params: Params,
    payloads: list[tuple[str, bytes]],
    consume: Any,  # noqa: ANN401  # a callable
) -> dict[str, float]:
    """Publish `payloads` from separate processes through the broker into `consume`."""
    async with EmbeddedBroker(BrokerSettings(host="127.0.0.1", port=0)) as broker:
        port = broker.listener("mqtt").port
        url = f"mqtt://127.0.0.1:{port}"
        total = len(payloads)
        received = 0
        first = last = 0.0
        done = asyncio.Event()
        async with Transport(url, client_id="geofence-bench", clean_session=True) as consumer:
            await consumer.subscribe(f"mc/{ORG}/_t/+/gps", qos=0)
            await consumer.subscribe("owntracks/+/+", qos=0)
            ctx = multiprocessing.get_context("spawn")
            ready = [ctx.Event() for _ in range(params.publishers)]
            go = ctx.Event()
            procs = [
                ctx.Process(
                    target=_publisher,
                    args=("127.0.0.1", port, payloads[n :: params.publishers], ready[n], go),
                )
                for n in range(params.publishers)
            ]
            for proc in procs:
                proc.start()
            for event in ready:
                await asyncio.to_thread(event.wait, 60)

            async def read() -> None:
                nonlocal received, first, last
                async for message in consumer.messages():
                    consume(message.topic, message.payload)
                    received += 1
                    last = time.monotonic()
                    if received == 1:
                        first = last
                    if received == total:
                        done.set()

            reader = asyncio.create_task(read(), name="meshchat[device-bench].read")
            go.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(120):
                    await done.wait()
            # QoS 0: what has not come 2 s after the publishers finished was dropped.
            for proc in procs:
                await asyncio.to_thread(proc.join, 60)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await done.wait()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    return {
        "sent": total,
        "received": received,
        "lost": total - received,
        "fixes_per_s": (received - 1) / max(last - first, 1e-9) if received > 1 else 0.0,
    }


def measure_end_to_end(params: Params) -> dict[str, Any]:
    """Fixes per second through broker and geofence, meshchat telemetry beside OwnTracks."""
    rnd = random.Random(3)  # noqa: S311  # a reproducible load, not a secret
    sites = [
        SiteRule(
            f"site-{n}",
            Circle(*offset(*CENTRE, rnd.uniform(-20e3, 20e3), rnd.uniform(-20e3, 20e3)), 200.0),
        )
        for n in range(params.sites)
    ]
    sealers = _keys(params.devices)
    fixes = _fixes(params, rnd)
    telemetry = [
        (
            TelemetryTopic(ORG, device, "gps").topic,
            sealers[device].seal(TelemetryTopic(ORG, device, "gps"), encode_gps(fix)),
        )
        for device, fix in fixes
    ]
    owntracks = [(f"owntracks/{device}/tracker", owntracks_json(fix)) for device, fix in fixes]
    keys = {device: sealer.key.gps_only() for device, sealer in sealers.items()}
    reader = BoxKeyPair.generate()
    signing = {device: SigningKeyPair.generate() for device in sealers}
    shares = {
        device: seal_key_share(
            sealer.key.gps_only(),
            device=device,
            signing=signing[device],
            recipient="geofence",
            recipient_box=reader.public,
            ts=T0,
        )
        for device, sealer in sealers.items()
    }
    runs: dict[str, list[dict[str, float]]] = {"meshchat": [], "worker": [], "owntracks": []}
    for _ in range(params.reps):
        tracker = Tracker(sites)

        def consume_telemetry(topic: str, payload: bytes, tracker: Tracker = tracker) -> None:
            device = topic.split("/")[3]
            fix = decode_fix(payload, topic=topic, key=keys[device])
            tracker.observe(device, device, Fix(fix.ts, fix.lat, fix.lon, fix.accuracy))

        runs["meshchat"].append(asyncio.run(_pipeline(params, telemetry, consume_telemetry)))
        tracker = Tracker(sites)
        intake = GpsIntake(reader)
        intake.directory_changed({device: key.public for device, key in signing.items()})
        for device, share in shares.items():
            assert intake.share(device, share).refused is None

        def consume_worker(
            topic: str, payload: bytes, tracker: Tracker = tracker, intake: GpsIntake = intake
        ) -> None:
            parsed = TelemetryTopic(ORG, topic.split("/")[3], "gps")
            for device, fix in intake.fix(parsed, payload).fixes:
                tracker.observe(device, device, fix)

        runs["worker"].append(asyncio.run(_pipeline(params, telemetry, consume_worker)))
        tracker = Tracker(sites)

        def consume_owntracks(topic: str, payload: bytes, tracker: Tracker = tracker) -> None:
            message = parse_payload(payload, topic)
            assert isinstance(message, Location)
            assert message.fix is not None
            tracker.observe(topic, message.user, message.fix)

        runs["owntracks"].append(asyncio.run(_pipeline(params, owntracks, consume_owntracks)))
    return {
        name: {"median": statistics.median(r["fixes_per_s"] for r in results), "runs": results}
        for name, results in runs.items()
    }


def _machine() -> dict[str, object]:
    packages = {}
    for name in ("meshchat", "pynacl", "amqtt", "paho-mqtt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": packages,
    }


def size_table(sizes: dict[str, dict[str, int]]) -> Table:
    """Table 1: bytes per fix."""
    table = Table(
        title="bytes per GPS fix (time, position, accuracy, speed, heading, battery)",
        title_justify="left",
    )
    for column in ("format", "payload B", "PUBLISH B (QoS 1)", "budget", "ratio to OwnTracks JSON"):
        table.add_column(column, justify="left" if column == "format" else "right")
    reference = sizes["owntracks_json"]["payload"]
    labels = {
        "meshchat_telemetry": "meshchat telemetry (E2EE, compact)",
        "meshchat_telemetry_worst_counter": "  same, largest counter",
        "meshchat_signed_group_profile": "meshchat signed group profile (E2EE)",
        "owntracks_json": "OwnTracks JSON (plain, reference)",
        "owntracks_json_encrypted": "OwnTracks JSON (encrypted)",
    }
    for name, label in labels.items():
        row = sizes[name]
        budget = ""
        if name.startswith("meshchat_telemetry"):
            verdict = "pass" if row["payload"] <= BUDGET_BYTES else "MISS"
            budget = f"<= {BUDGET_BYTES} {verdict}"
        table.add_row(
            label,
            str(row["payload"]),
            str(row["publish"]),
            budget,
            f"{row['payload'] / reference:.2f}",
        )
    return table


def rate_table(title: str, result: dict[str, Any], extra: str = "") -> Table:
    """Tables 2 and 3: fixes per second, meshchat beside OwnTracks."""
    table = Table(title=title, title_justify="left")
    for column in ("pipeline", "fixes/s", "ratio to OwnTracks", *([extra] if extra else [])):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    reference = result["owntracks"]["median"]
    for name, label in (
        ("meshchat", "meshchat telemetry (decrypt + decode)"),
        ("worker", "meshchat telemetry, the geofence worker's reader (keyring)"),
        ("owntracks", "OwnTracks JSON (reference)"),
    ):
        if name not in result:
            continue
        median = result[name]["median"]
        cells = [label, f"{median:,.0f}", f"{median / reference:.2f}"]
        if extra:
            cells.append(str(sum(r["lost"] for r in result[name]["runs"])))
        table.add_row(*cells)
    return table


def main(argv: list[str] | None = None) -> int:
    """Measure, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--devices", type=int, help="simulated devices (default 1000)")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write JSON ({DEFAULT_JSON})"
    )
    args = parser.parse_args(argv)
    params = QUICK if args.quick else Params()
    if args.devices:
        params = Params(**(asdict(params) | {"devices": args.devices}))
    console = Console(width=None if sys.stdout.isatty() else 150)
    started = datetime.now(UTC)
    clock = time.monotonic()
    sizes = measure_sizes()
    console.print(size_table(sizes))
    cpu = measure_cpu(params)
    console.print(rate_table("fixes decoded per CPU second (no MQTT)", cpu))
    console.print(
        f"[dim]end to end: {params.devices:,} devices x {params.fixes_per_device} fixes through "
        f"the embedded broker into the geofence state machine ({params.sites:,} sites)[/dim]"
    )
    e2e = measure_end_to_end(params)
    console.print(
        rate_table("fixes per second end to end (broker + decrypt + geofence)", e2e, "lost")
    )
    seconds = time.monotonic() - clock
    payload = sizes["meshchat_telemetry_worst_counter"]["payload"]
    document = {
        "benchmark": "device",
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "mode": "quick" if args.quick else "default",
        "machine": _machine(),
        "parameters": asdict(params),
        "bytes_per_fix": sizes,
        "cpu_fixes_per_s": cpu,
        "end_to_end": e2e,
        "ratios": {
            "telemetry/owntracks_json_bytes": sizes["meshchat_telemetry"]["payload"]
            / sizes["owntracks_json"]["payload"],
            "end_to_end_meshchat/owntracks": e2e["meshchat"]["median"] / e2e["owntracks"]["median"],
            "end_to_end_worker_reader/owntracks": e2e["worker"]["median"]
            / e2e["owntracks"]["median"],
        },
        "budgets": {
            "gps_fix_payload_bytes": {
                "value": payload,
                "budget": f"<= {BUDGET_BYTES}",
                "passed": payload <= BUDGET_BYTES,
            }
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    console.print(f"[dim]{seconds:.1f} s; JSON in {args.json}[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
