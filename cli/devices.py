"""`meshchat device`: add, list and remove IoT and GPS device accounts."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from pathlib import Path
from typing import Annotated, Final

import typer
from rich.table import Table

from cli.common import (
    DEFAULT_DATA,
    AsOption,
    DataOption,
    JsonOption,
    actor_of,
    console,
    emit_json,
    err_console,
    fail,
    local_broker,
    open_directory,
)
from meshchat.client import Client, ClientStore, open_profile
from meshchat.client.fleet import Fleet as FleetView
from meshchat.device import GpsFix, Status
from meshchat.errors import BusyError, MeshchatError, PermissionDeniedError
from meshchat.fleet import (
    DEFAULT_DISPATCH_GROUP,
    DeviceAccount,
    SimulationStats,
    add_device,
    device_accounts,
    run_simulation,
)
from meshchat.fleet import remove_device as revoke_device
from meshchat.timeutil import parse_duration

__all__ = ["device_app"]

DEFAULT_BROKER: Final = "mqtt://127.0.0.1:1883"
DEVICES_DIR: Final = "devices"

device_app = typer.Typer(
    help="Add, list and remove IoT and GPS devices (trackers, gateways, vehicles, scanners).",
    no_args_is_help=True,
)


class DeviceKind(enum.StrEnum):
    """What a device is (shown in `device list`)."""

    TRACKER = "tracker"
    GATEWAY = "gateway"
    VEHICLE = "vehicle"
    SCANNER = "scanner"


def _local_broker(data: Path) -> str:
    """The TCP listener of a server running from `data`, else the default broker URL."""
    return local_broker(data) or DEFAULT_BROKER


@device_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The device's name (a-z, 0-9, '-'), e.g. van-1.")],
    dept: Annotated[str, typer.Option("--dept", help="The device's department.")],
    kind: Annotated[DeviceKind, typer.Option("--kind", help="What it is.")] = DeviceKind.TRACKER,
    group: Annotated[
        str | None,
        typer.Option(
            "--group",
            help=f"Its dispatch group, DEPT/GROUP (default: DEPT/{DEFAULT_DISPATCH_GROUP}, "
            "created when missing); its members read the device's telemetry.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Where to write the credential file (default: DATA/devices/NAME.json)."
        ),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            help="The broker URL the device should use (default: this server's, else "
            f"{DEFAULT_BROKER}).",
        ),
    ] = None,
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Create a device account (role device) and write its credential file (mode 0600).

    The file holds the device's broker login, its keys and the org's trust bundle: copy it to
    the device over a channel you trust, then delete this copy.
    """
    target = out or data / DEVICES_DIR / f"{name}.json"
    url = broker or _local_broker(data)
    with open_directory(data) as directory:
        made = add_device(
            directory,
            data,
            actor=actor_of(directory, as_user),
            name=name,
            dept=dept,
            kind=kind.value,
            broker=url,
            out=target,
            group=group,
        )
    if json_output:
        emit_json(
            {
                "device": name,
                "dept": dept,
                "kind": kind.value,
                "group": made.group,
                "created_group": made.created_group,
                "credentials": str(made.path),
                "broker": url,
                "fingerprint": made.credentials.fingerprint,
            }
        )
        return
    created = " (created)" if made.created_group else ""
    console.print(
        f"Added device [bold]{name}[/] ({kind.value}, {dept}); dispatch group "
        f"[bold]{made.group}[/]{created}.",
        soft_wrap=True,
    )
    console.print(
        f"Credentials: {made.path} (mode 0600). Copy the file to the device over a channel you "
        "trust and delete this copy; whoever holds it can act as the device.",
        soft_wrap=True,
    )
    console.print(
        f"Org root fingerprint: {made.credentials.fingerprint}. People in {made.group} read "
        f"its telemetry: add them with `meshchat group add {made.group} USER`.",
        soft_wrap=True,
    )


