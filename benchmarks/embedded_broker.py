"""Run meshchat's embedded broker alone in this process, for the benchmark to measure.

The benchmark starts this script as a child process so the broker has its own interpreter (its
own core and a resident set psutil can read). It binds a free loopback port, prints
``PORT <n>`` on stdout once clients can connect, and runs until SIGTERM or SIGINT. This is the
broker without authentication (anonymous clients from loopback only); ``site_broker.py`` runs it
with the directory's authentication and ACL, ``raw_amqtt_broker.py`` runs plain amqtt.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from meshchat.broker import BrokerSettings, EmbeddedBroker


async def serve_until_signalled(port: int, sessions: str = "") -> None:
    """Tell the parent `port` (and how persistent sessions are kept), then wait for a signal.

    The parent reads the line ``PORT <n> [<sessions>]`` from stdout.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"PORT {port} {sessions}".rstrip(), flush=True)
    await stop.wait()


async def serve() -> None:
    """Serve on 127.0.0.1 until a termination signal arrives, then stop the broker cleanly."""
    async with EmbeddedBroker(BrokerSettings(host="127.0.0.1", port=0)) as broker:
        await serve_until_signalled(broker.listener("mqtt").port)


def main() -> int:
    """Silence amqtt (its per-client logging would cost throughput) and serve."""
    logging.basicConfig(level=logging.CRITICAL)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
