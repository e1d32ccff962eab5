"""Options, output and logging shared by every command."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler

from meshchat.datadir import DEFAULT_DATA_DIR, ENV_VAR, DataDir
from meshchat.directory import DIRECTORY_FILE, Directory
from meshchat.directory.signing import OrgKeys
from meshchat.errors import MeshchatError
from meshchat.server import RUNTIME_FILE

__all__ = [
    "AsOption",
    "DataOption",
    "JsonOption",
    "PasswordStdinOption",
    "VerboseOption",
    "actor_of",
    "console",
    "emit_json",
    "ensure_identities",
    "err_console",
    "fail",
    "local_broker",
    "open_directory",
    "read_password",
    "read_password_file",
    "setup_logging",
]

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


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
AsOption = Annotated[
    str | None,
    typer.Option(
        "--as",
        envvar="MESHCHAT_AS",
        help="Act as this user (default: the admin `org init` created).",
    ),
]
PasswordStdinOption = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
]


def emit_json(value: object) -> None:
    """Print `value` as JSON on stdout, for scripts."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def read_password(*, from_stdin: bool, confirm: bool = True) -> str:
    """A password from stdin's first line, or typed twice at a terminal prompt."""
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            fail("--password-stdin: stdin held no password", code=2)
        return line
    if not sys.stdin.isatty():
        fail("no terminal to ask for a password: pass it with --password-stdin", code=2)
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=confirm)
    return password


def local_broker(data: Path) -> str | None:
    """The TCP listener of a `meshchat up` running from `data` (from its runtime file), if any."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        state = json.loads((data / RUNTIME_FILE).read_text(encoding="utf-8"))
        for url in state["listeners"]:
            if str(url).startswith("mqtt://"):
                return str(url).replace("0.0.0.0", "127.0.0.1")  # noqa: S104  # a URL, not a bind
    return None


def read_password_file(path: Path) -> str:
    """The first line of a password file (`--password-file`), or one clear error (exit 2)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        fail(f"cannot read a password from {path}: {exc}", code=2)


@contextlib.contextmanager
def open_directory(data: Path, *, create: bool = False) -> Iterator[Directory]:
    """The directory of a data directory; every meshchat error becomes one `error:` line."""
    directory_file = data / DIRECTORY_FILE
    if not create and not directory_file.exists():
        fail(f"no directory in {data.absolute()}: run `meshchat org init --org NAME` first")
    try:
        DataDir(data).ensure()
        with Directory(directory_file) as directory:
            yield directory
    except (MeshchatError, ValueError) as exc:
        fail(str(exc))


def actor_of(directory: Directory, as_user: str | None) -> str:
    """The user an admin command acts as."""
    return as_user or directory.default_actor()


def ensure_identities(data: Path, directory: Directory) -> list[str] | None:
    """Create identity keys for users who have none; None when the org has no keys yet.

    An org created before it had keys gets them (and every identity key) at the next
    `meshchat up`.
    """
    if not OrgKeys.exists(data):
        return None
    return OrgKeys.open(data).ensure_identities(directory)