@device_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="The device to revoke.")],
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Revoke a device: the broker cuts it off within a second and refuses it from then on."""
    with open_directory(data) as directory:
        left = revoke_device(directory, actor=actor_of(directory, as_user), name=name)
    if json_output:
        emit_json({"device": name, "status": "revoked", "left_groups": left})
        return
    console.print(
        f"Revoked {name}; it left {len(left)} group(s){': ' if left else ''}{', '.join(left)}. "
        "The broker refuses it from now on.",
        soft_wrap=True,
    )


def _age(ts: float, now: float) -> str:
    seconds = max(0, int(now - ts))
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _status_text(status: Status | None, now: float) -> str:
    if status is None:
        return ""
    parts = []
    if status.state is not None:
        parts.append(status.state)
    if status.temperature is not None:
        parts.append(f"{status.temperature:g} °C")
    if status.load is not None:
        parts.append(f"load {status.load:g}%")
    parts.extend(f"{key}={value}" for key, value in sorted(status.extra.items()))
    parts.append(f"({_age(status.ts, now)})")
    return " ".join(parts)


def _status_json(status: Status | None) -> dict[str, object] | None:
    if status is None:
        return None
    return {
        "ts": status.ts,
        "battery": status.battery,
        "temperature": status.temperature,
        "load": status.load,
        "signal": status.signal,
        "uptime": status.uptime,
        "state": status.state,
        "extra": dict(status.extra),
    }


def _fix_json(fix: GpsFix | None) -> dict[str, object] | None:
    if fix is None:
        return None
    return {
        "ts": fix.ts,
        "lat": fix.lat,
        "lon": fix.lon,
        "accuracy": fix.accuracy,
        "speed": fix.speed,
        "heading": fix.heading,
        "battery": fix.battery,
    }


async def _observe(client: Client, names: list[str], wait: float) -> tuple[FleetView, set[str]]:
    """Watch the devices and give retained presence and status `wait` seconds to arrive."""
    refused = set()
    for name in names:
        try:
            await client.watch_devices([name])
        except PermissionDeniedError:
            refused.add(name)
    watched = [n for n in names if n not in refused]
    fleet = client.fleet
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            await fleet.wait_until(
                lambda: all(
                    fleet.presence(n) is not None
                    and (fleet.status(n) is not None or not fleet.has_key(n))
                    for n in watched
                )
            )
    return fleet, refused


@device_app.command("list")
def list_devices(
    as_user: Annotated[
        str | None,
        typer.Option(
            "--as",
            envvar="MESHCHAT_AS",
            help="Read presence and status through this user's device profile (`meshchat login`).",
        ),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option("--broker", help="Broker URL (default: the profile's)."),
    ] = None,
    wait: Annotated[
        float,
        typer.Option("--wait", help="Seconds to let presence and the last status arrive."),
    ] = 3.0,
    all_devices: Annotated[bool, typer.Option("--all", help="Include revoked devices.")] = False,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """List devices with their presence and last status.

    Presence and status come from the broker through a device profile on this machine (status
    is end-to-end encrypted: it shows only for members of the device's dispatch group).
    """
    with open_directory(data) as directory:
        accounts = device_accounts(directory, include_revoked=all_devices)
    fleet: FleetView | None = None
    refused: set[str] = set()
    note = ""
    live = True
    try:
        profile = open_profile(data, as_user)
    except MeshchatError as exc:
        profile = None
        note = f"presence and status unknown: {exc}"
    if profile is not None and accounts:
        active = [a.name for a in accounts if a.active]

        async def work() -> tuple[FleetView, set[str]]:
            async with Client(profile, broker=broker, send_receipts=False) as client:
                return await _observe(client, active, wait)

        try:
            fleet, refused = asyncio.run(work())
        except BusyError as exc:
            # A `tail` or `chat` holds the profile: show what it last stored, without presence.
            with ClientStore(profile.store_path) as store:
                fleet = FleetView(store, ask=lambda _device, _key_id: None)
            live = False
            note = f"presence unknown, statuses as last read here: {exc}"
        except MeshchatError as exc:
            fail(str(exc))
    now = time.time()
    if json_output:
        emit_json([_account_json(a, fleet, refused, live=live) for a in accounts])
        return
    if not accounts:
        console.print("No devices yet: add one with `meshchat device add NAME --dept DEPT`.")
        return
    table = Table(
        "device", "kind", "department", "groups", "presence", "battery", "status", "last fix"
    )
    for account in accounts:
        table.add_row(*_row(account, fleet, refused, now, live=live))
    console.print(table)
    if note:
        err_console.print(f"[dim]{note}[/]", soft_wrap=True)


def _presence(
    account: DeviceAccount, fleet: FleetView | None, refused: set[str], *, live: bool = True
) -> str:
    if not account.active:
        return "revoked"
    if fleet is None or not live:
        return "?"
    if account.name in refused:
        return "not permitted"
    online = fleet.presence(account.name)
    return {True: "online", False: "offline", None: "never seen"}[online]


def _row(
    account: DeviceAccount,
    fleet: FleetView | None,
    refused: set[str],
    now: float,
    *,
    live: bool = True,
) -> tuple[str, ...]:
    status = fleet.status(account.name) if fleet else None
    fix = fleet.fix(account.name) if fleet else None
    readable = fleet is not None and fleet.has_key(account.name)
    battery = status.battery if status is not None else fix.battery if fix is not None else None
    status_text = _status_text(status, now)
    if (
        not status_text
        and fleet is not None
        and account.active
        and not readable
        and fleet.waiting(account.name)
    ):
        # Reports came, but no key: readers are its dispatch group's people, and the device
        # shares its key with them when it is next online.
        status_text = "[dim]encrypted: no key here (yet)[/]"
    return (
        account.name,
        account.kind,
        account.dept,
        ", ".join(account.groups),
        _presence(account, fleet, refused, live=live),
        "" if battery is None else f"{battery}%",
        status_text,
        "" if fix is None else f"{fix.lat:.5f}, {fix.lon:.5f} ({_age(fix.ts, now)})",
    )


def _account_json(
    account: DeviceAccount, fleet: FleetView | None, refused: set[str], *, live: bool = True
) -> dict[str, object]:
    return {
        "device": account.name,
        "kind": account.kind,
        "dept": account.dept,
        "groups": list(account.groups),
        "active": account.active,
        "presence": _presence(account, fleet, refused, live=live),
        "readable": fleet is not None and fleet.has_key(account.name),
        "status": _status_json(fleet.status(account.name) if fleet else None),
        "fix": _fix_json(fleet.fix(account.name) if fleet else None),
    }


@device_app.command("simulate")
def simulate(
    count: Annotated[
        int, typer.Option("--count", min=1, max=1000, help="How many simulated devices.")
    ],
    site: Annotated[
        str | None,
        typer.Option("--site", help="Drive around this site (default: 2 km around Munich)."),
    ] = None,
    dept: Annotated[
        str, typer.Option("--dept", help="Their department; dispatch group DEPT/dispatch.")
    ] = "sim",
    prefix: Annotated[str, typer.Option("--prefix", help="Names: PREFIX-1 ... PREFIX-N.")] = "sim",
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, help="Seconds between two fixes of a device.")
    ] = 5.0,
    duration: Annotated[
        str | None,
        typer.Option("--duration", help="Run this long (30s, 10m, 2h); default: until Ctrl-C."),
    ] = None,
    work: Annotated[
        float,
        typer.Option("--work", min=0.0, help="Seconds from accepting a work order to done."),
    ] = 30.0,
    broker: Annotated[
        str | None,
        typer.Option("--broker", help="Broker URL (default: this server's, else 127.0.0.1)."),
    ] = None,
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Run N simulated devices: noisy GPS fixes, status, and work orders accepted and done.

    The devices are real device accounts (made once, in DATA/devices) on the real SDK: add
    people to DEPT/dispatch to watch them with `device list` and task them with `dispatch send`.
    """
    try:
        seconds = None if duration is None else parse_duration(duration)
    except MeshchatError as exc:
        fail(f"--duration: {exc}", code=2)
    url = broker or _local_broker(data)

    def show(stats: SimulationStats) -> None:
        if not json_output:
            console.print(
                f"[dim]{int(stats.seconds):>5}s[/] {stats.online}/{stats.devices} online, "
                f"{stats.fixes} fixes, {stats.statuses} statuses, work orders: "
                f"{stats.orders} accepted, {stats.done} done"
            )

    stats: SimulationStats | None = None
    with open_directory(data) as directory:
        if not json_output:
            console.print(
                f"Simulating {count} devices ({prefix}-1 ... {prefix}-{count}, dispatch group "
                f"{dept}/dispatch) against {url}; Ctrl-C stops."
            )
        try:
            stats = run_simulation(
                directory,
                data,
                actor=actor_of(directory, as_user),
                count=count,
                broker=url,
                site=site,
                dept=dept,
                prefix=prefix,
                interval=interval,
                duration=seconds,
                work_s=work,
                progress=show,
            )
        except KeyboardInterrupt:
            console.print("Stopped.")
            return
    if json_output and stats is not None:
        emit_json(
            {
                "devices": stats.names,
                "online": stats.online,
                "fixes": stats.fixes,
                "statuses": stats.statuses,
                "orders_accepted": stats.orders,
                "orders_done": stats.done,
                "seconds": round(stats.seconds, 1),
            }
        )
