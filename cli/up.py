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
from meshchat.server import SiteServer

__all__ = ["up"]


async def _serve(server: SiteServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with server:
            console.print(f"meshchat up: data directory {server.data.path}", soft_wrap=True)
            for listener in server.listeners:
                console.print(f"  listening on {listener.url}", soft_wrap=True)
            if server.broker.settings.loopback_only:
                note = "anonymous clients are accepted, from this machine only"
            else:
                note = (
                    f"listening on {server.broker.settings.host}, but anonymous clients are "
                    "accepted from loopback addresses only"
                )
            console.print(
                f"[yellow]warning:[/] no authentication yet (it comes with the directory): {note}",
                soft_wrap=True,
            )
            console.print("Press Ctrl-C to stop.")
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
    data: DataOption = DEFAULT_DATA,
    verbose: VerboseOption = 0,
) -> None:
    """Start the site server: the embedded MQTT broker, on this machine, until Ctrl-C.

    It prints where it listens. TLS (1.2 or newer) needs both --tls-cert and --tls-key.
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
        asyncio.run(_serve(SiteServer(DataDir(data), settings)))
    except MeshchatError as exc:
        fail(str(exc))
