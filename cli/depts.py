"""`meshchat dept`: the org's departments."""

from __future__ import annotations

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
    open_directory,
)

__all__ = ["dept_app"]

dept_app = typer.Typer(help="Add and list departments.", no_args_is_help=True)


@dept_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The department's name (a-z, 0-9, '-').")],
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Add a department (HR imports only place people in known departments)."""
    with open_directory(data) as directory:
        directory.add_department(actor_of(directory, as_user), name)
    console.print(f"Added department {name}.")


@dept_app.command("list")
def list_depts(data: DataOption = DEFAULT_DATA, json_output: JsonOption = False) -> None:
    """List departments with their number of active users."""
    with open_directory(data) as directory:
        departments = directory.departments()
        counts = {d.name: len(directory.users(dept=d.name)) for d in departments}
    if json_output:
        emit_json([{"name": name, "users": count} for name, count in counts.items()])
        return
    table = Table("department", "users")
    for name, count in counts.items():
        table.add_row(name, str(count))
    console.print(table)
