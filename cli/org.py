"""`meshchat org`: create the org (and, later in this issue, import it from HR)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import (
    DEFAULT_DATA,
    DataOption,
    JsonOption,
    PasswordStdinOption,
    console,
    emit_json,
    open_directory,
    read_password,
)

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
