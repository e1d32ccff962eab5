"""The MQTT transport: one session through a link that is cut, refused and redirected.

Every test runs against real brokers (the embedded amqtt broker, and Mosquitto where the
behaviour is broker-neutral); `tests.proxy.TcpProxy` stands in for the flaky link.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Self

import aiomqtt
import paho.mqtt
import pytest
import trustme

from meshchat.broker import BrokerSettings, EmbeddedBroker, TlsFiles
from meshchat.broker.access import AccessGate
from meshchat.client import (
    Backoff,
    BrokerUrl,
    Incoming,
    Publication,
    Transport,
    TransportState,
)
from meshchat.directory import AccessPolicy, Directory
from meshchat.directory.policy import DirectorySnapshot
from meshchat.errors import (
    AuthenticationError,
    ConfigError,
    PermissionDeniedError,
    TopicError,
    TransportError,
)
from tests.broker.rawmqtt import CONNECT as CONNECT_PACKET
from tests.broker.rawmqtt import PUBACK, RawClient, encode, mqtt_client, next_message
from tests.brokers import embedded_broker
from tests.mqtt import unique_topic
from tests.proxy import TcpProxy

DEADLINE = 10.0
FAST = Backoff(initial=0.01, maximum=0.05, reset_after=60.0)
BOB_PASSWORD = "bob password"

CONNECTED, DISCONNECTED, CONNECTING, CLOSED = (
    TransportState.CONNECTED,
    TransportState.DISCONNECTED,
    TransportState.CONNECTING,
    TransportState.CLOSED,
)


def unique_id(prefix: str = "transport") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def make(url: str | BrokerUrl, **options: Any) -> Transport:
    """A transport with test timings: short backoff, short deadlines."""
    options.setdefault("client_id", unique_id())
    options.setdefault("backoff", FAST)
    options.setdefault("connect_timeout", 5.0)
    options.setdefault("ack_timeout", 5.0)
    options.setdefault("close_timeout", 2.0)
    return Transport(url, **options)


async def take(messages: AsyncIterator[Incoming], count: int) -> list[Incoming]:
    """The next `count` messages, with a deadline."""
    async with asyncio.timeout(DEADLINE):
        return [await anext(messages) for _ in range(count)]


async def wait_for(transport: Transport, *states: TransportState) -> None:
    async with asyncio.timeout(DEADLINE):
        await transport.wait_state(*states)


async def publish_direct(port: int, topic: str, payloads: list[bytes]) -> None:
    """Publish with QoS 1 from another client, straight to the broker."""
    async with mqtt_client(port) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1)


@contextlib.asynccontextmanager
async def disconnected(transport: Transport, proxy: TcpProxy) -> AsyncIterator[None]:
    """Cut the link and keep it down for the block; the transport notices before it starts."""
    proxy.refuse()
    proxy.cut()
    await wait_for(transport, DISCONNECTED)
    yield
    proxy.accept()


# -- the pinned dependencies ---------------------------------------------------------------------


def test_aiomqtt_and_paho_are_the_versions_the_link_was_written_against() -> None:
    # meshchat.client._link overrides private hooks of aiomqtt 2.5 and calls paho's _sock_close;
    # a new version must be checked against them before this pin moves.
    assert aiomqtt.__version_tuple__[:2] == (2, 5)
    assert paho.mqtt.__version__.startswith("2.")


# -- broker URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.example", BrokerUrl("mqtt", "broker.example", 1883)),
        ("mqtt://127.0.0.1:1884/", BrokerUrl("mqtt", "127.0.0.1", 1884)),
        ("MQTTS://Broker.Example", BrokerUrl("mqtts", "broker.example", 8883)),
        ("ws://10.0.0.5", BrokerUrl("ws", "10.0.0.5", 80, "/mqtt")),
        ("ws://10.0.0.5:9001/mq/ws", BrokerUrl("ws", "10.0.0.5", 9001, "/mq/ws")),
        ("wss://site.example", BrokerUrl("wss", "site.example", 443, "/mqtt")),
        ("mqtt://[::1]:1883", BrokerUrl("mqtt", "::1", 1883)),
    ],
)
def test_broker_urls_are_read_with_default_ports(url: str, expected: BrokerUrl) -> None:
    parsed = BrokerUrl.parse(url)
    assert parsed == expected
    assert BrokerUrl.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "empty"),
        ("localhost:1883", "no scheme"),
        ("http://localhost", "'http' is not supported"),
        ("mqtt://", "no host"),
        ("mqtt://host:port", "not a number"),
        ("mqtt://host:70000", "not a number"),
        ("mqtt://host:0", "outside 1..65535"),
        ("mqtt://host:", "empty port"),
        ("mqtt://bob:secret@host", "credentials"),
        ("mqtt://host/mqtt", "takes no path"),
        ("mqtt://host?x=1", "query"),
        ("mqtt://ho st", "whitespace"),
        ("mqtt://host\n", "whitespace"),
        ("mqtt://[::1", "cannot be read"),
        ("mqtt://h%41st", "not a host name"),
    ],
)
def test_a_bad_broker_url_is_a_config_error_that_says_why(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        BrokerUrl.parse(url)


def test_credentials_never_appear_in_the_url_error() -> None:
    with pytest.raises(ConfigError) as raised:
        BrokerUrl.parse("mqtt://bob:hunter2@host")
    assert "hunter2" not in str(raised.value)


def test_settings_no_connection_could_use_are_refused_up_front() -> None:
    with pytest.raises(ConfigError, match="client id"):
        Transport("mqtt://127.0.0.1")  # persistent session without a stable client id
    with pytest.raises(ConfigError, match="TLS context"):
        Transport("mqtt://127.0.0.1", client_id="x", tls_context=ssl.create_default_context())
    with pytest.raises(ConfigError, match="keepalive"):
        Transport("mqtt://127.0.0.1", client_id="x", keepalive=0)
    with pytest.raises(ConfigError, match="backoff"):
        Backoff(initial=1.0, maximum=0.5)
    with pytest.raises(TransportError, match="QoS 2"):
        Publication("a/b", b"x", qos=2)
    assert Transport("mqtt://127.0.0.1", clean_session=True).client_id  # made up when clean


def test_backoff_is_exponential_capped_and_fully_jittered() -> None:
    backoff = Backoff(initial=0.2, maximum=30.0)
    ceilings = [backoff.delay(attempt, 0.999999) for attempt in range(12)]
    assert ceilings[:4] == pytest.approx([0.2, 0.4, 0.8, 1.6], rel=1e-3)
    assert max(ceilings) == pytest.approx(30.0, rel=1e-3)
    assert ceilings == sorted(ceilings)
    assert backoff.delay(5, 0.0) == 0.0  # full jitter: anything from nothing to the ceiling
    assert backoff.delay(10_000, 0.5) == pytest.approx(15.0)


# -- the happy path ------------------------------------------------------------------------------


async def test_a_qos1_message_makes_the_round_trip(any_broker: tuple[str, int]) -> None:
    host, port = any_broker
    topic = unique_topic()
    async with make(f"mqtt://{host}:{port}") as transport:
        assert transport.state is CONNECTED
        assert not transport.session_present  # a client id the broker never saw
        assert await transport.subscribe(topic, qos=1) == 1
        messages = transport.messages()
        message_id = await transport.publish(topic, b"hello", qos=1)
        assert transport.queued == 0
        [received] = await take(messages, 1)
    assert received == Incoming(topic, b"hello", qos=1, retain=False)
    assert message_id == 1
    assert transport.state is CLOSED


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> TlsFiles:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return TlsFiles(cert_path, key_path)


async def test_every_url_scheme_carries_messages(ca: trustme.CA, tls_files: TlsFiles) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with embedded_broker(tls=tls_files, tls_port=0, ws_port=0) as broker:
        for listener in broker.listeners:
            url = BrokerUrl.parse(listener.url)
            topic = unique_topic(listener.scheme)
            tls = context if url.tls else None
            async with make(url, tls_context=tls, clean_session=True) as transport:
                await transport.subscribe(topic)
                messages = transport.messages()
                await transport.publish(topic, listener.scheme.encode())
                [received] = await take(messages, 1)
                assert received.payload == listener.scheme.encode()


async def test_the_broker_is_told_of_every_sent_message_in_order(broker: EmbeddedBroker) -> None:
    sent: list[int] = []
    url = broker.listener("mqtt").url
    async with make(url, on_sent=sent.append) as transport:
        ids = [transport.publish_nowait(unique_topic(), b"%d" % n) for n in range(50)]
        await transport.publish(unique_topic(), b"last")
    assert sent == [*ids, ids[-1] + 1]


# -- a flaky link --------------------------------------------------------------------------------


async def test_messages_published_while_the_link_is_down_arrive_in_order_once_it_is_back(
    any_broker: tuple[str, int],
) -> None:
    host, port = any_broker
    topic = unique_topic()
    payloads = [b"%d" % n for n in range(30)]
    sent: list[int] = []
    all_sent = asyncio.Event()

    def on_sent(message_id: int) -> None:
        sent.append(message_id)
        if len(sent) == len(payloads):
            all_sent.set()

    async with (
        TcpProxy(host, port) as proxy,
        mqtt_client(port) as watcher,
        make(proxy.url, on_sent=on_sent) as transport,
    ):
        await watcher.subscribe(topic, qos=1)
        async with disconnected(transport, proxy):
            ids = [transport.publish_nowait(topic, payload) for payload in payloads]
            assert transport.queued == len(payloads)
        async with asyncio.timeout(DEADLINE):
            await all_sent.wait()
        assert transport.queued == 0
        received = [(await next_message(watcher)).payload for _ in payloads]
    assert received == payloads
    assert sent == ids


async def test_state_changes_show_the_link_going_down_and_coming_back(
    broker: EmbeddedBroker,
) -> None:
    async with (
        TcpProxy("127.0.0.1", broker.listener("mqtt").port) as proxy,
        make(proxy.url) as transport,
    ):
        changes = aiter(transport.state_changes())
        assert (await anext(changes)).state is CONNECTED
        async with disconnected(transport, proxy):
            pass
        seen = []
        async with asyncio.timeout(DEADLINE):
            async for change in changes:
                seen.append(change)
                if change.state is CONNECTED:
                    break
    states = [change.state for change in seen]
    assert states[0] is DISCONNECTED
    assert states[-1] is CONNECTED
    assert set(states) <= {DISCONNECTED, CONNECTING, CONNECTED}
    down = seen[0]
    assert down.reason
    assert down.retry_in is not None
    assert 0 <= down.retry_in <= FAST.maximum
    assert seen[-1].session_present  # the broker kept the session across the cut


async def test_a_persistent_session_delivers_what_was_sent_while_the_link_was_down(
    any_broker: tuple[str, int],
) -> None:
    host, port = any_broker
    topic = unique_topic()
    async with TcpProxy(host, port) as proxy, make(proxy.url) as transport:
        await transport.subscribe(topic)
        messages = transport.messages()
        async with disconnected(transport, proxy):
            await publish_direct(port, topic, [b"one", b"two", b"three"])
        await wait_for(transport, CONNECTED)
        assert transport.session_present
        received = await take(messages, 3)
    assert [m.payload for m in received] == [b"one", b"two", b"three"]


async def test_a_new_transport_with_the_same_client_id_takes_over_the_session(
    any_broker: tuple[str, int],
) -> None:
    host, port = any_broker
    topic, client_id = unique_topic(), unique_id()
    async with make(f"mqtt://{host}:{port}", client_id=client_id) as transport:
        await transport.subscribe(topic)
    await publish_direct(port, topic, [b"while the process was gone"])
    async with make(f"mqtt://{host}:{port}", client_id=client_id) as transport:
        assert transport.session_present
        [received] = await take(transport.messages(), 1)
    assert received.payload == b"while the process was gone"


async def test_subscriptions_are_made_again_when_the_broker_lost_the_session() -> None:
    topic = unique_topic()
    async with (
        embedded_broker() as first,
        TcpProxy("127.0.0.1", first.listener("mqtt").port) as proxy,
        make(proxy.url) as transport,
    ):
        await transport.subscribe(topic)
        messages = transport.messages()
        proxy.refuse()
        await first.stop()  # it kept sessions in memory only: they are gone
        await wait_for(transport, DISCONNECTED)
        async with embedded_broker() as second:
            port = second.listener("mqtt").port
            proxy.retarget("127.0.0.1", port)
            proxy.accept()
            await wait_for(transport, CONNECTED)
            assert not transport.session_present
            await publish_direct(port, topic, [b"after the restart"])
            [received] = await take(messages, 1)
    assert received.payload == b"after the restart"


async def test_queued_messages_survive_a_restart_of_a_durable_broker(tmp_path: Path) -> None:
    topic = unique_topic()
    async with (
        embedded_broker(state_dir=tmp_path) as first,
        TcpProxy("127.0.0.1", first.listener("mqtt").port) as proxy,
        make(proxy.url) as transport,
    ):
        await transport.subscribe(topic)
        messages = transport.messages()
        proxy.refuse()
        proxy.cut()
        await wait_for(transport, DISCONNECTED)
        await publish_direct(first.listener("mqtt").port, topic, [b"kept on disk"])
        await first.stop()
        async with embedded_broker(state_dir=tmp_path) as second:
            proxy.retarget("127.0.0.1", second.listener("mqtt").port)
            proxy.accept()
            await wait_for(transport, CONNECTED)
            assert transport.session_present
            [received] = await take(messages, 1)
    assert received.payload == b"kept on disk"


async def test_subscription_changes_made_while_the_link_is_down_apply_when_it_is_back(
    broker: EmbeddedBroker,
) -> None:
    kept, dropped, added = unique_topic("kept"), unique_topic("dropped"), unique_topic("added")
    port = broker.listener("mqtt").port
    async with TcpProxy("127.0.0.1", port) as proxy, make(proxy.url) as transport:
        await transport.subscribe(kept)
        await transport.subscribe(dropped)
        messages = transport.messages()
        async with disconnected(transport, proxy):
            changing = asyncio.gather(transport.subscribe(added), transport.unsubscribe(dropped))
            await asyncio.sleep(0)  # one step of each: both calls are made while the link is down
            assert transport.state is not CONNECTED
        async with asyncio.timeout(DEADLINE):
            assert tuple(await changing) == (1, None)
        for topic in (dropped, kept, added):  # one client gets them in this order, if at all
            await publish_direct(port, topic, [topic.encode()])
        received = await take(messages, 2)
    assert [m.topic for m in received] == [kept, added]


async def test_a_silent_link_is_noticed_by_keepalive_and_made_again(broker: EmbeddedBroker) -> None:
    topic = unique_topic()
    async with (
        TcpProxy("127.0.0.1", broker.listener("mqtt").port) as proxy,
        make(proxy.url, keepalive=1) as transport,
    ):
        await transport.subscribe(topic)
        messages = transport.messages()
        proxy.stall()  # no byte passes, nothing is closed: only keepalive can tell
        await wait_for(transport, DISCONNECTED)
        proxy.resume()
        await wait_for(transport, CONNECTED)
        await transport.publish(topic, b"through the new link")
        [received] = await take(messages, 1)
    assert received.payload == b"through the new link"


async def test_a_transport_started_while_the_broker_is_unreachable_queues_and_delivers_later(
    broker: EmbeddedBroker,
) -> None:
    topic = unique_topic()
    port = broker.listener("mqtt").port
    async with TcpProxy("127.0.0.1", port) as proxy, mqtt_client(port) as watcher:
        await watcher.subscribe(topic, qos=1)
        proxy.refuse()
        async with make(proxy.url, max_outbox=3) as transport:
            assert transport.state in {DISCONNECTED, CONNECTING}
            for payload in (b"a", b"b", b"c"):
                transport.publish_nowait(topic, payload)
            with pytest.raises(TransportError, match="outbox is full") as full:
                transport.publish_nowait(topic, b"d")
            assert full.value.reason == "outbox-full"
            assert transport.queued == 3
            proxy.accept()
            received = [(await next_message(watcher)).payload for _ in range(3)]
            assert received == [b"a", b"b", b"c"]


async def test_birth_and_last_will_keep_presence_right(any_broker: tuple[str, int]) -> None:
    host, port = any_broker
    presence = unique_topic("presence")
    birth = Publication(presence, b"online", retain=True)
    will = Publication(presence, b"offline", retain=True)
    async with TcpProxy(host, port) as proxy, mqtt_client(port) as watcher:
        await watcher.subscribe(presence, qos=1)
        async with make(proxy.url, birth=birth, will=will) as transport:
            assert (await next_message(watcher)).payload == b"online"
            async with disconnected(transport, proxy):
                assert (await next_message(watcher)).payload == b"offline"  # the broker's will
            assert (await next_message(watcher)).payload == b"online"
        assert (await next_message(watcher)).payload == b"offline"  # a clean close says so too
    async with mqtt_client(port) as late:
        await late.subscribe(presence, qos=1)
        retained = await next_message(late)
    assert (retained.payload, retained.retain) == (b"offline", True)


# -- credentials and permissions ------------------------------------------------------------------


@pytest.fixture(scope="module")
def org_snapshot(tmp_path_factory: pytest.TempPathFactory) -> DirectorySnapshot:
    path = tmp_path_factory.mktemp("directory") / "directory.db"
    with Directory(path) as directory:
        directory.init_org("acme", admin="root", password="root password")
        directory.add_user("root", "bob", dept="ops", password=BOB_PASSWORD)
        return directory.snapshot()


@pytest.fixture
async def guarded_broker(org_snapshot: DirectorySnapshot) -> AsyncIterator[EmbeddedBroker]:
    """An embedded broker behind the directory's authentication and ACL."""
    gate = AccessGate(AccessPolicy(org_snapshot))
    async with EmbeddedBroker(BrokerSettings(port=0), access=gate) as running:
        yield running


