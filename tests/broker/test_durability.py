"""The embedded broker's state survives a restart, graceful or ``kill -9``.

Persistent sessions keep their subscriptions and their queued QoS 1 messages (binary payloads,
in order, each once, RETAIN clear, DUP set on what was sent before); retained messages stay;
what a subscriber acknowledged is gone for good; a QoS 1 publish is acknowledged only once it
is stored, so ``kill -9`` loses nothing the broker acknowledged; the access policy in force
after the restart decides who receives what was queued before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import stat
import struct
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from meshchat.broker import BROKER_STATE_FILE, BrokerSettings
from meshchat.broker.persist import THREAD_NAME
from meshchat.datadir import DataDir
from meshchat.directory import Directory, Role
from meshchat.errors import ConfigError
from meshchat.server import SiteServer
from tests.broker.rawmqtt import PUBACK, RawClient, messages_until, mqtt_client
from tests.brokers import embedded_broker
from tests.cli.running import UpProcess
from tests.mqtt import unique_topic

DEADLINE = 30.0
"""Seconds a whole backlog may take to arrive."""


def unique_client_id(prefix: str = "durable") -> str:
    """A client id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex}"


async def _subscribe_persistent(port: int, client_id: str, *topics: str) -> None:
    """Create a persistent session subscribed (QoS 1) to `topics`, then disconnect."""
    async with mqtt_client(port, client_id, clean_session=False) as subscriber:
        for topic in topics:
            await subscriber.subscribe(topic, qos=1)


async def _publish(port: int, topic: str, payloads: list[bytes], *, retain: bool = False) -> None:
    """Publish each payload with QoS 1, in order, each acknowledged by the broker."""
    async with mqtt_client(port) as publisher:
        for payload in payloads:
            await publisher.publish(topic, payload, qos=1, retain=retain)


async def _read_until(subscriber: RawClient, port: int, marker: str) -> list[tuple[bytes, bool]]:
    """(payload, DUP) of every PUBLISH before the first one on `marker`, each acknowledged.

    The marker is published once the subscriber is connected; the broker sends one session's
    messages in order, so whatever it had queued for the subscriber comes before the marker.
    Every PUBLISH read must be QoS 1 with RETAIN clear (queued, not retained).
    """
    await _publish(port, marker, [b"end"])
    received: list[tuple[bytes, bool]] = []
    async with asyncio.timeout(DEADLINE):
        while True:
            publish = await subscriber.read_publish()
            assert publish.packet_id is not None
            assert (publish.qos, publish.retain) == (1, False)
            await subscriber.puback(publish.packet_id)
            if publish.topic == marker:
                return received
            received.append((publish.payload, publish.dup))


