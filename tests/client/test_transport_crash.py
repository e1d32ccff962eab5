"""A publisher that dies mid-burst: what the broker acknowledged arrives, the rest is sent again.

The broker here is the site's: the directory's authentication and ACL, and a durable state store
(so each PUBACK waits for the commit of the copies the broker keeps). The first "process" is a
`Transport` whose link breaks the moment the broker has acknowledged part of a burst: cut (its
socket closed, as after kill -9) or stalled (nothing closed, as after a power loss, so the broker
still thinks it is connected and the second process takes its connection over). The second
process, with the same client id and persistent session, publishes what was not acknowledged, as
`Client` does from its durable outbox. A subscriber must get every message of the burst.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from meshchat.client import Backoff, Transport
from tests.client.conftest import PASSWORDS, Site
from tests.proxy import TcpProxy

GROUP = "mc/acme/ops/line1"
FAST = Backoff(initial=0.01, maximum=0.05)
DEADLINE = 20.0
COUNT = 200
BREAK_AFTER = 50


def _transport(
    url: str, user: str, client_id: str, on_sent: Callable[[int], None] | None = None
) -> Transport:
    return Transport(
        url,
        client_id=client_id,
        username=user,
        password=PASSWORDS[user],
        backoff=FAST,
        connect_timeout=5.0,
        ack_timeout=5.0,
        close_timeout=0.5,
        on_sent=on_sent,
    )


@pytest.mark.parametrize("death", ["cut", "stall"])
async def test_every_message_of_a_burst_arrives_when_the_publisher_dies_mid_burst(
    site: Site, death: str
) -> None:
    port = site.server.broker.listener("mqtt").port
    payloads = [b"burst %d" % number for number in range(COUNT)]
    async with (
        _transport(site.url, "carol", "carol.reader") as reader,
        TcpProxy("127.0.0.1", port) as proxy,
    ):
        await reader.subscribe(GROUP)
        acked: list[int] = []
        broken = asyncio.Event()

        def on_sent(message_id: int) -> None:
            acked.append(message_id)
            if len(acked) == BREAK_AFTER:
                # Right in the acknowledgement: the burst is broken mid-way, deterministically.
                proxy.refuse()  # the dead process never comes back
                if death == "stall":
                    proxy.stall()
                else:
                    proxy.cut()
                broken.set()

        first = _transport(proxy.url, "bob", "bob.sender", on_sent=on_sent)
        await first.__aenter__()
        try:
            ids = [first.publish_nowait(GROUP, payload) for payload in payloads]
            async with asyncio.timeout(DEADLINE):
                await broken.wait()
            # The next run of the process: the same session, and what was not acknowledged. When
            # the old link only stalled, the broker takes that connection over.
            done = set(acked)
            left = [
                payload for number, payload in zip(ids, payloads, strict=True) if number not in done
            ]
            assert 0 < len(left) <= COUNT - BREAK_AFTER
            async with _transport(site.url, "bob", "bob.sender") as second:
                assert second.session_present
                async with asyncio.timeout(DEADLINE):
                    await asyncio.gather(*(second.publish(GROUP, payload) for payload in left))
        finally:
            await first.__aexit__(None, None, None)
        received: set[bytes] = set()
        messages = reader.messages()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DEADLINE):
                while received != set(payloads):
                    received.add((await anext(messages)).payload)
    assert sorted(set(payloads) - received) == []