async def test_a_wrong_password_fails_at_once_and_is_not_retried(
    guarded_broker: EmbeddedBroker,
) -> None:
    async with TcpProxy("127.0.0.1", guarded_broker.listener("mqtt").port) as proxy:
        transport = make(proxy.url, client_id="bob.laptop", username="bob", password="wrong")
        started = time.monotonic()
        with pytest.raises(AuthenticationError, match=r"refused the login of client 'bob\.laptop'"):
            await transport.__aenter__()
        assert time.monotonic() - started < 5.0
        assert transport.state is CLOSED
        assert isinstance(transport.error, AuthenticationError)
        assert proxy.accepted == 1  # one attempt; the loop has ended, so there is no other
        with pytest.raises(AuthenticationError):
            transport.publish_nowait("mc/acme/_k/bob", b"x")


async def test_credentials_refused_after_being_let_in_are_retried_then_reported(
    broker: EmbeddedBroker, guarded_broker: EmbeddedBroker
) -> None:
    # Let in by an open broker, then sent to one where the password is wrong: the broker may be
    # refusing a client that reconnects too often, so the transport tries twice more.
    async with (
        TcpProxy("127.0.0.1", broker.listener("mqtt").port) as proxy,
        make(
            proxy.url, client_id="bob.laptop", username="bob", password="wrong", auth_retries=2
        ) as transport,
    ):
        messages = transport.messages()
        proxy.retarget("127.0.0.1", guarded_broker.listener("mqtt").port)
        proxy.cut()
        with pytest.raises(AuthenticationError):
            await take(messages, 1)
        assert transport.state is CLOSED
        assert proxy.accepted == 1 + 3


