"""Small MQTT helpers for tests: one round trip through a broker, with a deadline."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from typing import Literal

import aiomqtt

__all__ = ["round_trip", "unique_topic"]


def unique_topic(prefix: str = "test") -> str:
    """A topic no other test uses."""
    return f"{prefix}/{uuid.uuid4().hex}"


async def round_trip(
    host: str,
    port: int,
    payload: bytes = b"hello",
    *,
    transport: Literal["tcp", "websockets"] = "tcp",
    tls_context: ssl.SSLContext | None = None,
    subscriber_port: int | None = None,
    deadline: float = 10.0,
) -> bytes:
    """Subscribe, publish one QoS 1 message and return what the subscriber received.

    The subscriber uses plain TCP on `subscriber_port` when given, so a test can prove that a
    message crosses from one listener to another.
    """
    topic = unique_topic()
    async with asyncio.timeout(deadline):
        sub_kwargs: dict[str, object] = {}
        if subscriber_port is None:
            sub_kwargs = {"transport": transport, "tls_context": tls_context}
        async with aiomqtt.Client(host, subscriber_port or port, **sub_kwargs) as subscriber:  # type: ignore[arg-type]  # kwargs pass through
            await subscriber.subscribe(topic, qos=1)
            async with aiomqtt.Client(
                host, port, transport=transport, tls_context=tls_context
            ) as publisher:
                await publisher.publish(topic, payload, qos=1)
            async for message in subscriber.messages:
                assert str(message.topic) == topic
                assert isinstance(message.payload, bytes)
                return message.payload
    msg = "the subscriber's message stream ended"
    raise AssertionError(msg)
