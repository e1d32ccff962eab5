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
from meshchat.broker import MOSQUITTO_SERVICES, MosquittoFiles, MosquittoOptions, mosquitto_files
from meshchat.directory.credentials import MOSQUITTO_TOKEN_ITERATIONS, mosquitto_hash, new_token
from meshchat.directory.policy import SERVICE_PREFIX
from meshchat.errors import MeshchatError
from meshchat.files import write_private

__all__ = ["deploy_app"]

deploy_app = typer.Typer(
    help="Configuration for an external broker, generated from the directory.",
    no_args_is_help=True,
)

SERVICES_DIR: Final = "services"
"""Where `deploy mosquitto` keeps the secrets of meshchat's service accounts (DATA/services)."""
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


def _service_secret(data: Path, name: str) -> tuple[Path, str]:
    """The secret file of the service account ``svc.NAME`` (made once) and its Mosquitto hash.

    The secret stays in the data directory (0600): `meshchat archive` and `meshchat geofence`
    read it with ``--password-file``. Its hash is kept beside it so that running the command
    again writes the same password file.
    """
    folder = data / SERVICES_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret_path, hash_path = folder / f"{name}.secret", folder / f"{name}.mosquitto"
    if not secret_path.exists():
        write_private(secret_path, (new_token() + "\n").encode("utf-8"))
        hash_path.unlink(missing_ok=True)
    if not hash_path.exists():
        secret = secret_path.read_text(encoding="utf-8").strip()
        hashed = mosquitto_hash(secret, iterations=MOSQUITTO_TOKEN_ITERATIONS)
        write_private(hash_path, (hashed + "\n").encode("utf-8"))
    return secret_path, hash_path.read_text(encoding="utf-8").strip()


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
    services: Annotated[
        bool,
        typer.Option(
            "--services/--no-services",
            help="Accounts for meshchat's archiver and geofence worker (svc.archive, "
            "svc.geofence), their secrets in DATA/services/.",
        ),
    ] = True,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Write mosquitto.conf, a password file and an ACL file that enforce the directory.

    With the service accounts, run the archiver and the geofence worker against Mosquitto:
    meshchat archive --broker mqtt://HOST:PORT --username svc.archive --password-file
    DATA/services/archive.secret (and the same for geofence).
    """
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
    secrets: dict[str, tuple[Path, str]] = {}
    if services:
        try:
            secrets = {name: _service_secret(data, name) for name in MOSQUITTO_SERVICES}
        except OSError as exc:
            fail(f"cannot keep the service secrets in {data / SERVICES_DIR}: {exc.strerror or exc}")
    with open_directory(data) as directory:
        snapshot = directory.snapshot()
        credentials = directory.broker_credentials()
        files = mosquitto_files(
            snapshot,
            credentials,
            options,
            now=time.time(),
            services={name: hashed for name, (_, hashed) in secrets.items()},
        )
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
                "services": {
                    name: {"account": f"{SERVICE_PREFIX}{name}", "password_file": str(path)}
                    for name, (path, _) in secrets.items()
                },
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
    url = f"mqtt://{options.host}:{options.port}"
    for name, (path, _) in secrets.items():
        console.print(
            f"The {name} service logs in as {SERVICE_PREFIX}{name}:\n  meshchat {name} "
            f"--broker {url} --username {SERVICE_PREFIX}{name} --password-file {path}",
            soft_wrap=True,
        )
    console.print(
        f"Start Mosquitto with:\n  {start}\n"
        "After directory changes, run this command again and send Mosquitto SIGHUP "
        "(kill -HUP PID) to reload the password and ACL files.",
        soft_wrap=True,
    )
