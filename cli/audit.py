"""`meshchat audit`: read and verify the hash-chained log of admin actions."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer
from rich.table import Table

from cli.audit_decrypt import decrypt
from cli.common import (
    DEFAULT_DATA,
    DataOption,
    JsonOption,
    console,
    emit_json,
    fail,
    open_directory,
)
from meshchat.errors import AuditChainError

__all__ = ["audit_app"]

audit_app = typer.Typer(
    help="Show and verify the audit log; read archive exports as the auditor.",
    no_args_is_help=True,
)
audit_app.command("decrypt")(decrypt)


@audit_app.command("show")
def show(
    last: Annotated[
        int | None, typer.Option("--last", help="Only the last N entries.", min=1)
    ] = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Show admin actions, oldest first."""
    with open_directory(data) as directory:
        entries = directory.audit_entries(last=last)
    if json_output:
        emit_json(
            [
                {
                    "seq": e.seq,
                    "ts": e.ts,
                    "actor": e.actor,
                    "action": e.action,
                    "target": e.target,
                    "details": e.details_dict,
                    "hash": e.hash,
                }
                for e in entries
            ]
        )
        return
    table = Table("#", "time (UTC)", "actor", "action", "target", "details")
    for e in entries:
        when = dt.datetime.fromtimestamp(e.ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        details = ", ".join(f"{k}={v}" for k, v in e.details_dict.items())
        table.add_row(str(e.seq), when, e.actor, e.action, e.target, details)
    console.print(table)


@audit_app.command("verify")
def verify(data: DataOption = DEFAULT_DATA, json_output: JsonOption = False) -> None:
    """Check the hash chain: exits 1 and names the first bad row if anything was tampered with."""
    with open_directory(data) as directory:
        try:
            count = directory.verify_audit()
        except AuditChainError as exc:
            if json_output:
                emit_json({"ok": False, "first_bad_row": exc.seq, "error": str(exc)})
                raise typer.Exit(1) from exc
            fail(str(exc))
    if json_output:
        emit_json({"ok": True, "rows": count})
        return
    console.print(f"audit log intact: {count} rows verified.")