def _no_writer_thread_left() -> bool:
    return not [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


async def test_queued_messages_survive_a_graceful_restart_each_once_and_in_order(
    tmp_path: Path,
) -> None:
    topic, marker, client_id = unique_topic(), unique_topic(), unique_client_id()
    # Binary payloads, as E2EE envelopes are: every byte value, and no valid UTF-8 anywhere.
    payloads = [bytes(range(256)), *(os.urandom(64) + b"\xff" for _ in range(99))]
    async with embedded_broker(state_dir=tmp_path) as broker:
        port = broker.listener("mqtt").port
        await _subscribe_persistent(port, client_id, topic, marker)
        await _publish(port, topic, payloads)
    assert _no_writer_thread_left()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    async with embedded_broker(state_dir=tmp_path) as broker:
        port = broker.listener("mqtt").port
        async with await RawClient.connect(port, client_id, clean_session=False) as subscriber:
            assert subscriber.session_present
            received = await _read_until(subscriber, port, marker)
    # All 100, in order, each once; never sent before, so no DUP either.
    assert received == [(payload, False) for payload in payloads]
    assert stat.S_IMODE((tmp_path / BROKER_STATE_FILE).stat().st_mode) == 0o600


async def test_acknowledged_messages_stay_gone_and_sent_ones_come_back_with_dup(
    tmp_path: Path,
) -> None:
    topic, marker, client_id = unique_topic(), unique_topic(), unique_client_id()
    online = [b"online %d" % n for n in range(10)]
    offline = [b"offline %d" % n for n in range(5)]
    async with embedded_broker(state_dir=tmp_path) as broker:
        port = broker.listener("mqtt").port
        async with await RawClient.connect(port, client_id, clean_session=False) as subscriber:
            await subscriber.subscribe(topic, qos=1)
            await subscriber.subscribe(marker, qos=1, packet_id=2)
            await _publish(port, topic, online)
            sent = [await subscriber.read_publish() for _ in online]
            assert [p.payload for p in sent] == online
            for publish in sent[:4]:
                await subscriber.puback(publish.packet_id or 0)
            assert await subscriber.ping() == []  # the PUBACKs are handled by now
        # Gone without acknowledging the other six; five more arrive while it is away.
        await _publish(port, topic, offline)
    async with embedded_broker(state_dir=tmp_path) as broker:
        port = broker.listener("mqtt").port
        async with await RawClient.connect(port, client_id, clean_session=False) as subscriber:
            received = await _read_until(subscriber, port, marker)
    assert received == [(p, True) for p in online[4:]] + [(p, False) for p in offline]
    # Everything was acknowledged after that restart: after another one, nothing comes back.
    async with embedded_broker(state_dir=tmp_path) as broker:
        port = broker.listener("mqtt").port
        async with await RawClient.connect(port, client_id, clean_session=False) as subscriber:
            assert subscriber.session_present
            assert await _read_until(subscriber, port, marker) == []


async def test_retained_messages_survive_a_graceful_restart(tmp_path: Path) -> None:
    base, marker = unique_topic(), unique_topic()
    updated, cleared = os.urandom(48), os.urandom(16)
    async with embedded_broker(state_dir=tmp_path) as broker:
        port = broker.listener("mqtt").port
        async with mqtt_client(port) as publisher:
            await publisher.publish(f"{base}/roster", b"\x00old roster", qos=1, retain=True)
            await publisher.publish(f"{base}/roster", updated, qos=1, retain=True)
            await publisher.publish(f"{base}/presence", b"\x01online", qos=0, retain=True)
            await publisher.publish(f"{base}/gone", cleared, qos=1, retain=True)
            await publisher.publish(f"{base}/gone", b"", qos=1, retain=True)  # clears it
            # A QoS 1 barrier: this client's earlier publishes (the QoS 0 one too) are handled.
            await publisher.publish(marker, b"barrier", qos=1)
    async with embedded_broker(state_dir=tmp_path) as broker:
        port = broker.listener("mqtt").port
        async with mqtt_client(port) as subscriber:
            await subscriber.subscribe(f"{base}/#", qos=1)
            await subscriber.subscribe(marker, qos=1)
            await _publish(port, marker, [b"end"])
            received = await messages_until(subscriber, marker)
    assert sorted((m.topic.value, m.payload, m.qos, m.retain) for m in received) == [
        (f"{base}/presence", b"\x01online", 0, True),
        (f"{base}/roster", updated, 1, True),
    ]


async def test_subscriptions_unsubscriptions_and_clean_sessions_hold_across_a_restart(
    tmp_path: Path,
) -> None:
    kept, dropped, marker = unique_topic(), unique_topic(), unique_topic()
    keeper, quitter = unique_client_id("keeper"), unique_client_id("quitter")
    async with embedded_broker(state_dir=tmp_path) as broker:
        port = broker.listener("mqtt").port
        async with mqtt_client(port, keeper, clean_session=False) as client:
            for topic in (kept, dropped, marker):
                await client.subscribe(topic, qos=1)
            await client.unsubscribe(dropped)
        await _subscribe_persistent(port, quitter, kept)
        async with mqtt_client(port, quitter, clean_session=True):
            pass  # a clean session ends the persistent one (MQTT-3.1.2-6)
        await _publish(port, kept, [b"kept"])
        await _publish(port, dropped, [b"unsubscribed"])
    async with embedded_broker(state_dir=tmp_path) as broker:
        port = broker.listener("mqtt").port
        async with await RawClient.connect(port, keeper, clean_session=False) as client:
            assert client.session_present
            assert await _read_until(client, port, marker) == [(b"kept", False)]
        async with await RawClient.connect(port, quitter, clean_session=False) as client:
            assert not client.session_present


async def test_messages_dropped_over_the_bound_stay_dropped_after_a_restart(
    tmp_path: Path,
) -> None:
    topic, marker, client_id = unique_topic(), unique_topic(), unique_client_id()
    payloads = [b"%d" % n for n in range(8)]
    async with embedded_broker(state_dir=tmp_path, max_offline_queue=5) as broker:
        port = broker.listener("mqtt").port
        await _subscribe_persistent(port, client_id, topic, marker)
        await _publish(port, topic, payloads)
    # A larger bound now: the three dropped before the restart must not reappear.
    async with embedded_broker(state_dir=tmp_path, max_offline_queue=100) as broker:
        port = broker.listener("mqtt").port
        async with await RawClient.connect(port, client_id, clean_session=False) as subscriber:
            received = await _read_until(subscriber, port, marker)
    assert [payload for payload, _ in received] == payloads[-5:]


async def test_a_smaller_bound_after_a_restart_keeps_the_newest_messages(tmp_path: Path) -> None:
    topic, marker, client_id = unique_topic(), unique_topic(), unique_client_id()
    payloads = [b"%d" % n for n in range(8)]
    async with embedded_broker(state_dir=tmp_path, max_offline_queue=100) as broker:
        port = broker.listener("mqtt").port
        await _subscribe_persistent(port, client_id, topic, marker)
        await _publish(port, topic, payloads)
    async with embedded_broker(state_dir=tmp_path, max_offline_queue=3) as broker:
        port = broker.listener("mqtt").port
        async with await RawClient.connect(port, client_id, clean_session=False) as subscriber:
            received = await _read_until(subscriber, port, marker)
    assert [payload for payload, _ in received] == payloads[-3:]


async def test_unusable_rows_in_the_state_file_are_skipped_and_the_rest_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic, marker, client_id = unique_topic(), unique_topic(), unique_client_id()
    retained = unique_topic()
    async with embedded_broker(state_dir=tmp_path) as broker:
        port = broker.listener("mqtt").port
        await _subscribe_persistent(port, client_id, topic, marker)
        await _publish(port, topic, [b"\x00first", b"\x01second"])
        await _publish(port, retained, [b"kept"], retain=True)
    # Someone (or a bad disk) edited the file while the broker was down.
    with contextlib.closing(sqlite3.connect(tmp_path / BROKER_STATE_FILE)) as db, db:
        db.executemany(
            "INSERT INTO queue (id, client_id, topic, payload, qos, dup) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (1000, client_id, f"{topic}/#", b"wildcard topic", 1, 0),
                (1001, client_id, topic, b"qos 7", 7, 0),
                (1002, client_id, topic, "text, not bytes", 1, 0),
                (1003, "no such session", topic, b"orphan", 1, 0),
                (1004, client_id, topic, b"\x02third", 1, 0),
            ],
        )
        db.execute("INSERT INTO subscriptions VALUES (?, ?, ?)", (client_id, "bad/qos", 9))
        db.execute("INSERT INTO retained VALUES (?, ?, ?)", (f"{retained}/+", b"wildcard", 1))
    with caplog.at_level(logging.WARNING, logger="meshchat.broker"):
        async with embedded_broker(state_dir=tmp_path) as broker:
            port = broker.listener("mqtt").port
            async with await RawClient.connect(port, client_id, clean_session=False) as client:
                received = await _read_until(client, port, marker)
            async with mqtt_client(port) as fresh:
                await fresh.subscribe(f"{retained}/+", qos=1)  # would match the bad row
                await fresh.subscribe(retained, qos=1)
                await fresh.subscribe(marker, qos=1)
                await _publish(port, marker, [b"end"])
                got = await messages_until(fresh, marker)
    assert [payload for payload, _ in received] == [b"\x00first", b"\x01second", b"\x02third"]
    assert [(m.topic.value, m.payload) for m in got] == [(retained, b"kept")]
    logged = [record.getMessage() for record in caplog.records]
    assert any("6 unusable rows skipped" in message for message in logged)
    assert not [m for m in logged if "orphan" in m or "wildcard topic" in m]  # no payloads


