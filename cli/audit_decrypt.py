"""`meshchat audit decrypt`: an auditor reads an archive export with the org compliance key."""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from cli.common import DEFAULT_DATA, DataOption, JsonOption, console, emit_json, fail
from meshchat.archive import read_export
from meshchat.auditor import AuditedMessage, audit_export
from meshchat.datadir import DataDir
from meshchat.directory.signing import OrgKeys
from meshchat.errors import MeshchatError

__all__ = ["PASSPHRASE_ENV", "decrypt"]

PASSPHRASE_ENV = "MESHCHAT_ROOT_PASSPHRASE"  # noqa: S105  # the variable's name, not a secret


def _passphrase(path: Path | None) -> str:
    """The root passphrase: from a file, the environment, or a prompt, in that order."""
    if path is not None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read the root passphrase from {path}: {exc}", code=2)
        if not lines or not lines[0]:
            fail(f"{path} holds no passphrase on its first line", code=2)
        return lines[0]
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env:
        return from_env
    if not sys.stdin.isatty():
        fail(f"no root passphrase: give --root-passphrase-file or set {PASSPHRASE_ENV}", code=2)
    passphrase: str = typer.prompt("Root passphrase", hide_input=True)
    return passphrase


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _content(message: AuditedMessage) -> str:
    if not message.readable:
        return f"not readable: {message.reason}"
    shown = [f"{len(v)} bytes" if isinstance(v, bytes) else str(v) for v in message.fields]
    return " | ".join(shown)


def decrypt(
    export: Annotated[Path, typer.Argument(help="An export of `meshchat archive export`.")],
    root_passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--root-passphrase-file",
            help=f"A file whose first line is the root passphrase (else ${PASSPHRASE_ENV}, "
            "else a prompt).",
        ),
    ] = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Read an archive export as the auditor: who said what, and when.

    Unseals the org compliance key (DATA/keys) with the root passphrase, checks the export's
    integrity, verifies every sender against the archived key records and decrypts each group
    message whose chain has a compliance copy; the others are listed as not readable.
    """
    try:
        header, lines = read_export(export)
        keys = OrgKeys.open(DataDir(data).path)
        secret = keys.compliance_secret(_passphrase(root_passphrase_file))
        report = audit_export(header, lines, keys.trust, secret)
    except MeshchatError as exc:
        fail(str(exc))
    if json_output:
        emit_json(
            {
                "org": header.org,
                "group": header.group,
                "since": header.since,
                "until": header.until,
                "messages": [message.as_dict() for message in report.messages],
                "readable": report.readable,
                "refused": report.refused,
            }
        )
        return
    console.print(f"{header.org} {header.group}: {export}", soft_wrap=True)
    for message in report.messages:
        who = f"{message.user} ({message.device})" if message.readable else "?"
        line = Text(f"{_when(message.received_at)}  {who}  ")
        line.append(f"{message.kind}: " if message.kind else "", style="dim")
        line.append(_content(message), style="" if message.readable else "yellow")
        console.print(line, soft_wrap=True)
    console.print(f"{report.readable} of {len(report.messages)} messages readable.")
    for refusal in report.refused:
        console.print(Text(f"refused: {refusal}", style="yellow"), soft_wrap=True)
