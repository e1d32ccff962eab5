"""`meshchat geofence`: run the geofence worker alone, simulate it, replay tracks, show state."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    DEFAULT_DATA,
    DataOption,
    JsonOption,
    VerboseOption,
    console,
    emit_json,
    err_console,
    fail,
    open_directory,
    read_password,
    read_password_file,
    setup_logging,
)
from meshchat.client.transport import Transport
from meshchat.client.urls import DEFAULT_BROKER_URL
from meshchat.datadir import DataDir
from meshchat.directory.policy import GEOFENCE_SERVICE, SERVICE_PREFIX
from meshchat.errors import ConfigError, MeshchatError
from meshchat.geofence import (
    GeofenceSettings,
    GeofenceStore,
    GeofenceWorker,
    Location,
    OwnTracksError,
    SimulationReport,
    SiteRule,
    Tracker,
    Transition,
    WorkerKind,
    parse_payload,
    parse_rec_line,
    simulate,
    site_rule,
)
from meshchat.geofence.geometry import Circle

__all__ = ["geofence_app"]

geofence_app = typer.Typer(
    help="The geofence worker: field staff join the channel of the site they stand in.",
)

KINDS: tuple[WorkerKind, ...] = ("visitor", "fence-sitter", "passer-by")


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@geofence_app.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    broker: Annotated[
        str,
        typer.Option("--broker", help="The MQTT broker to follow (mqtt://, mqtts://, ws://)."),
    ] = DEFAULT_BROKER_URL,
    username: Annotated[
        str | None, typer.Option("--username", help="Log in to the broker as this account.")
    ] = None,
    password_stdin: Annotated[
        bool,
        typer.Option("--password-stdin", help="Read the broker password from stdin's first line."),
    ] = False,
    password_file: Annotated[
        Path | None,
        typer.Option(
            "--password-file",
            help="A file whose first line is the broker password (deploy mosquitto writes "
            "DATA/services/geofence.secret).",
        ),
    ] = None,
    client_id: Annotated[
        str,
        typer.Option("--client-id", help="MQTT client id (its persistent session keeps fixes)."),
    ] = f"{SERVICE_PREFIX}{GEOFENCE_SERVICE}",
    push_waypoints: Annotated[
        bool | None,
        typer.Option(
            "--push-waypoints/--no-push-waypoints",
            help="Send site regions to OwnTracks phones (default: `geofence config`).",
        ),
    ] = None,
    data: DataOption = DEFAULT_DATA,
    verbose: VerboseOption = 0,
) -> None:
    """Run the geofence worker alone against --broker, on the data directory's sites.

    `meshchat up` runs one itself; run this one against an external broker (Mosquitto) with
    the account `meshchat deploy mosquitto` makes (svc.geofence, its secret in
    DATA/services/geofence.secret). Ctrl-C stops it.
    """
    if ctx.invoked_subcommand is not None:
        return
    setup_logging(verbose)
    if password_stdin and password_file is not None:
        fail("give the password one way: --password-stdin or --password-file", code=2)
    password = None
    if password_stdin:
        password = read_password(from_stdin=True)
    elif password_file is not None:
        password = read_password_file(password_file)
    settings = GeofenceSettings(push_waypoints=push_waypoints)
    try:
        asyncio.run(_serve(DataDir(data), broker, username, password, client_id, settings))
    except MeshchatError as exc:
        fail(str(exc))


async def _serve(
    data: DataDir,
    broker: str,
    username: str | None,
    password: str | None,
    client_id: str,
    settings: GeofenceSettings,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        with data.lock("geofence"):
            async with Transport(
                broker,
                client_id=client_id,
                username=username,
                password=password,
                clean_session=False,
            ) as transport:
                worker = GeofenceWorker(data.path, transport, settings=settings)
                task = asyncio.create_task(worker.run(), name="meshchat[geofence].loop")
                ready = asyncio.create_task(worker.wait_ready(), name="meshchat[geofence].ready")
                stopped = asyncio.create_task(stop.wait(), name="meshchat[geofence].stop")
                try:
                    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
                    if not task.done():
                        console.print(
                            f"geofence ready: {len(worker.tracker.sites)} sites, following "
                            f"{broker}. Press Ctrl-C to stop.",
                            soft_wrap=True,
                        )
                        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for pending in (ready, stopped, task):
                        pending.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]  # re-raised as the CLI's error
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    console.print("stopped.")


def _report_row(kind: str, report: SimulationReport) -> dict[str, object]:
    return {"kind": kind, **asdict(report), "spurious": report.spurious}


@geofence_app.command("simulate")
def simulate_command(
    workers: Annotated[int, typer.Option("--workers", help="Workers of each kind.")] = 30,
    hours: Annotated[float, typer.Option("--hours", help="Length of the shift.")] = 8.0,
    seed: Annotated[int, typer.Option("--seed", help="Makes the run reproducible.")] = 1,
    site: Annotated[
        str | None,
        typer.Option(
            "--site", help="Simulate this site of the data directory (its fence, timing)."
        ),
    ] = None,
    radius: Annotated[
        float, typer.Option("--radius", help="Without --site: a circle of this radius (m).")
    ] = 100.0,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Walk workers with realistic GPS noise in and out of a site; count spurious transitions.

    Visitors walk in, work and walk out (one join, one leave each); fence sitters stand 10 m
    inside the fence all shift (one join); passers-by walk 30 m outside it (no join).
    """
    if workers < 1 or hours < 1:
        fail("simulate at least one worker for at least one hour", code=2)
    rule = SiteRule("simulated", Circle(48.137, 11.575, radius)) if site is None else None
    if site is not None:
        with open_directory(data) as directory:
            rule = site_rule(directory.site(site))
    assert rule is not None
    rows = []
    for kind in KINDS:
        report = simulate(workers=workers, hours=hours, seed=seed, rule=rule, kinds=(kind,))
        rows.append(_report_row(kind, report))
    if json_output:
        emit_json(rows)
        return
    table = Table(
        "workers",
        "fixes",
        "joins",
        "leaves",
        "spurious",
        "missed",
        "join delay p50/max",
        "leave delay p50/max",
        title=f"{rule.name}: {hours:g} h, seed {seed}; real joins and leaves in brackets",
    )
    for row in rows:
        join_delay, leave_delay = row["join_delay_s"], row["leave_delay_s"]
        assert isinstance(join_delay, tuple)
        assert isinstance(leave_delay, tuple)
        table.add_row(
            f"{row['workers']} {row['kind']}",
            str(row["fixes"]),
            f"{row['joins']} ({row['expected_joins']})",
            f"{row['leaves']} ({row['expected_leaves']})",
            str(row["spurious"]),
            str(row["missed"]),
            f"{join_delay[0]:.0f}/{join_delay[1]:.0f} s",
            f"{leave_delay[0]:.0f}/{leave_delay[1]:.0f} s",
        )
    console.print(table)


