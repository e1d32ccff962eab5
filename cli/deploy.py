"""`meshchat deploy`: configuration for external brokers, generated from the directory."""

from __future__ import annotations

import contextlib
import os
import pwd
import tempfile
import time
from pathlib import Path
from typing import Annotated, Final

import typer

from cli.common import (
    DEFAULT_DATA,
    DataOption,
    JsonOption,
    console,
    emit_json,
    fail,
    open_directory,
)
from meshchat.broker import MosquittoFiles, MosquittoOptions, mosquitto_files
from meshchat.errors import MeshchatError

__all__ = ["deploy_app"]

deploy_app = typer.Typer(
    help="Configuration for an external broker, generated from the directory.",
    no_args_is_help=True,
)

MOSQUITTO_DEFAULT_USER: Final = "mosquitto"
"""The user Mosquitto switches to when started as root and its config names none."""


def _owner(run_as: str | None) -> tuple[int, int] | None:
    """Who must own the secret files so Mosquitto can read them, or None for whoever runs this.

    Mosquitto started as root reads the password and ACL files only after switching to its
    run-as user; started as anyone else it stays that user, who owns what this command writes.
    """
    if os.geteuid() != 0:
        return None
    name = run_as or MOSQUITTO_DEFAULT_USER
    if name == "root":
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        fail(f"there is no system user {name!r} for Mosquitto to run as: pass --run-as USER")
    return entry.pw_uid, entry.pw_gid


def _write_atomically(path: Path, text: str, mode: int, owner: tuple[int, int] | None) -> None:
    """Replace `path` in one step, so a reloading Mosquitto never reads half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            if owner is not None:
                os.fchown(handle.fileno(), *owner)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise


def _write(options: MosquittoOptions, files: MosquittoFiles, owner: tuple[int, int] | None) -> None:
    out = options.out_dir
    created = not out.exists()
    out.mkdir(mode=0o750, parents=True, exist_ok=True)
    if created and owner is not None:
        os.chown(out, -1, owner[1])  # Mosquitto's group may enter; only root may change it
    options.persistence_path.mkdir(mode=0o700, exist_ok=True)
    if owner is not None:
        os.chown(options.persistence_path, *owner)
    _write_atomically(options.password_path, files.passwords, 0o600, owner)
    _write_atomically(options.acl_path, files.acl, 0o600, owner)
    _write_atomically(options.conf_path, files.conf, 0o644, None)


@deploy_app.command("mosquitto")
def mosquitto(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Directory for mosquitto.conf, the password file and the ACL file.",
        ),
    ],
    host: Annotated[str, typer.Option(help="Address Mosquitto listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="MQTT over TCP.")] = 1883,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", help="PEM certificate chain: also listen for MQTT over TLS."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")
    ] = None,
    tls_port: Annotated[int, typer.Option("--tls-port", help="MQTT over TLS.")] = 8883,
    run_as: Annotated[
        str | None,
        typer.Option(
            "--run-as",
            help="System user Mosquitto switches to when started as root (default: mosquitto); "
            "run as root, this command makes the secret files theirs.",
        ),
    ] = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Write mosquitto.conf, a password file and an ACL file that enforce the directory."""
    try:
        options = MosquittoOptions(
            out_dir=out.expanduser().absolute(),
            host=host,
            port=port,
            tls_cert=tls_cert.expanduser().absolute() if tls_cert else None,
            tls_key=tls_key.expanduser().absolute() if tls_key else None,
            tls_port=tls_port,
            run_as=run_as,
        )
    except MeshchatError as exc:
        fail(str(exc), code=2)
    owner = _owner(run_as)
    with open_directory(data) as directory:
        snapshot = directory.snapshot()
        credentials = directory.broker_credentials()
        files = mosquitto_files(snapshot, credentials, options, now=time.time())
    try:
        _write(options, files, owner)
    except OSError as exc:
        fail(f"cannot write to {options.out_dir}: {exc.strerror or exc}")
    start = f"mosquitto -c {options.conf_path}"
    if json_output:
        emit_json(
            {
                "org": snapshot.org,
                "out": str(options.out_dir),
                "files": {
                    "conf": str(options.conf_path),
                    "passwords": str(options.password_path),
                    "acl": str(options.acl_path),
                    "persistence": str(options.persistence_path),
                },
                "accounts": list(files.accounts),
                "unsupported_devices": list(files.unsupported_devices),
                "start": start,
            }
        )
        return
    console.print(
        f"Wrote {options.conf_path}, {options.password_path} (0600) and {options.acl_path} "
        f"(0600) for {len(files.accounts)} accounts of the org {snapshot.org}.",
        soft_wrap=True,
    )
    if owner is not None:
        console.print(
            f"The password and ACL files belong to {run_as or MOSQUITTO_DEFAULT_USER}, the user "
            "Mosquitto switches to; every directory above them must let that user in.",
            soft_wrap=True,
        )
    if files.unsupported_devices:
        console.print(
            "[bold yellow]note:[/] devices registered to a person cannot log in to Mosquitto: "
            f"{', '.join(files.unsupported_devices)}",
            soft_wrap=True,
        )
    console.print(
        f"Start Mosquitto with:\n  {start}\n"
        "After directory changes, run this command again and send Mosquitto SIGHUP "
        "(kill -HUP PID) to reload the password and ACL files.",
        soft_wrap=True,
    )
