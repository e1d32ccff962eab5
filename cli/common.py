"""Options, output and logging shared by every command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler

from meshchat.datadir import DEFAULT_DATA_DIR, ENV_VAR

__all__ = ["DataOption", "VerboseOption", "console", "err_console", "fail", "setup_logging"]

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

DataOption = Annotated[
    Path,
    typer.Option(
        "--data",
        envvar=ENV_VAR,
        help="Data directory of the site server.",
        show_default=True,
    ),
]
DEFAULT_DATA = DEFAULT_DATA_DIR

VerboseOption = Annotated[
    int,
    typer.Option("--verbose", "-v", count=True, help="More log output (-vv for the broker's own)."),
]


def setup_logging(verbose: int) -> None:
    """Log warnings (or more with -v) to stderr; amqtt's own chatter only with -vv."""
    handler = RichHandler(console=err_console, show_time=verbose > 0, show_path=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("meshchat").setLevel(logging.INFO if verbose else logging.WARNING)
    # amqtt logs failures it also raises (with tracebacks); we report those once, as one line.
    logging.getLogger("amqtt").setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)
    logging.getLogger("transitions").setLevel(logging.WARNING if verbose > 1 else logging.CRITICAL)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line and exit with `code`."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)
