"""`meshchat site`: the places whose channel field staff join when they stand in them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

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

__all__ = ["site_app"]

site_app = typer.Typer(help="Add and list sites (geofences).", no_args_is_help=True)


def _site_json(site: Site) -> dict[str, object]:
    return {
        "name": site.name,
        "lat": site.lat,
        "lon": site.lon,
        "radius_m": site.radius_m,
        "polygon": [list(point) for point in site.polygon] if site.polygon else None,
        "channel": f"sites/{site.name}",
    }


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
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Add a site as a circle (--lat --lon --radius) or a polygon; creates its channel."""
    points = _read_polygon(polygon) if polygon is not None else None
    with open_directory(data) as directory:
        site = directory.add_site(
            actor_of(directory, as_user), name, lat=lat, lon=lon, radius_m=radius, polygon=points
        )
    if json_output:
        emit_json(_site_json(site))
        return
    console.print(f"Added site {site.name} with the channel sites/{site.name}.")


@site_app.command("list")
def list_sites(data: DataOption = DEFAULT_DATA, json_output: JsonOption = False) -> None:
    """List sites."""
    with open_directory(data) as directory:
        sites = directory.sites()
    if json_output:
        emit_json([_site_json(site) for site in sites])
        return
    table = Table("site", "shape", "channel")
    for site in sites:
        if site.polygon:
            shape = f"polygon, {len(site.polygon)} corners"
        else:
            shape = f"circle {site.radius_m:g} m at {site.lat:.6f}, {site.lon:.6f}"
        table.add_row(site.name, shape, f"sites/{site.name}")
    console.print(table)
