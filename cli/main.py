"""The Typer application behind the `meshchat` console script."""

from __future__ import annotations

from typing import Annotated

import typer

import meshchat
from cli.archive import archive_app
from cli.audit import audit_app
from cli.chat import chat
from cli.client import ack, acks, history, login_command, send, tail
from cli.common import console
from cli.deploy import deploy_app
from cli.depts import dept_app
from cli.devices import device_app
from cli.dispatch import dispatch_app
from cli.geofence import geofence_app
from cli.groups import group_app
from cli.org import org_app
from cli.roles import role_app
from cli.sites import site_app
from cli.up import up
from cli.users import user_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="meshchat",
    help="meshchat: end-to-end encrypted messaging over MQTT for sites with thin, flaky links.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(up)
app.command("login")(login_command)
app.command()(send)
app.command()(tail)
app.command()(history)
app.command()(ack)
app.command()(acks)
app.command()(chat)
app.add_typer(org_app, name="org")
app.add_typer(user_app, name="user")
app.add_typer(dept_app, name="dept")
app.add_typer(group_app, name="group")
app.add_typer(site_app, name="site")
app.add_typer(device_app, name="device")
app.add_typer(dispatch_app, name="dispatch")
app.add_typer(geofence_app, name="geofence")
app.add_typer(role_app, name="role")
app.add_typer(audit_app, name="audit")
app.add_typer(archive_app, name="archive")
app.add_typer(deploy_app, name="deploy")


def _version(value: bool) -> None:
    if value:
        console.print(f"meshchat {meshchat.__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """meshchat: end-to-end encrypted messaging over MQTT for sites with thin, flaky links."""


def main() -> None:
    """Run the command line."""
    app()
