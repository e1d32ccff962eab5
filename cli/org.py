"""`meshchat org`: create the org, and import its people from an HR export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from cli.common import (
    DEFAULT_DATA,
    AsOption,
    DataOption,
    JsonOption,
    PasswordStdinOption,
    actor_of,
    console,
    emit_json,
    open_directory,
    read_password,
)
from meshchat.directory import ImportPlan, Role, read_import

__all__ = ["org_app"]

org_app = typer.Typer(help="Create and import the org.", no_args_is_help=True)


@org_app.command("init")
def init(
    org: Annotated[str, typer.Option("--org", help="The org's name (a-z, 0-9, '-').")],
    admin: Annotated[
        str, typer.Option("--admin", help="Name of the first admin account.")
    ] = "admin",
    dept: Annotated[str, typer.Option("--dept", help="The admin's department.")] = "it",
    password_stdin: PasswordStdinOption = False,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Create the directory with the org, its first department and an admin account."""
    password = read_password(from_stdin=password_stdin)
    with open_directory(data, create=True) as directory:
        user = directory.init_org(org, admin=admin, password=password, dept=dept)
    if json_output:
        emit_json({"org": org, "admin": user.name, "dept": user.dept})
        return
    console.print(f"Created org [bold]{org}[/] with admin [bold]{user.name}[/] ({user.dept}).")
    console.print("Next: `meshchat user add NAME --dept DEPT`, then `meshchat up`.")


def _print_plan(plan: ImportPlan, *, dry_run: bool) -> None:
    verb = "would" if dry_run else "did"
    if plan.empty:
        console.print(f"Nothing to change: the directory already matches ({plan.unchanged} users).")
        return
    table = Table("change", "user", "details")
    for dept in plan.departments:
        table.add_row("new department", "", dept)
    for row in plan.onboard:
        role = (row.role or Role.MEMBER).value
        table.add_row("onboard", row.user, f"{row.dept}, {role}")
    for user, before, after in plan.move:
        table.add_row("move", user, f"{before} -> {after}")
    for user, old_role, new_role in plan.role:
        table.add_row("role", user, f"{old_role.value} -> {new_role.value}")
    for user, display_name in plan.rename:
        table.add_row("rename", user, display_name)
    for user in plan.offboard:
        table.add_row("offboard", user, "revoke, leave groups, rotate their keys")
    console.print(table)
    console.print(
        f"The import {verb} make {plan.changes} change(s); {plan.unchanged} user(s) unchanged."
    )


@org_app.command("import")
def import_org(
    file: Annotated[Path, typer.Argument(help="HR export: a .csv or .json file.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the changes, write nothing.")
    ] = False,
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Make the directory match an HR file: onboard, move, change roles, offboard.

    The file is the desired state. Columns (CSV header or JSON keys): user, dept, and optionally
    role and display_name. People missing from the file are offboarded; device accounts are
    never touched. A bad row is reported with its line number and nothing is written.
    """
    with open_directory(data) as directory:
        wanted = read_import(file)
        actor = actor_of(directory, as_user)
        if dry_run:
            plan = directory.plan_import(actor, wanted)
        else:
            preview = directory.plan_import(actor, wanted)
            with Progress(console=console, transient=True, disable=json_output) as progress:
                task = progress.add_task("importing", total=preview.changes)
                plan = directory.apply_import(
                    actor, wanted, progress=lambda done: progress.update(task, completed=done)
                )
    if json_output:
        emit_json({"dry_run": dry_run, **plan.as_json()})
        return
    _print_plan(plan, dry_run=dry_run)
