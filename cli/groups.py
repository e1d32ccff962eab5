"""`meshchat group`: create groups, manage members, show policy."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Literal

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
    fail,
    open_directory,
)
from meshchat.directory import Group, GroupKind
from meshchat.errors import ConfigError
from meshchat.timeutil import parse_days, parse_duration

__all__ = ["group_app", "group_json"]

group_app = typer.Typer(help="Create groups, add and remove members.", no_args_is_help=True)

GroupArg = Annotated[str, typer.Argument(help="The group, as DEPT/GROUP.")]


def group_json(group: Group) -> dict[str, object]:
    """A group and its policy as JSON for scripts."""
    return {
        "path": group.path,
        "kind": group.kind.value,
        "created_by": group.created_by,
        "created_at": group.created_at,
        "expires_at": group.expires_at,
        "announcement": group.announcement,
        "post_roles": sorted(role.value for role in group.post_roles),
        "retention_days": group.retention_days,
        "legal_hold": group.legal_hold,
        "compliance": group.compliance,
        "rotation_pending": group.rotation_pending,
        "policy_version": group.policy_version,
        "members": sorted(group.members),
    }


@group_app.command("create")
def create(
    path: GroupArg,
    private: Annotated[bool, typer.Option("--private", help="Invisible to non-members.")] = False,
    temporary: Annotated[
        bool, typer.Option("--temporary", help="Expires (needs --expires).")
    ] = False,
    expires: Annotated[
        str | None, typer.Option("--expires", help="Lifetime of a temporary group, e.g. 7d.")
    ] = None,
    retention: Annotated[
        str | None, typer.Option("--retention", help="Keep history this long, e.g. 30d.")
    ] = None,
    compliance: Annotated[
        bool, typer.Option("--compliance", help="Give the compliance key a copy of every chain.")
    ] = False,
    announcement: Annotated[
        bool, typer.Option("--announcement", help="Only admins and managers may post.")
    ] = False,
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Create a group (admins anywhere, managers in their own department)."""
    if private and temporary:
        fail("a group is --private or --temporary, not both", code=2)
    if temporary != (expires is not None):
        fail("--temporary and --expires go together", code=2)
    kind = GroupKind.PRIVATE if private else GroupKind.TEMPORARY if temporary else GroupKind.PUBLIC
    try:
        expires_at = time.time() + parse_duration(expires) if expires else None
        retention_days = parse_days(retention) if retention else None
    except ConfigError as exc:
        fail(str(exc), code=2)
    with open_directory(data) as directory:
        group = directory.create_group(
            actor_of(directory, as_user),
            path,
            kind=kind,
            expires_at=expires_at,
            retention_days=retention_days,
            compliance=compliance,
            announcement=announcement,
        )
    if json_output:
        emit_json(group_json(group))
        return
    console.print(f"Created {group.kind.value} group {group.path}.")


@group_app.command("add")
def add(
    path: GroupArg,
    users: Annotated[list[str], typer.Argument(help="Users to add.")],
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Add members to a group (they get the current key position; adds do not rotate)."""
    with open_directory(data) as directory:
        added = directory.add_members(actor_of(directory, as_user), path, users)
    already = [user for user in users if user not in added]
    console.print(f"Added {', '.join(added) or 'nobody'} to {path}.")
    if already:
        console.print(f"Already members: {', '.join(already)}.")


@group_app.command("remove")
def remove(
    path: GroupArg,
    users: Annotated[list[str], typer.Argument(help="Members to remove.")],
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Remove members from a group; the group's keys rotate before the next message."""
    with open_directory(data) as directory:
        removed = directory.remove_members(actor_of(directory, as_user), path, users)
    console.print(f"Removed {', '.join(removed) or 'nobody'} from {path}.")


@group_app.command("policy")
def policy(
    path: GroupArg,
    retention: Annotated[
        str | None,
        typer.Option("--retention", help="Keep history this long (e.g. 90d), or 'forever'."),
    ] = None,
    legal_hold: Annotated[
        bool | None,
        typer.Option(
            "--legal-hold/--no-legal-hold", help="Keep everything regardless of retention."
        ),
    ] = None,
    compliance: Annotated[
        bool | None,
        typer.Option("--compliance/--no-compliance", help="Compliance copy of every chain."),
    ] = None,
    as_user: AsOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Change a group's retention, legal hold or compliance copy (admins; audited)."""
    days: int | Literal["keep"] | None = "keep"
    if retention is not None:
        try:
            days = None if retention == "forever" else parse_days(retention)
        except ConfigError as exc:
            fail(str(exc), code=2)
    with open_directory(data) as directory:
        group = directory.set_policy(
            actor_of(directory, as_user),
            path,
            retention_days=days,
            legal_hold=legal_hold,
            compliance=compliance,
        )
    if json_output:
        emit_json(group_json(group))
        return
    retention_text = f"{group.retention_days} days" if group.retention_days else "forever"
    console.print(
        f"{group.path}: retention {retention_text}, legal hold "
        f"{'on' if group.legal_hold else 'off'}, compliance {'on' if group.compliance else 'off'}."
    )


@group_app.command("show")
def show(path: GroupArg, data: DataOption = DEFAULT_DATA, json_output: JsonOption = False) -> None:
    """Show a group's policy and current members."""
    with open_directory(data) as directory:
        group = directory.group(path)
    if json_output:
        emit_json(group_json(group))
        return
    table = Table(show_header=False)
    for key, value in group_json(group).items():
        shown = ", ".join(value) if isinstance(value, list) else value
        if key.endswith("_at") and isinstance(value, int | float):
            shown = datetime.fromtimestamp(value).astimezone().strftime("%Y-%m-%d %H:%M %Z")
        table.add_row(key.replace("_", " "), "-" if shown in {None, ""} else str(shown))
    console.print(table)


@group_app.command("list")
def list_groups(
    member: Annotated[
        str | None, typer.Option("--member", help="Only groups of this user.")
    ] = None,
    dept: Annotated[str | None, typer.Option("--dept", help="Only this department.")] = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """List groups with their kind and member count."""
    with open_directory(data) as directory:
        groups = directory.groups(member=member, dept=dept)
    if json_output:
        emit_json([group_json(group) for group in groups])
        return
    table = Table("group", "kind", "members", "retention", "flags")
    for group in groups:
        flags = [
            name
            for name, on in (
                ("announcement", group.announcement),
                ("compliance", group.compliance),
                ("legal hold", group.legal_hold),
                ("rotation pending", group.rotation_pending),
            )
            if on
        ]
        retention = f"{group.retention_days}d" if group.retention_days else "-"
        table.add_row(
            group.path, group.kind.value, str(len(group.members)), retention, ", ".join(flags)
        )
    console.print(table)