async def test_the_right_password_gets_in_and_a_forbidden_subscription_is_refused(
    guarded_broker: EmbeddedBroker,
) -> None:
    url = guarded_broker.listener("mqtt").url
    options = {"client_id": "bob.laptop", "username": "bob", "password": BOB_PASSWORD}
    async with make(url, **options) as transport:
        assert await transport.subscribe("mc/acme/_k/+") == 1
        with pytest.raises(PermissionDeniedError, match="mc/acme/ops/secret") as refused:
            await transport.subscribe("mc/acme/ops/secret")
        assert refused.value.actor == "bob"
        assert "password" not in repr(transport)
        assert BOB_PASSWORD not in repr(transport)


# -- bad input -----------------------------------------------------------------------------------


async def test_bad_publications_are_refused_with_a_clear_error(broker: EmbeddedBroker) -> None:
    async with make(broker.listener("mqtt").url, max_payload=1024) as transport:
        with pytest.raises(TopicError, match="wildcard"):
            await transport.publish("a/+/b", b"x")
        with pytest.raises(TopicError):
            await transport.subscribe("a/#/b")
        with pytest.raises(TransportError, match="over the limit") as big:
            await transport.publish("a/b", b"x" * 1025)
        assert big.value.reason == "too-large"
        with pytest.raises(TransportError, match="QoS 2"):
            await transport.publish("a/b", b"x", qos=2)
        with pytest.raises(TypeError, match="bytes"):
            transport.publish_nowait("a/b", "text")  # type: ignore[arg-type]  # the point of it
    with pytest.raises(TransportError, match="closed") as closed:
        await transport.publish("a/b", b"x")
    assert closed.value.reason == "closed"
    with pytest.raises(TransportError, match="make a new Transport") as reused:
        await transport.__aenter__()
    assert reused.value.reason == "reused"


