"""Limits on what a client may send: an oversize packet ends that client's connection only."""

from __future__ import annotations

import asyncio
import logging

import aiomqtt
import pytest

from meshchat.broker import DEFAULT_MAX_PAYLOAD, BrokerSettings
from meshchat.envelope import MAX_ENVELOPE_LEN
from meshchat.errors import ConfigError
from tests.brokers import embedded_broker
from tests.mqtt import unique_topic


async def test_oversize_publish_disconnects_the_sender_and_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = unique_topic()
    async with embedded_broker(max_payload=64 * 1024) as broker:
        listener = broker.listener("mqtt")
        async with (
            aiomqtt.Client(listener.host, listener.port, timeout=10) as subscriber,
            aiomqtt.Client(listener.host, listener.port, timeout=10) as bystander,
        ):
            await subscriber.subscribe(topic, qos=1)
            with caplog.at_level(logging.WARNING, logger="meshchat.broker.limits"):
                sender = aiomqtt.Client(listener.host, listener.port, timeout=3)
                async with sender:
                    await sender.publish(topic, bytes(60 * 1024), qos=1)  # under the limit
                    with pytest.raises(aiomqtt.MqttError):
                        # The broker hangs up before reading the body: the PUBACK never comes.
                        await sender.publish(topic, bytes(200 * 1024), qos=1)
            assert "the limit is 65536" in caplog.text
            await bystander.publish(topic, b"still served", qos=1)
            received = []
            async with asyncio.timeout(10):
                async for message in subscriber.messages:
                    assert isinstance(message.payload, bytes)
                    received.append(len(message.payload))
                    if message.payload == b"still served":
                        break
            assert received == [60 * 1024, len(b"still served")]


def test_default_payload_limit_fits_the_largest_envelope() -> None:
    assert BrokerSettings().max_payload == DEFAULT_MAX_PAYLOAD >= MAX_ENVELOPE_LEN


async def test_a_nonsense_payload_limit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max-payload 0"):
        async with embedded_broker(max_payload=0):
            pass
