"""The Typer application behind the `meshchat` console script."""

from __future__ import annotations

from typing import Annotated

import typer

import meshchat
from cli.common import console
from cli.up import up

__all__ = ["app", "main"]

app = typer.Typer(
    name="meshchat",
    help="meshchat: end-to-end encrypted messaging over MQTT for sites with thin, flaky links.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(up)


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