@geofence_app.command("replay")
def replay(
    files: Annotated[list[Path], typer.Argument(help="OwnTracks Recorder .rec files.")],
    user: Annotated[
        str | None, typer.Option("--user", help="Their user (default: from rec/USER/DEVICE/).")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Their device (default: from the path).")
    ] = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Replay OwnTracks Recorder files through the data directory's sites; print the changes.

    Nothing is written: it shows when the geofence would have added and removed the user,
    e.g. to tune a site's dwell times against real tracks.
    """
    with open_directory(data) as directory:
        rules = [site_rule(site) for site in directory.sites()]
    tracker = Tracker(rules)
    changes = []
    for path in files:
        owner = user or path.parent.parent.name
        phone = device or path.parent.name
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {path}: {exc}")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = parse_rec_line(line)
                message = parse_payload(rec.payload, rec.topic(owner, phone))
            except (OwnTracksError, ConfigError) as exc:
                err_console.print(f"{path}:{number}: skipped: {exc}", soft_wrap=True)
                continue
            if isinstance(message, Location | Transition) and message.fix is not None:
                subject = f"owntracks/{message.user}/{message.device}"
                changes += tracker.observe(subject, message.user, message.fix)
    rows = [
        {
            "time": _iso(c.ts),
            "user": c.user,
            "site": c.site,
            "change": "join" if c.entered else "leave",
        }
        for c in changes
    ]
    if json_output:
        emit_json(rows)
        return
    for row in rows:
        console.print(f"{row['time']}  {row['user']} {row['change']}s {row['site']}")
    console.print(f"{len(rows)} changes from {tracker.stats.fixes} fixes.")


@geofence_app.command("status")
def status(data: DataOption = DEFAULT_DATA, json_output: JsonOption = False) -> None:
    """Who stands in which site, the tracked devices, OwnTracks keys and settings."""
    with open_directory(data) as directory:
        sites = directory.sites()
        rules = [site_rule(site) for site in sites]
        presence = directory.site_presence()
        members = {site.name: directory.group(f"sites/{site.name}").members for site in sites}
    try:
        with GeofenceStore.in_data_dir(data) as store:
            saved = store.load_subjects()
            devices = store.owntracks_devices()
            settings = store.settings()
    except ConfigError as exc:
        fail(str(exc))
    tracker = Tracker(rules)
    for subject, state in saved.items():
        tracker.restore(subject, state)
    tracked = []
    for subject in sorted(saved):
        fix = tracker.last_fix(subject)
        tracked.append(
            {
                "subject": subject,
                "user": saved[subject].owner,
                "last_fix": None if fix is None else _iso(fix.ts),
                "inside": sorted(tracker.inside(subject)),
            }
        )
    site_rows = [
        {
            "site": site.name,
            "automatic": sorted(presence.get(site.name, ())),
            "manual": sorted(members[site.name] - presence.get(site.name, frozenset())),
        }
        for site in sites
    ]
    result = {
        "sites": site_rows,
        "devices": tracked,
        "owntracks_keys": [f"{d.user}/{d.device}" for d in devices if d.has_key],
        "settings": asdict(settings),
    }
    if json_output:
        emit_json(result)
        return
    table = Table("site", "joined by the geofence", "added by an admin")
    for row in site_rows:
        table.add_row(
            str(row["site"]), ", ".join(row["automatic"]) or "-", ", ".join(row["manual"]) or "-"
        )
    console.print(table)
    devices_table = Table("device", "user", "last fix", "inside")
    for item in tracked:
        inside = item["inside"]
        assert isinstance(inside, list)
        devices_table.add_row(
            str(item["subject"]), str(item["user"]), str(item["last_fix"]), ", ".join(inside) or "-"
        )
    console.print(devices_table)
    keys = [f"{d.user}/{d.device}" for d in devices if d.has_key]
    console.print(f"OwnTracks keys: {', '.join(keys) or 'none'}")
    console.print(
        f"Settings: push waypoints {'on' if settings.push_waypoints else 'off'}, joins wait up "
        f"to {settings.join_delay_s:g}s, leaves up to {settings.leave_delay_s:g}s."
    )


@geofence_app.command("config")
def config(
    push_waypoints: Annotated[
        bool | None,
        typer.Option(
            "--push-waypoints/--no-push-waypoints",
            help="Send site regions to OwnTracks phones (they must allow remote commands).",
        ),
    ] = None,
    join_delay: Annotated[
        float | None,
        typer.Option("--join-delay", help="Seconds joins may wait to share one roster epoch."),
    ] = None,
    leave_delay: Annotated[
        float | None,
        typer.Option("--leave-delay", help="Seconds leaves may wait (one key rotation per batch)."),
    ] = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Show or change the geofence worker's settings (a running worker applies them at once)."""
    with open_directory(data):
        pass  # the data directory must hold an org
    try:
        with GeofenceStore.in_data_dir(data) as store:
            settings = store.set_settings(
                push_waypoints=push_waypoints, join_delay_s=join_delay, leave_delay_s=leave_delay
            )
    except ConfigError as exc:
        fail(str(exc))
    if json_output:
        emit_json(asdict(settings))
        return
    console.print(
        f"push waypoints: {'on' if settings.push_waypoints else 'off'}\n"
        f"join delay:     {settings.join_delay_s:g}s\n"
        f"leave delay:    {settings.leave_delay_s:g}s"
    )
