"""Run a plain amqtt broker alone in this process: the reference of the 95% budget.

`amqtt.broker.Broker` as the amqtt package ships it, with nothing of meshchat: one TCP listener
on a free loopback port and only amqtt's anonymous authentication plugin (no event or packet
logging, no ``$SYS`` topics, as meshchat's broker has none either). Like
``embedded_broker.py`` it prints ``PORT <n>`` on stdout once clients can connect and runs until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from amqtt.broker import Broker
from embedded_broker import serve_until_signalled

CONFIG: dict[str, Any] = {
    "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0", "max_connections": 0}},
    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    "timeout_disconnect_delay": 0,
}


async def serve() -> None:
    """Serve until a termination signal arrives, then shut the broker down."""
    broker = Broker(CONFIG)
    await broker.start()
    try:
        servers = broker._servers  # noqa: SLF001  # amqtt exposes no public listener list
        port = int(servers["default"].instance.sockets[0].getsockname()[1])
        # Anonymous sessions get no offline queue in amqtt: persistent sessions are not kept.
        await serve_until_signalled(port, "in memory; anonymous sessions keep no offline queue")
    finally:
        await broker.shutdown()


def main() -> int:
    """Silence amqtt (its per-client logging would cost throughput) and serve."""
    logging.basicConfig(level=logging.CRITICAL)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
