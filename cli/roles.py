"""`meshchat role`: who holds which role, and what each role may do."""

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
from meshchat.directory import DEPARTMENT_SCOPED, ROLE_PERMISSIONS, Role

__all__ = ["role_app"]

role_app = typer.Typer(help="Set roles and show what each role may do.", no_args_is_help=True)


@role_app.command("set")
def set_role(
    user: Annotated[str, typer.Argument(help="Whose role to change.")],
    role: Annotated[Role, typer.Argument(help="The new role.")],
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Give a user another role (admin, manager of their department, member, device)."""
    with open_directory(data) as directory:
        updated = directory.set_role(actor_of(directory, as_user), user, role)
    console.print(f"{updated.name} is now {updated.role.value} ({updated.dept}).")


@role_app.command("list")
def list_roles(json_output: JsonOption = False) -> None:
    """Show every role's permissions; managers hold theirs for their own department only."""
    rows = {
        role.value: sorted(
            f"{p.value} (own department)"
            if role is Role.MANAGER and p in DEPARTMENT_SCOPED
            else p.value
            for p in ROLE_PERMISSIONS[role]
        )
        for role in Role
    }
    if json_output:
        emit_json(rows)
        return
    table = Table("role", "permissions")
    for role, permissions in rows.items():
        table.add_row(role, "\n".join(permissions) or "-")
    console.print(table)
