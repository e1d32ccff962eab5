"""Routing defects of amqtt 0.12.1 the embedded broker must not have.

Retained messages go only to the subscriptions they match and pass the topic filter; a publish to
a `$` topic is dropped without muting its sender; delivered QoS is min(publish, subscription).
"""

from __future__ import annotations

import uuid

import pytest
from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from meshchat.broker import EmbeddedBroker
from tests.broker.rawmqtt import RawClient, messages_until, mqtt_client, next_message
from tests.brokers import embedded_broker
from tests.mqtt import unique_topic


class RefuseSecretPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no types
    """A stand-in for the future ACL: nobody may receive a topic whose last level is `secret`."""

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        del session
        return not (action == Action.RECEIVE and (topic or "").endswith("/secret"))


REFUSE_SECRET: dict[str, dict[str, object]] = {f"{__name__}.RefuseSecretPlugin": {}}


async def test_a_new_client_gets_no_retained_message_for_other_clients_subscriptions(
    broker: EmbeddedBroker,
) -> None:
    port = broker.listener("mqtt").port
    topic, marker = unique_topic(), unique_topic()
    async with mqtt_client(port) as other, mqtt_client(port) as publisher:
        await other.subscribe(topic, qos=1)
        await publisher.publish(topic, b"for the subscriber only", qos=1, retain=True)
        # Once `other` has it, the broker has stored it as retained.
        assert (await next_message(other)).payload == b"for the subscriber only"
        async with mqtt_client(port) as newcomer:
            await newcomer.subscribe(marker, qos=1)
            await publisher.publish(marker, b"end", qos=1)
            leaked = await messages_until(newcomer, marker)
            assert [(m.topic.value, m.payload) for m in leaked] == []


async def _store_retained(port: int, messages: dict[str, bytes]) -> None:
    """Publish retained messages and return once the broker has stored all of them."""
    barrier = unique_topic("barrier")
    async with mqtt_client(port) as watcher, mqtt_client(port) as publisher:
        await watcher.subscribe(barrier, qos=1)
        for topic, payload in messages.items():
            await publisher.publish(topic, payload, qos=1, retain=True)
        # One publisher's messages are handled in order: the barrier comes after the stores.
        await publisher.publish(barrier, b"", qos=1)
        await messages_until(watcher, barrier)


async def test_retained_messages_on_subscribe_pass_the_receive_filter() -> None:
    async with embedded_broker(extra_plugins=REFUSE_SECRET) as broker:
        port = broker.listener("mqtt").port
        base, marker = unique_topic(), unique_topic()
        await _store_retained(port, {f"{base}/public": b"anyone", f"{base}/secret": b"nobody"})
        async with mqtt_client(port) as subscriber, mqtt_client(port) as publisher:
            await subscriber.subscribe(f"{base}/+", qos=1)
            await subscriber.subscribe(marker, qos=1)
            await publisher.publish(marker, b"end", qos=1)
            received = await messages_until(subscriber, marker)
        assert [(m.topic.value, m.payload, m.retain) for m in received] == [
            (f"{base}/public", b"anyone", True)
        ]


async def test_a_resumed_session_gets_retained_messages_for_its_own_subscriptions_only() -> None:
    async with embedded_broker(extra_plugins=REFUSE_SECRET) as broker:
        port = broker.listener("mqtt").port
        own, others, marker = unique_topic(), unique_topic(), unique_topic()
        client_id = f"resumer-{uuid.uuid4().hex}"
        await _store_retained(
            port,
            {f"{own}/public": b"mine", f"{own}/secret": b"refused", f"{others}/x": b"not mine"},
        )
        async with mqtt_client(port) as bystander, mqtt_client(port) as publisher:
            await bystander.subscribe(f"{others}/#", qos=1)
            async with mqtt_client(port, client_id, clean_session=False) as resumer:
                await resumer.subscribe(f"{own}/+", qos=1)
                await resumer.subscribe(marker, qos=1)
                await publisher.publish(marker, b"first", qos=1)
                await messages_until(resumer, marker)
            async with mqtt_client(port, client_id, clean_session=False) as resumer:
                await publisher.publish(marker, b"second", qos=1)
                received = await messages_until(resumer, marker)
        assert [(m.topic.value, m.payload, m.retain) for m in received] == [
            (f"{own}/public", b"mine", True)
        ]


async def test_a_publish_to_a_dollar_topic_is_dropped_and_the_client_keeps_publishing(
    broker: EmbeddedBroker,
) -> None:
    port = broker.listener("mqtt").port
    forged, topic = f"$SYS/{uuid.uuid4().hex}", unique_topic()
    async with mqtt_client(port) as subscriber, mqtt_client(port) as publisher:
        await subscriber.subscribe(forged, qos=1)
        await subscriber.subscribe(topic, qos=1)
        await publisher.publish(forged, b"forged broker status", qos=1)
        await publisher.publish(topic, b"still routed", qos=1)
        received = await messages_until(subscriber, topic)
        assert received == []  # the $ message never went out, and it would have come first
        await publisher.publish(topic, b"and again", qos=1)
        assert (await next_message(subscriber)).payload == b"and again"


async def test_a_publish_without_a_topic_closes_the_connection(broker: EmbeddedBroker) -> None:
    raw = await RawClient.connect(broker.listener("mqtt").port, f"bad-{uuid.uuid4().hex}")
    async with raw:
        await raw.publish("", b"a topic name is at least one character", qos=0)
        await raw.wait_closed_by_broker()


@pytest.mark.parametrize(
    ("publish_qos", "subscribe_qos", "delivered_qos"),
    [(0, 2, 0), (0, 1, 0), (1, 2, 1), (2, 2, 2), (2, 1, 1), (1, 0, 0), (2, 0, 0)],
)
async def test_delivered_qos_is_the_lower_of_publish_and_subscription(
    broker: EmbeddedBroker, publish_qos: int, subscribe_qos: int, delivered_qos: int
) -> None:
    port = broker.listener("mqtt").port
    topic, marker = unique_topic(), unique_topic()
    async with mqtt_client(port) as subscriber, mqtt_client(port) as publisher:
        await subscriber.subscribe(topic, qos=subscribe_qos)
        await subscriber.subscribe(marker, qos=1)
        await publisher.publish(topic, b"payload", qos=publish_qos)
        await publisher.publish(marker, b"end", qos=1)
        [message] = await messages_until(subscriber, marker)
    assert message.payload == b"payload"
    assert message.qos == delivered_qos


async def test_a_repeated_subscription_replaces_the_granted_qos(broker: EmbeddedBroker) -> None:
    port = broker.listener("mqtt").port
    topic, marker = unique_topic(), unique_topic()
    async with mqtt_client(port) as subscriber, mqtt_client(port) as publisher:
        await subscriber.subscribe(topic, qos=2)
        await subscriber.subscribe(topic, qos=0)
        await subscriber.subscribe(marker, qos=1)
        await publisher.publish(topic, b"payload", qos=2)
        await publisher.publish(marker, b"end", qos=1)
        [message] = await messages_until(subscriber, marker)
    assert message.qos == 0
