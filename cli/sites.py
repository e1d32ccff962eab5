"""`meshchat site`: the places whose channel field staff join when they stand in them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Literal

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
    fail,
    open_directory,
)
from meshchat.directory import Site
from meshchat.errors import ConfigError
from meshchat.geofence import (
    DEFAULT_DWELL_S,
    DEFAULT_EXIT_DWELL_S,
    DEFAULT_HYSTERESIS_M,
    Circle,
    check_polygon,
    remove_owntracks_key,
    set_owntracks_key,
    site_timing,
)
from meshchat.timeutil import parse_duration

__all__ = ["site_app"]

site_app = typer.Typer(help="Add, change, list and remove sites (geofences).", no_args_is_help=True)


def _site_json(site: Site) -> dict[str, object]:
    return {
        "name": site.name,
        "lat": site.lat,
        "lon": site.lon,
        "radius_m": site.radius_m,
        "polygon": [list(point) for point in site.polygon] if site.polygon else None,
        "channel": f"sites/{site.name}",
        **site_timing(site),
    }


def _seconds(text: str | None, option: str) -> float | None:
    """A duration option (``0``, ``45s``, ``2m``); None when not given."""
    if text is None:
        return None
    if text.strip() in {"0", "0s"}:
        return 0.0
    try:
        return float(parse_duration(text))
    except ConfigError as exc:
        fail(f"{option}: {exc}", code=2)


DwellOption = Annotated[
    str | None,
    typer.Option(
        "--dwell",
        help=f"Time inside before someone joins (e.g. 45s, 2m; default {DEFAULT_DWELL_S:g}s).",
    ),
]
ExitDwellOption = Annotated[
    str | None,
    typer.Option(
        "--exit-dwell",
        help=f"Time wholly outside before someone leaves (default {DEFAULT_EXIT_DWELL_S:g}s).",
    ),
]
HysteresisOption = Annotated[
    float | None,
    typer.Option(
        "--hysteresis",
        help=f"Metres the fence grows by for leaving (default {DEFAULT_HYSTERESIS_M:g}).",
    ),
]


def _read_polygon(path: Path) -> list[tuple[float, float]]:
    """The outer ring of a GeoJSON Polygon (a Feature, or a bare geometry) as (lat, lon)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"cannot read {path} as GeoJSON: {exc}")
    geometry = document.get("geometry", document) if isinstance(document, dict) else None
    if not isinstance(geometry, dict) or geometry.get("type") != "Polygon":
        fail(f"{path}: expected a GeoJSON Polygon (or a Feature holding one)")
    try:
        ring = geometry["coordinates"][0]
        # GeoJSON orders positions longitude first.
        points = [(float(lat), float(lon)) for lon, lat, *_ in ring]
    except (KeyError, IndexError, TypeError, ValueError):
        fail(f"{path}: the polygon's coordinates are not [[lon, lat], ...]")
    if len(points) > 1 and points[0] == points[-1]:
        points.pop()  # GeoJSON closes the ring; we store each corner once
    return points


