"""Run meshchat's site broker, with authentication and the topic ACL on, alone in this process.

The broker is `meshchat.server.SiteServer`'s: the embedded broker behind the directory's
`AccessGate` (device tokens checked at CONNECT, every subscribe, publish and delivery decided by
the access policy, the directory file watched for changes). The benchmark builds the directory
once per run (`brokers.start_site`) and this script copies it into a fresh data directory, so
every broker starts from the same state.

Usage::

    site_broker.py --directory TEMPLATE.db --data DIR [--durable]

It prints ``PORT <n> <how persistent sessions are kept>`` on stdout once clients can connect and
runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any

from embedded_broker import serve_until_signalled
from roster import ORG

from meshchat.broker import BrokerSettings, ConnectLimit
from meshchat.datadir import DataDir
from meshchat.directory import DIRECTORY_FILE
from meshchat.server import SiteServer

CONNECT_LIMIT = ConnectLimit(per_address=1_000_000)
"""Every load-generator client connects from 127.0.0.1: the per-address limit (60 per 10 s by
default, against connection floods) would refuse most of the idle clients."""


def _copy_directory(template: Path, data: DataDir) -> None:
    """Copy the directory database with SQLite's backup API (safe whatever its journal holds)."""
    data.ensure()
    source = sqlite3.connect(f"file:{template}?mode=ro", uri=True)
    target = sqlite3.connect(data.path / DIRECTORY_FILE)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def _server(data: DataDir, *, durable: bool) -> tuple[SiteServer, str]:
    """The site server, with the broker's durable store only when asked for and available.

    Returns:
        The server, and how it keeps persistent sessions (for the benchmark's footer).
    """
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
    options: dict[str, Any] = {"org": ORG, "connect_limit": CONNECT_LIMIT}
    has_store = "state_dir" in {f.name for f in dataclasses.fields(BrokerSettings)}
    if "durable" in inspect.signature(SiteServer).parameters:
        # A durable site server keeps the broker's state in its data directory by default; the
        # rows with online subscribers compare with raw amqtt, which keeps it in memory.
        options["durable"] = durable
    if not durable:
        sessions = "in memory"
    elif has_store:
        settings["state_dir"] = data.path / "broker-state"
        sessions = "on disk (BrokerSettings.state_dir)"
    else:
        sessions = "in memory (BrokerSettings has no state_dir yet)"
    return SiteServer(data, BrokerSettings(**settings), **options), sessions


async def serve(template: Path, data: DataDir, *, durable: bool) -> None:
    """Serve on 127.0.0.1 until a termination signal arrives, then stop the server cleanly."""
    _copy_directory(template, data)
    server, sessions = _server(data, durable=durable)
    async with server:
        await serve_until_signalled(server.broker.listener("mqtt").port, sessions)


def main() -> int:
    """Parse the arguments, silence amqtt's logging, serve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--directory", type=Path, required=True, help="the directory to copy")
    parser.add_argument("--data", type=Path, required=True, help="a fresh data directory")
    parser.add_argument("--durable", action="store_true", help="keep sessions in state_dir")
    args = parser.parse_args()
    # Warnings (refused connections and topics) reach the log the benchmark keeps; amqtt's
    # per-client logging would cost throughput.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    asyncio.run(serve(args.directory, DataDir(args.data), durable=args.durable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
