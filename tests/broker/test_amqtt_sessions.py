"""Session defects of amqtt 0.12.1 the embedded broker must not have.

Persistent sessions keep and redeliver QoS 1 messages (unacknowledged ones with DUP set, queued
ones with RETAIN clear, paced by a bounded in-flight window, the queue itself bounded); a clean
session never leaks its flag into a later persistent one; a reconnect takes the old connection
over; a refused CONNECT cannot touch the session of the client id it names.
"""

from __future__ import annotations

import logging
import uuid

import pytest
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from meshchat.broker import DEFAULT_MAX_INFLIGHT, EmbeddedBroker
from tests.broker.rawmqtt import RawClient, messages_until, mqtt_client, next_message
from tests.brokers import embedded_broker
from tests.mqtt import unique_topic


def unique_client_id(prefix: str = "client") -> str:
    """A client id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex}"


async def _subscribe_persistent(port: int, client_id: str, *topics: str) -> None:
    """Create a persistent session subscribed (QoS 1) to `topics`, then disconnect."""
    async with mqtt_client(port, client_id, clean_session=False) as subscriber:
        for topic in topics:
            await subscriber.subscribe(topic, qos=1)


async def _publish(port: int, topic: str, payloads: list[bytes]) -> None:
    """Publish each payload with QoS 1, in order, each acknowledged by the broker."""
    async with mqtt_client(port) as publisher:
        for payload in payloads:
            await publisher.publish(topic, payload, qos=1)


async def test_persistent_subscriber_gets_what_was_published_while_it_was_away(
    broker: EmbeddedBroker,
) -> None:
    port = broker.listener("mqtt").port
    topic, marker, client_id = unique_topic(), unique_topic(), unique_client_id()
    await _subscribe_persistent(port, client_id, topic, marker)
    payloads = [b"one", b"two", b"three"]
    await _publish(port, topic, payloads)
    async with mqtt_client(port, client_id, clean_session=False) as subscriber:
        await _publish(port, marker, [b"end"])
        received = await messages_until(subscriber, marker)
    # Queued messages are not retained messages: RETAIN is clear (MQTT-3.3.1-9).
    assert [(m.payload, m.qos, m.retain) for m in received] == [(p, 1, False) for p in payloads]


async def test_a_persistent_session_after_a_clean_one_queues_messages(
    broker: EmbeddedBroker,
) -> None:
    port = broker.listener("mqtt").port
    topic, client_id = unique_topic(), unique_client_id()
    # The clean session is still connected when the same id comes back with clean_session=0.
    async with await RawClient.connect(port, client_id, clean_session=True) as clean:
        await _subscribe_persistent(port, client_id, topic)
        await clean.wait_closed_by_broker()
    await _publish(port, topic, [b"while away"])
    async with mqtt_client(port, client_id, clean_session=False) as subscriber:
        message = await next_message(subscriber)
    assert (message.payload, message.qos) == (b"while away", 1)


async def test_an_unacknowledged_qos1_message_is_redelivered_with_dup_after_reconnect(
    broker: EmbeddedBroker,
) -> None:
    port = broker.listener("mqtt").port
    topic, client_id = unique_topic(), unique_client_id()
    async with await RawClient.connect(port, client_id, clean_session=False) as subscriber:
        await subscriber.subscribe(topic, qos=1)
        await _publish(port, topic, [b"must arrive"])
        first = await subscriber.read_publish()
        assert (first.payload, first.qos, first.dup) == (b"must arrive", 1, False)
    # Gone without a PUBACK.
    async with await RawClient.connect(port, client_id, clean_session=False) as subscriber:
        assert subscriber.session_present
        again = await subscriber.read_publish()
        assert (again.topic, again.payload, again.qos) == (topic, b"must arrive", 1)
        assert again.dup
        assert not again.retain
        await subscriber.puback(again.packet_id or 0)
        assert await subscriber.ping() == []
    # Acknowledged now: a third connection gets nothing again.
    async with await RawClient.connect(port, client_id, clean_session=False) as subscriber:
        assert await subscriber.ping() == []


async def test_a_big_backlog_arrives_complete_once_and_in_order(broker: EmbeddedBroker) -> None:
    port = broker.listener("mqtt").port
    topic, marker, client_id = unique_topic(), unique_topic(), unique_client_id()
    await _subscribe_persistent(port, client_id, topic, marker)
    payloads = [b"%d" % n for n in range(3000)]
    await _publish(port, topic, payloads)
    async with mqtt_client(port, client_id, clean_session=False) as subscriber:
        await _publish(port, marker, [b"end"])
        received = await messages_until(subscriber, marker, deadline=30)
    assert [m.payload for m in received] == payloads
    assert not [m for m in received if m.retain]


async def test_a_subscriber_never_has_more_than_the_window_unacknowledged(
    broker: EmbeddedBroker,
) -> None:
    port = broker.listener("mqtt").port
    topic, client_id = unique_topic(), unique_client_id()
    window = DEFAULT_MAX_INFLIGHT
    await _subscribe_persistent(port, client_id, topic)
    payloads = [b"%d" % n for n in range(window + 20)]
    await _publish(port, topic, payloads)
    async with await RawClient.connect(port, client_id, clean_session=False) as subscriber:
        outstanding = [await subscriber.read_publish() for _ in range(window)]
        assert [p.payload for p in outstanding] == payloads[:window]
        assert len({p.packet_id for p in outstanding}) == window
        # The window is full: nothing more comes until something is acknowledged.
        assert await subscriber.ping() == []
        await subscriber.puback(outstanding[0].packet_id or 0)
        assert (await subscriber.read_publish()).payload == payloads[window]
        assert await subscriber.ping() == []


async def test_the_offline_queue_is_bounded_keeps_the_newest_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with embedded_broker(max_offline_queue=5) as broker:
        port = broker.listener("mqtt").port
        topic, marker, client_id = unique_topic(), unique_topic(), unique_client_id("slow")
        await _subscribe_persistent(port, client_id, topic, marker)
        payloads = [b"%d" % n for n in range(8)]
        with caplog.at_level(logging.WARNING, logger="meshchat.broker"):
            async with mqtt_client(port) as online:
                await online.subscribe(topic, qos=1)
                await _publish(port, topic, payloads)
                # Everyone else is still served in full.
                assert [(await next_message(online)).payload for _ in payloads] == payloads
            async with mqtt_client(port, client_id, clean_session=False) as subscriber:
                await _publish(port, marker, [b"end"])
                received = await messages_until(subscriber, marker)
    assert [m.payload for m in received] == payloads[-5:]
    overflows = [r for r in caplog.records if client_id in r.getMessage()]
    assert len(overflows) == 1
    assert "5" in overflows[0].getMessage()


async def test_a_reconnect_takes_the_old_connection_over_and_publishes_its_will_once(
    broker: EmbeddedBroker,
) -> None:
    port = broker.listener("mqtt").port
    will_topic, topic, client_id = unique_topic(), unique_topic(), unique_client_id("phone")
    async with mqtt_client(port) as watcher:
        await watcher.subscribe(will_topic, qos=1)
        old = await RawClient.connect(port, client_id, will=(will_topic, b"old link gone"))
        async with old, await RawClient.connect(port, client_id) as new:
            await old.wait_closed_by_broker()
            will = await next_message(watcher)
            assert (will.topic.value, will.payload) == (will_topic, b"old link gone")
            assert await new.subscribe(topic, qos=1) == 1
            await _publish(port, topic, [b"to the new connection"])
            assert (await new.read_publish()).payload == b"to the new connection"
            await new.disconnect()
        await _publish(port, will_topic, [b"marker"])
        assert (await next_message(watcher)).payload == b"marker"  # no second will


class RefuseMalloryPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no types
    """Refuses the user `mallory`; has no opinion on anyone else."""

    async def authenticate(self, *, session: Session) -> bool | None:
        return False if session.username == "mallory" else None


async def test_a_refused_connect_leaves_the_session_it_names_alone() -> None:
    async with embedded_broker(extra_plugins={f"{__name__}.RefuseMalloryPlugin": {}}) as broker:
        port = broker.listener("mqtt").port
        topic, client_id = unique_topic(), unique_client_id("archiver")
        await _subscribe_persistent(port, client_id, topic)
        async with await RawClient.open(port) as mallory:
            code = await mallory.handshake(client_id, clean_session=True, username="mallory")
            assert code == 5  # not authorized
        await _publish(port, topic, [b"for the archiver"])
        async with mqtt_client(port, client_id, clean_session=False) as archiver:
            assert (await next_message(archiver)).payload == b"for the archiver"