async def test_a_state_file_from_a_newer_meshchat_is_refused(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / BROKER_STATE_FILE)) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigError, match="schema version 99, newer than"):
        async with embedded_broker(state_dir=tmp_path):
            pass
    assert _no_writer_thread_left()


async def test_a_second_broker_cannot_use_a_state_directory_in_use(tmp_path: Path) -> None:
    async with embedded_broker(state_dir=tmp_path):
        with pytest.raises(ConfigError, match="in use by another broker"):
            async with embedded_broker(state_dir=tmp_path):
                pass
    assert _no_writer_thread_left()


async def test_pubacks_keep_publish_order_when_only_some_messages_are_stored(
    tmp_path: Path,
) -> None:
    kept, unkept, client_id = unique_topic(), unique_topic(), unique_client_id()
    async with embedded_broker(state_dir=tmp_path) as broker:
        port = broker.listener("mqtt").port
        await _subscribe_persistent(port, client_id, kept)
        async with await RawClient.connect(port, unique_client_id("publisher")) as publisher:
            # Stored, then not stored (nobody subscribes), alternating, all sent at once.
            for packet_id in range(1, 41):
                topic = kept if packet_id % 2 else unkept
                await publisher.publish(topic, b"%d" % packet_id, qos=1, packet_id=packet_id)
            acks = [await publisher.read() for _ in range(40)]
    assert {ack.type for ack in acks} == {PUBACK}
    assert [struct.unpack("!H", ack.body)[0] for ack in acks] == list(range(1, 41))


