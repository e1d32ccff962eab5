"""`meshchat org`: create the org, and import its people from an HR export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Final

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
    ensure_identities,
    fail,
    open_directory,
    read_password,
)
from meshchat.directory import ImportPlan, Role, read_import
from meshchat.directory.signing import OrgKeys, check_passphrase, generate_passphrase
from meshchat.errors import ConfigError

__all__ = ["org_app"]

org_app = typer.Typer(help="Create and import the org.", no_args_is_help=True)

ROOT_PASSPHRASE_ENV: Final = "MESHCHAT_ROOT_PASSPHRASE"  # noqa: S105  # a variable's name


def _root_passphrase(file: Path | None) -> tuple[str, bool]:
    """The root passphrase from the file, else the environment, else a new random one.

    Returns:
        The passphrase, and whether it was generated (and must be shown once).
    """
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"--root-passphrase-file {file}: cannot read it: {exc}", code=2)
        passphrase = text.splitlines()[0] if text.strip() else ""
        if not passphrase:
            fail(f"--root-passphrase-file {file}: the file holds no passphrase", code=2)
    elif os.environ.get(ROOT_PASSPHRASE_ENV):
        passphrase = os.environ[ROOT_PASSPHRASE_ENV]
    else:
        return generate_passphrase(), True
    try:
        return check_passphrase(passphrase), False
    except ConfigError as exc:
        fail(str(exc), code=2)


@org_app.command("init")
def init(
    org: Annotated[str, typer.Option("--org", help="The org's name (a-z, 0-9, '-').")],
    admin: Annotated[
        str, typer.Option("--admin", help="Name of the first admin account.")
    ] = "admin",
    dept: Annotated[str, typer.Option("--dept", help="The admin's department.")] = "it",
    root_passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--root-passphrase-file",
            help=(
                "Read the root passphrase (it protects the org root and compliance keys) from "
                f"this file's first line; else from ${ROOT_PASSPHRASE_ENV}; else one is "
                "generated and printed once."
            ),
        ),
    ] = None,
    password_stdin: PasswordStdinOption = False,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Create the directory with the org, its first department, an admin account and the org keys.

    The org keys (DATA/keys, private): the root key and the compliance key, sealed with the root
    passphrase; the directory's signing key; the geofence worker's roster key; an identity key
    for the admin. The root key's fingerprint is printed for clients to compare at login.
    """
    passphrase, generated = _root_passphrase(root_passphrase_file)
    password = read_password(from_stdin=password_stdin)
    if OrgKeys.exists(data):
        keys_path = OrgKeys.keys_path(data).absolute()
        fail(f"{keys_path} already holds org keys; they are never overwritten")
    with open_directory(data, create=True) as directory:
        user = directory.init_org(org, admin=admin, password=password, dept=dept)
        keys = OrgKeys.create(data, org, passphrase)
        keys.audit_creation(directory, actor=admin)
        keys.ensure_identities(directory, actor=admin)
    result: dict[str, object] = {
        "org": org,
        "admin": user.name,
        "dept": user.dept,
        "fingerprint": keys.fingerprint,
    }
    if json_output:
        emit_json(result | ({"root_passphrase": passphrase} if generated else {}))
        return
    console.print(f"Created org [bold]{org}[/] with admin [bold]{user.name}[/] ({user.dept}).")
    console.print(f"Org root key fingerprint: [bold]{keys.fingerprint}[/]", soft_wrap=True)
    if generated:
        console.print(
            "The root passphrase was generated and is shown only this once. Write this down "
            "and keep it offline: it unlocks the org root key and the compliance key, and "
            "nobody can recover it.\n"
            f"  root passphrase: {passphrase}",
            soft_wrap=True,
        )
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
    identities: list[str] | None = []
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
            identities = ensure_identities(data, directory)
    if json_output:
        emit_json({"dry_run": dry_run, **plan.as_json(), "identity_keys": identities or []})
        return
    _print_plan(plan, dry_run=dry_run)
    if identities:
        console.print(f"Created {len(identities)} identity key(s).")
    elif identities is None and plan.onboard:
        console.print("The org has no keys yet: `meshchat up` creates them and the identity keys.")