class RogueBroker:
    """An MQTT server speaking by hand: it lets anyone in, then sends what a test tells it."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[RawClient] = asyncio.Queue()
        self._all: list[RawClient] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for client in self._all:
            await client.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = RawClient(reader, writer)
        self._all.append(client)
        if (await client.read()).type == CONNECT_PACKET:
            await client.send(b"\x20\x02\x00\x00")  # CONNACK: accepted, no session
            await self.connections.put(client)


def raw_publish(topic: bytes, payload: bytes, packet_id: int) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", packet_id) + payload
    return encode(3, 0x02, body)  # PUBLISH, QoS 1


async def test_a_topic_that_is_not_utf8_is_dropped_and_the_link_stays_up() -> None:
    async with RogueBroker() as rogue, make(f"mqtt://127.0.0.1:{rogue.port}") as transport:
        assert transport.state is CONNECTED
        server = await asyncio.wait_for(rogue.connections.get(), DEADLINE)
        messages = transport.messages()
        await server.send(raw_publish(b"bad/\xff\xfe", b"poison", 1))
        await server.send(raw_publish(b"good/topic", b"fine", 2))
        # The poison is acknowledged: a persistent session must not send it after each connect.
        assert (await server.read()).body == b"\x00\x01"
        [received] = await take(messages, 1)
        assert (received.topic, received.payload) == ("good/topic", b"fine")
        # A message is acknowledged once the consumer asks for the next one.
        asking = asyncio.ensure_future(anext(messages))
        puback = await server.read()
        assert (puback.type, puback.body) == (PUBACK, b"\x00\x02")
        asking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asking
        assert transport.state is CONNECTED
        assert rogue.connections.empty()  # no reconnect happened


async def test_a_packet_no_broker_may_send_ends_the_link_and_it_is_made_again() -> None:
    async with RogueBroker() as rogue, make(f"mqtt://127.0.0.1:{rogue.port}") as transport:
        first = await asyncio.wait_for(rogue.connections.get(), DEADLINE)
        await first.send(b"\xf0\x00")  # packet type 15: reserved in MQTT 3.1.1
        await wait_for(transport, DISCONNECTED, CONNECTING)
        second = await asyncio.wait_for(rogue.connections.get(), DEADLINE)
        await wait_for(transport, CONNECTED)
        assert second is not first


async def test_an_error_in_the_body_comes_out_as_itself(broker: EmbeddedBroker) -> None:
    with pytest.raises(ValueError, match="the application's own"):
        async with make(broker.listener("mqtt").url) as transport:
            raise ValueError("the application's own error")
    assert transport.state is CLOSED


async def test_closing_while_the_link_is_down_is_prompt_and_leaves_nothing_running(
    broker: EmbeddedBroker,
) -> None:
    async with TcpProxy("127.0.0.1", broker.listener("mqtt").port) as proxy:
        proxy.refuse()
        transport = make(proxy.url, backoff=Backoff(initial=30.0, maximum=30.0))
        async with transport:
            await wait_for(transport, DISCONNECTED)
            transport.publish_nowait("a/b", b"never sent")
            sending = asyncio.ensure_future(transport.publish("a/b", b"never acknowledged"))
            await asyncio.sleep(0)  # one step of the task: publish() puts the message in the outbox
            assert transport.queued == 2
            started = time.monotonic()
        assert time.monotonic() - started < 2.0  # the 30 s backoff did not hold it up
        assert transport.state is CLOSED
        with pytest.raises(TransportError, match="closed first"):
            await sending
    running = [task.get_name() for task in asyncio.all_tasks() if not task.done()]
    assert not [name for name in running if name.startswith("meshchat[")]


# -- manual acknowledgement ----------------------------------------------------------------------


async def test_manual_ack_sends_no_puback_until_asked_and_then_in_arrival_order() -> None:
    async with RogueBroker() as rogue, make(f"mqtt://127.0.0.1:{rogue.port}") as transport:
        server = await asyncio.wait_for(rogue.connections.get(), DEADLINE)
        deliveries = transport.messages(manual_ack=True)
        for packet_id in (1, 2, 3):
            await server.send(raw_publish(b"a/b", b"%d" % packet_id, packet_id))
        first, second, third = [await anext(deliveries) for _ in range(3)]
        assert [d.payload for d in (first, second, third)] == [b"1", b"2", b"3"]
        # Taking the next delivery acknowledged nothing, and neither did acknowledging out of
        # order: the next packet on the wire is this QoS 0 publish, not a PUBACK.
        third.ack()
        second.ack()
        transport.publish_nowait("marker/topic", b"marker", qos=0)
        marker = await server.read()
        assert (marker.type, marker.body.endswith(b"marker")) == (3, True)
        first.ack()  # the head: all three go out, in the order they arrived
        acks = [await server.read() for _ in range(3)]
        assert [(p.type, struct.unpack("!H", p.body)[0]) for p in acks] == [
            (PUBACK, 1),
            (PUBACK, 2),
            (PUBACK, 3),
        ]
        first.ack()  # twice is harmless
        assert (first.acked, repr(first).count("bytes")) == (True, 1)
        assert first.message == Incoming("a/b", b"1", qos=1, retain=False)


async def test_a_delivery_from_a_dropped_link_holds_up_no_acknowledgement() -> None:
    async with RogueBroker() as rogue, make(f"mqtt://127.0.0.1:{rogue.port}") as transport:
        old = await asyncio.wait_for(rogue.connections.get(), DEADLINE)
        deliveries = transport.messages(manual_ack=True)
        await old.send(raw_publish(b"a/b", b"one", 1))
        stale = await anext(deliveries)
        await old.close()  # the link drops before `stale` was acknowledged
        new = await asyncio.wait_for(rogue.connections.get(), DEADLINE)
        await new.send(raw_publish(b"a/b", b"one", 7))  # the broker sends it again
        await new.send(raw_publish(b"a/b", b"two", 8))
        again, two = await anext(deliveries), await anext(deliveries)
        assert (again.payload, two.payload) == (b"one", b"two")
        two.ack()
        again.ack()
        acks = [await new.read() for _ in range(2)]
        assert [struct.unpack("!H", p.body)[0] for p in acks] == [7, 8]
        stale.ack()  # its packet id died with its link: nothing is sent
        transport.publish_nowait("marker/topic", b"marker", qos=0)
        assert (await new.read()).type == 3


async def test_unacknowledged_deliveries_come_back_after_the_link_drops(
    broker: EmbeddedBroker,
) -> None:
    topic = unique_topic()
    port = broker.listener("mqtt").port
    async with TcpProxy("127.0.0.1", port) as proxy, make(proxy.url) as transport:
        await transport.subscribe(topic)
        deliveries = transport.messages(manual_ack=True)
        await publish_direct(port, topic, [b"kept", b"not yet", b"nor this"])
        async with asyncio.timeout(DEADLINE):
            kept, *_rest = [await anext(deliveries) for _ in range(3)]
        kept.ack()
        # A QoS 1 round trip on the same connection: the broker has read the PUBACK before it.
        await transport.publish(unique_topic(), b"barrier")
        async with disconnected(transport, proxy):
            pass
        await wait_for(transport, CONNECTED)
        assert transport.session_present
        async with asyncio.timeout(DEADLINE):
            again = [await anext(deliveries) for _ in range(2)]
        for delivery in again:
            delivery.ack()
        # A marker after the redeliveries: "kept" was acknowledged, so it did not come back.
        await publish_direct(port, topic, [b"marker"])
        async with asyncio.timeout(DEADLINE):
            marker = await anext(deliveries)
    assert [d.payload for d in again] == [b"not yet", b"nor this"]
    assert marker.payload == b"marker"


async def test_the_default_mode_still_acknowledges_on_asking_for_the_next() -> None:
    async with RogueBroker() as rogue, make(f"mqtt://127.0.0.1:{rogue.port}") as transport:
        server = await asyncio.wait_for(rogue.connections.get(), DEADLINE)
        messages = transport.messages()
        await server.send(raw_publish(b"a/b", b"1", 1))
        await server.send(raw_publish(b"a/b", b"2", 2))
        assert (await anext(messages)).payload == b"1"
        assert (await anext(messages)).payload == b"2"
        puback = await server.read()
        assert (puback.type, puback.body) == (PUBACK, b"\x00\x01")