# -- kill -9 ----------------------------------------------------------------------------------

WINDOW = 100
"""QoS 1 publishes the burst keeps unacknowledged, as a client's in-flight window does."""


def _payload(index: int) -> bytes:
    return struct.pack("!I", index) + os.urandom(28)


def _index(payload: bytes) -> int:
    return int(struct.unpack_from("!I", payload)[0])


async def _burst_until_killed(
    port: int,
    topic_of: Callable[[int], tuple[str, bool]],
    kill_after: int,
    kill: Callable[[], None],
) -> tuple[set[int], int]:
    """Publish QoS 1 messages, `WINDOW` at a time, and kill the broker mid-burst.

    Returns the indexes the broker acknowledged (every PUBACK that arrived, also after the
    kill was ordered) and how many were sent. PUBACKs must come in publish order
    (MQTT-4.6.0-2), whether a message was queued, retained, or both.
    """
    client = await RawClient.connect(port, unique_client_id("burst"))
    acked: set[int] = set()
    in_order: list[int] = []
    opened = asyncio.Event()
    sent = 0

    async def send() -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionError):  # the broker is killed under its feet
            while True:
                while sent - len(acked) >= WINDOW:
                    opened.clear()
                    await opened.wait()
                topic, retain = topic_of(sent)
                await client.publish(
                    topic, _payload(sent), qos=1, packet_id=sent % 65535 + 1, retain=retain
                )
                sent += 1

    async with client, asyncio.timeout(DEADLINE), asyncio.TaskGroup() as tasks:
        sender = tasks.create_task(send(), name="test.burst.send")
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                packet = await client.read()
                if packet.type == PUBACK:
                    (packet_id,) = struct.unpack("!H", packet.body)
                    acked.add(packet_id - 1)
                    in_order.append(packet_id - 1)
                    opened.set()
                    if len(acked) == kill_after:
                        kill()  # the sender is still going: WINDOW publishes are in flight
        sender.cancel()
    assert in_order == list(range(len(in_order)))
    return acked, sent


async def _start_up(data: Path) -> tuple[UpProcess, int]:
    up = UpProcess(["--anonymous", "--port", "0", "--data", str(data)])
    try:
        urls = await asyncio.to_thread(up.wait_ready)
    except BaseException:
        up.kill()
        raise
    return up, int(urls["mqtt"].rsplit(":", 1)[1])