@site_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The site's name (a-z, 0-9, '-').")],
    lat: Annotated[float | None, typer.Option("--lat", help="Centre latitude.")] = None,
    lon: Annotated[float | None, typer.Option("--lon", help="Centre longitude.")] = None,
    radius: Annotated[float | None, typer.Option("--radius", help="Radius in metres.")] = None,
    polygon: Annotated[
        Path | None, typer.Option("--polygon", help="GeoJSON file with the site's polygon.")
    ] = None,
    dwell: DwellOption = None,
    exit_dwell: ExitDwellOption = None,
    hysteresis: HysteresisOption = None,
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Add a site as a circle (--lat --lon --radius) or a polygon; creates its channel.

    Field staff whose role allows auto-join are added to the channel sites/SITE when their
    fixes put them inside for the dwell time, and removed once wholly outside (the fence grown
    by the hysteresis) for the exit dwell.
    """
    points = _read_polygon(polygon) if polygon is not None else None
    timing = {
        "dwell_s": _seconds(dwell, "--dwell"),
        "exit_dwell_s": _seconds(exit_dwell, "--exit-dwell"),
        "hysteresis_m": hysteresis,
    }
    try:
        # The geofence's own checks: edges that cross, a site near a pole.
        if points is not None:
            check_polygon(points)
        elif lat is not None and lon is not None and radius is not None:
            Circle(lat, lon, radius)
    except ConfigError as exc:
        fail(str(exc))
    with open_directory(data) as directory:
        site = directory.add_site(
            actor_of(directory, as_user),
            name,
            lat=lat,
            lon=lon,
            radius_m=radius,
            polygon=points,
            **timing,
        )
    if json_output:
        emit_json(_site_json(site))
        return
    console.print(f"Added site {site.name} with the channel sites/{site.name}.")


@site_app.command("set")
def set_site(
    name: Annotated[str, typer.Argument(help="The site.")],
    dwell: DwellOption = None,
    exit_dwell: ExitDwellOption = None,
    hysteresis: HysteresisOption = None,
    default_timing: Annotated[
        bool, typer.Option("--default-timing", help="Go back to the default timing first.")
    ] = False,
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Change a site's dwell times and exit hysteresis (the geofence applies them at once)."""
    keep: Literal["keep"] | None = None if default_timing else "keep"
    dwell_s = _seconds(dwell, "--dwell")
    exit_s = _seconds(exit_dwell, "--exit-dwell")
    with open_directory(data) as directory:
        site = directory.set_site(
            actor_of(directory, as_user),
            name,
            dwell_s=keep if dwell_s is None else dwell_s,
            exit_dwell_s=keep if exit_s is None else exit_s,
            hysteresis_m=keep if hysteresis is None else hysteresis,
        )
    if json_output:
        emit_json(_site_json(site))
        return
    timing = _site_json(site)
    console.print(
        f"Site {site.name}: dwell {timing['dwell_s']:g}s, exit dwell "
        f"{timing['exit_dwell_s']:g}s, hysteresis {timing['hysteresis_m']:g} m."
    )


@site_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="The site.")],
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Remove a site: its fence goes, and everyone leaves its channel (audited).

    The channel sites/SITE stays, empty: its next roster lists nobody, so nobody can read or
    post there any more, and its history stays in the archive. A running geofence worker stops
    evaluating the site within a second. Adding the site again brings the channel back.
    """
    with open_directory(data) as directory:
        members = directory.remove_site(actor_of(directory, as_user), name)
    if json_output:
        emit_json({"site": name, "channel": f"sites/{name}", "removed_members": members})
        return
    who = f"; {', '.join(members)} left sites/{name}" if members else ""
    console.print(f"Removed site {name}{who}.")


@site_app.command("list")
def list_sites(data: DataOption = DEFAULT_DATA, json_output: JsonOption = False) -> None:
    """List sites with their fences and geofence timing."""
    with open_directory(data) as directory:
        sites = directory.sites()
    if json_output:
        emit_json([_site_json(site) for site in sites])
        return
    table = Table("site", "shape", "channel", "dwell", "exit dwell", "hysteresis")
    for site in sites:
        if site.polygon:
            shape = f"polygon, {len(site.polygon)} corners"
        else:
            shape = f"circle {site.radius_m:g} m at {site.lat:.6f}, {site.lon:.6f}"
        timing = _site_json(site)
        table.add_row(
            site.name,
            shape,
            f"sites/{site.name}",
            f"{timing['dwell_s']:g}s",
            f"{timing['exit_dwell_s']:g}s",
            f"{timing['hysteresis_m']:g} m",
        )
    console.print(table)


@site_app.command("owntracks-key")
def owntracks_key(
    user: Annotated[str, typer.Argument(help="The OwnTracks user (the directory user).")],
    device: Annotated[str, typer.Argument(help="The OwnTracks device id.")],
    remove: Annotated[
        bool, typer.Option("--remove", help="Forget the device's key instead.")
    ] = False,
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Register the encryption passphrase of an OwnTracks phone (read from stdin's first line).

    The phone's payload encryption key (Preferences, Encryption) must be the same passphrase;
    OwnTracks uses its first 32 bytes. The key is kept in the data directory's key store and
    never printed or logged.
    """
    with open_directory(data) as directory:
        actor = actor_of(directory, as_user)
        if remove:
            remove_owntracks_key(data, directory, actor, user, device)
            console.print(f"Forgot the OwnTracks key of {user}/{device}.")
            return
        if sys.stdin.isatty():
            secret = typer.prompt("OwnTracks encryption key", hide_input=True)
        else:
            secret = sys.stdin.readline().rstrip("\r\n")
        if not secret:
            fail("stdin held no passphrase", code=2)
        set_owntracks_key(data, directory, actor, user, device, secret=secret)
    note = " (OwnTracks uses its first 32 bytes)" if len(secret.encode()) > 32 else ""
    console.print(f"Registered the OwnTracks key of {user}/{device}{note}.")
