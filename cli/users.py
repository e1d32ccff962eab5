"""`meshchat user`: onboard, list and offboard people."""

from __future__ import annotations

from typing import Annotated

import typer
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
    ensure_identities,
    open_directory,
    read_password,
)
from meshchat.directory import Role, User

__all__ = ["user_app", "user_json"]

user_app = typer.Typer(help="Add, list and remove users.", no_args_is_help=True)


def user_json(user: User) -> dict[str, object]:
    """A user as JSON for scripts (never a hash or a secret)."""
    return {
        "name": user.name,
        "dept": user.dept,
        "role": user.role.value,
        "status": user.status.value,
        "display_name": user.display_name,
        "has_password": user.has_password,
        "created_at": user.created_at,
    }


@user_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The new user's name (a-z, 0-9, '-').")],
    dept: Annotated[str, typer.Option("--dept", help="Department (created when new).")],
    role: Annotated[Role, typer.Option("--role", help="Role of the user.")] = Role.MEMBER,
    display_name: Annotated[str, typer.Option("--display-name", help="Full name.")] = "",
    password_stdin: PasswordStdinOption = False,
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Onboard a user and create their identity key; --password-stdin also sets a password."""
    password = read_password(from_stdin=True) if password_stdin else None
    with open_directory(data) as directory:
        actor = actor_of(directory, as_user)
        user = directory.add_user(
            actor,
            name,
            dept=dept,
            role=role,
            password=password,
            display_name=display_name,
        )
        created = ensure_identities(data, directory)
    if json_output:
        emit_json(user_json(user) | {"identity_key": created is not None})
        return
    console.print(f"Added {user.name} ({user.role.value}, {user.dept}).")
    if created is None:
        console.print("The org has no keys yet: `meshchat up` creates them and the identity keys.")
    if not user.has_password:
        console.print("The account has no password yet: set one with `meshchat user password`.")


@user_app.command("password")
def password(
    name: Annotated[str, typer.Argument(help="Whose password to set.")],
    password_stdin: PasswordStdinOption = False,
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Set a user's password (admins for anyone, users for themselves)."""
    secret = read_password(from_stdin=password_stdin)
    with open_directory(data) as directory:
        directory.set_password(actor_of(directory, as_user), name, secret)
    console.print(f"Password of {name} set.")


@user_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="The user to offboard.")],
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Offboard a user: revoke credentials and devices, leave every group (groups rotate keys)."""
    with open_directory(data) as directory:
        left = directory.remove_user(actor_of(directory, as_user), name)
    if json_output:
        emit_json({"user": name, "status": "revoked", "left_groups": left})
        return
    console.print(
        f"Revoked {name}; left {len(left)} group(s){': ' if left else ''}{', '.join(left)}."
    )


@user_app.command("list")
def list_users(
    dept: Annotated[str | None, typer.Option("--dept", help="Only this department.")] = None,
    all_users: Annotated[bool, typer.Option("--all", help="Include revoked accounts.")] = False,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """List users."""
    with open_directory(data) as directory:
        users = directory.users(dept=dept, include_revoked=all_users)
    if json_output:
        emit_json([user_json(user) for user in users])
        return
    table = Table("user", "department", "role", "status", "password", "name")
    for user in users:
        table.add_row(
            user.name,
            user.dept,
            user.role.value,
            user.status.value,
            "yes" if user.has_password else "no",
            user.display_name,
        )
    console.print(table)
