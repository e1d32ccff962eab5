"""Run meshchat's embedded broker alone in this process, for the benchmark to measure.

The benchmark starts this script as a child process so the broker has its own interpreter (its
own core and a resident set psutil can read). It binds a free loopback port, prints
``PORT <n>`` on stdout once clients can connect, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from meshchat.broker import BrokerSettings, EmbeddedBroker


async def serve() -> None:
    """Serve on 127.0.0.1 until a termination signal arrives, then stop the broker cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with EmbeddedBroker(BrokerSettings(host="127.0.0.1", port=0)) as broker:
        print(f"PORT {broker.listener('mqtt').port}", flush=True)  # the parent reads it
        await stop.wait()


def main() -> int:
    """Silence amqtt (its per-client logging would cost throughput) and serve."""
    logging.basicConfig(level=logging.CRITICAL)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
