"""`meshchat up`: run the site server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

from cli.common import DEFAULT_DATA, DataOption, VerboseOption, console, fail, setup_logging
from meshchat.broker import BrokerSettings, TlsFiles
from meshchat.datadir import DataDir
from meshchat.errors import MeshchatError
from meshchat.server import DEFAULT_ORG, SiteServer

__all__ = ["up"]


def _print_start(server: SiteServer) -> None:
    console.print(f"meshchat up: data directory {server.data.path}", soft_wrap=True)
    for listener in server.listeners:
        console.print(f"  listening on {listener.url}", soft_wrap=True)
    if server.anonymous:
        settings = server.broker.settings
        where = "this machine" if settings.loopback_only else "loopback addresses"
        console.print(
            "[bold yellow]warning:[/] --anonymous: no authentication and no access control; "
            f"anyone on {where} may read and write every topic",
            soft_wrap=True,
        )
    elif server.watcher is not None:
        org = server.watcher.policy.snapshot.org
        console.print(f"  org {org}: clients log in with directory accounts", soft_wrap=True)
    if server.bootstrap is not None:
        boot = server.bootstrap
        # The admin commands must find the same data directory as this server.
        data = "" if server.data.path == DEFAULT_DATA.absolute() else f" --data {server.data.path}"
        console.print(
            f"\nCreated the org [bold]{boot.org}[/] and its admin account. The password is shown "
            "only this once:\n"
            f"  user:     {boot.admin}\n"
            f"  password: {boot.password}\n"
            "Next steps, in another terminal:\n"
            f"  meshchat user add alice --dept ops --password-stdin{data}\n"
            f"  meshchat group create ops/general{data} && "
            f"meshchat group add ops/general alice{data}\n"
            "MQTT clients log in with a user name and password and a client id that starts "
            "with the user name and a dot, e.g. `mosquitto_sub -u alice -P PASSWORD "
            f"-i alice.sub -t mc/{boot.org}/ops/general`.\n",
            soft_wrap=True,
        )
    if server.new_keys is not None:
        keys = server.new_keys
        console.print(
            f"Created the keys of org [bold]{keys.org}[/] in {server.data.path / 'keys'}.\n"
            f"  root key fingerprint: {keys.fingerprint}\n"
            f"  root passphrase:      {keys.root_passphrase}\n"
            "The root passphrase is shown only this once. Write this down and keep it offline: "
            "it unlocks the org root key and the compliance key, and nobody can recover it.\n",
            soft_wrap=True,
        )
    console.print("Press Ctrl-C to stop.")


async def _serve(server: SiteServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with server:
            _print_start(server)
            await stop.wait()
            console.print("stopping ...")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    console.print("stopped.")


def up(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="MQTT over TCP; 0 picks a free port.")] = 1883,
    ws_port: Annotated[
        int | None, typer.Option("--ws-port", help="Also listen for MQTT over WebSocket here.")
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", help="PEM certificate chain: also listen for MQTT over TLS."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")
    ] = None,
    tls_port: Annotated[
        int, typer.Option("--tls-port", help="MQTT over TLS (with --tls-cert).")
    ] = 8883,
    wss_port: Annotated[
        int | None,
        typer.Option(
            "--wss-port",
            help="Secure WebSocket (with --tls-cert and --ws-port); default: the ws port + 1.",
        ),
    ] = None,
    org: Annotated[
        str, typer.Option("--org", help="On a first run: the org to create.")
    ] = DEFAULT_ORG,
    anonymous: Annotated[
        bool,
        typer.Option(
            "--anonymous",
            help="No authentication or access control (loopback clients only). For tests only.",
        ),
    ] = False,
    data: DataOption = DEFAULT_DATA,
    verbose: VerboseOption = 0,
) -> None:
    """Start the site server: the embedded MQTT broker and the org directory, until Ctrl-C.

    On a first run it creates the org and an admin account and prints the admin's password
    once; when the org has no keys yet, it creates them and prints the root passphrase once.
    Clients log in with directory accounts; the broker enforces group membership and roles.
    TLS (1.2 or newer) needs both --tls-cert and --tls-key.
    """
    setup_logging(verbose)
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together: give both or neither", code=2)
    try:
        settings = BrokerSettings(
            host=host,
            port=port,
            ws_port=ws_port,
            tls=TlsFiles(tls_cert, tls_key) if tls_cert and tls_key else None,
            tls_port=tls_port,
            wss_port=wss_port,
        )
        server = SiteServer(DataDir(data), settings, org=org, anonymous=anonymous)
        asyncio.run(_serve(server))
    except MeshchatError as exc:
        fail(str(exc))