async def test_kill_9_loses_no_acknowledged_message_queued_or_retained(tmp_path: Path) -> None:
    data = tmp_path / "data"
    topic, marker, client_id = unique_topic(), unique_topic(), unique_client_id()
    retained_base = unique_topic("retained")

    def topic_of(index: int) -> tuple[str, bool]:
        # Every fourth message is a retained one on a topic of its own; the rest are queued.
        if index % 4 == 3:
            return f"{retained_base}/{index}", True
        return topic, False

    up, port = await _start_up(data)
    try:
        await _subscribe_persistent(port, client_id, topic, marker)
        acked, sent = await _burst_until_killed(
            port, topic_of, kill_after=600, kill=lambda: up.process.send_signal(signal.SIGKILL)
        )
    finally:
        up.kill()
    assert up.process.returncode == -signal.SIGKILL
    assert 600 <= len(acked) < sent  # killed mid-burst: some publishes were never acknowledged

    up, port = await _start_up(data)
    try:
        async with await RawClient.connect(port, client_id, clean_session=False) as subscriber:
            assert subscriber.session_present
            received = [
                _index(payload) for payload, _ in await _read_until(subscriber, port, marker)
            ]
        async with mqtt_client(port) as fresh:
            await fresh.subscribe(f"{retained_base}/#", qos=1)
            await fresh.subscribe(marker, qos=1)
            await _publish(port, marker, [b"end"])
            retained = await messages_until(fresh, marker, deadline=DEADLINE)
        assert up.stop()[0] == 0
    finally:
        up.kill()
    queued_acked = {index for index in acked if not topic_of(index)[1]}
    retained_acked = {index for index in acked if topic_of(index)[1]}
    # Every acknowledged message arrives, once, in publish order; unacknowledged ones may.
    assert queued_acked <= set(received)
    assert len(received) == len(set(received))
    assert received == sorted(received)
    assert all(not topic_of(index)[1] and index < sent for index in received)
    # Every acknowledged retained message is still retained (each topic was published once).
    retained_indexes = {_index(m.payload) for m in retained}
    assert retained_acked <= retained_indexes
    assert all(m.retain and m.topic.value == topic_of(_index(m.payload))[0] for m in retained)


# -- with the directory's access policy ---------------------------------------------------------

GROUP = "mc/acme/ops/line1"
PASSWORDS = {"bob": "bob password", "carol": "carol password", "erin": "erin password"}


def _member(port: int, user: str, *, persistent: bool = True) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=PASSWORDS[user],
        identifier=f"{user}.test",
        clean_session=not persistent,
        timeout=10,
    )


async def test_site_server_queues_survive_and_a_removal_made_while_down_applies(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    marker = "mc/acme/_k/bob"  # bob's key record: everyone in the org may receive it
    payloads = [os.urandom(40) for _ in range(20)]
    with Directory(data / "directory.db") as directory:
        directory.init_org("acme", admin="root", password="root password")
        directory.add_user("root", "bob", dept="ops", role=Role.MANAGER, password=PASSWORDS["bob"])
        for user in ("carol", "erin"):
            directory.add_user("root", user, dept="ops", password=PASSWORDS[user])
        directory.create_group("bob", "ops/line1")
        directory.add_members("bob", "ops/line1", ["carol", "erin"])
        async with SiteServer(DataDir(data), BrokerSettings(port=0)) as server:
            port = server.broker.listener("mqtt").port
            for user in ("carol", "erin"):
                async with _member(port, user) as client:
                    assert list(await client.subscribe(GROUP, qos=1)) == [1]
                    await client.subscribe("mc/acme/_k/+", qos=1)
            async with _member(port, "bob", persistent=False) as bob:
                for payload in payloads:
                    await bob.publish(GROUP, payload, qos=1)
        # While the server is down, an admin takes erin out of the group.
        directory.remove_members("bob", "ops/line1", ["erin"])
        async with SiteServer(DataDir(data), BrokerSettings(port=0)) as server:
            port = server.broker.listener("mqtt").port
            got: dict[str, list[aiomqtt.Message]] = {}
            for user in ("carol", "erin"):
                async with (
                    _member(port, user) as client,
                    _member(port, "bob", persistent=False) as bob,
                ):
                    await bob.publish(marker, b"key record", qos=1)
                    got[user] = await messages_until(client, marker, deadline=DEADLINE)
    assert [(m.topic.value, m.payload, m.retain) for m in got["carol"]] == [
        (GROUP, payload, False) for payload in payloads
    ]
    assert got["erin"] == []
