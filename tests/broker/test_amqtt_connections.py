"""Connection defects of amqtt 0.12.1 the embedded broker must not have, and the version pin.

A client that goes silent is cut after 1.5 keep-alive periods and its will is published; TLS
listeners can require client certificates from a configured CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import ssl
import uuid
from pathlib import Path
from typing import Literal

import pytest
import trustme

from meshchat.broker import BrokerSettings, EmbeddedBroker, Scheme, TlsFiles
from meshchat.broker.handler import CLOSE_DEADLINE
from meshchat.errors import ConfigError
from tests.broker.rawmqtt import CONNECT, PUBLISH, RawClient, encode, mqtt_client, next_message
from tests.brokers import embedded_broker
from tests.mqtt import round_trip, unique_topic

PINNED_AMQTT = "0.12.1"


def test_amqtt_is_the_version_core_was_written_against() -> None:
    installed = importlib.metadata.version("amqtt")
    assert installed == PINNED_AMQTT, (
        f"amqtt {installed} is installed, but amqtt is pinned to {PINNED_AMQTT} because "
        "meshchat/broker/core.py and handler.py override its internals; re-check every override "
        "before upgrading"
    )


async def _keep_pinging(client: RawClient, stop: asyncio.Event) -> None:
    """Ping well within a 1 s keep-alive until `stop` is set."""
    while not stop.is_set():
        assert await client.ping() == []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.4):
                await stop.wait()


@pytest.mark.parametrize("silence", ["after CONNECT", "in the middle of a packet"])
async def test_a_silent_client_is_cut_after_one_and_a_half_keepalives_and_its_will_published(
    broker: EmbeddedBroker, silence: str
) -> None:
    port = broker.listener("mqtt").port
    will_topic = unique_topic()
    loop = asyncio.get_running_loop()
    async with mqtt_client(port) as watcher:
        await watcher.subscribe(will_topic, qos=1)
        pinger = await RawClient.connect(port, f"pinger-{uuid.uuid4().hex}", keepalive=1)
        silent = await RawClient.connect(
            port, f"silent-{uuid.uuid4().hex}", keepalive=1, will=(will_topic, b"link lost")
        )
        async with pinger, silent, asyncio.TaskGroup() as tasks:
            if silence == "in the middle of a packet":
                packet = encode(PUBLISH, 0, b"\x00\x03a/bpayload that never ends")
                await silent.send(packet[:6])
            went_silent = loop.time()
            stop = asyncio.Event()
            tasks.create_task(_keep_pinging(pinger, stop), name="test.keep_pinging")
            will = await next_message(watcher)
            silent_for = loop.time() - went_silent
            stop.set()
            assert (will.topic.value, will.payload) == (will_topic, b"link lost")
            assert silent_for >= 1.5 - 0.05  # MQTT-3.1.2-24: not before 1.5 x keep-alive
            assert silent_for < 5
            await silent.wait_closed_by_broker()
        # A client that pings stays connected however long it lives.
        async with await RawClient.connect(port, "late", keepalive=1) as late:
            assert await late.ping() == []


async def _stalled_subscriber(broker: EmbeddedBroker, client_id: str) -> RawClient:
    """A subscriber that stopped reading while the broker had far more to send it."""
    port = broker.listener("mqtt").port
    topic = unique_topic()
    stalled = await RawClient.open(port, receive_buffer=4096)
    assert await stalled.handshake(client_id) == 0
    assert await stalled.subscribe(topic, qos=0) == 0
    async with mqtt_client(port) as witness, mqtt_client(port) as publisher:
        await witness.subscribe(topic, qos=0)
        # Far more than the kernel buffers between broker and subscriber can hold.
        for _ in range(128):
            await publisher.publish(topic, bytes(64 * 1024), qos=1)
        for _ in range(128):  # all routed: the broker is stuck writing to `stalled`
            await next_message(witness)
    return stalled


async def test_a_subscriber_that_reads_nothing_is_closed_for_good_when_the_broker_stops() -> None:
    broker = EmbeddedBroker(BrokerSettings(port=0))
    await broker.start()
    try:
        stalled = await _stalled_subscriber(broker, f"stalled-{uuid.uuid4().hex}")
        async with stalled:
            await broker.stop()
            # Nothing of the connection outlives the close deadline: no task waiting for the
            # client to read, no socket left open.
            left = asyncio.all_tasks() - {asyncio.current_task()}
            if left:
                _, pending = await asyncio.wait(left, timeout=CLOSE_DEADLINE + 5)
                assert not pending, f"tasks left after the broker stopped: {pending}"
            with contextlib.suppress(ConnectionResetError):
                await stalled.wait_closed_by_broker()
    finally:
        await broker.stop()


async def test_a_revoked_subscriber_that_reads_nothing_is_dropped_within_the_deadline(
    broker: EmbeddedBroker,
) -> None:
    client_id = f"revoked-{uuid.uuid4().hex}"
    async with await _stalled_subscriber(broker, client_id) as stalled:
        _, handler = broker._broker.sessions[client_id]
        assert await broker.disconnect(client_id)
        # The connection's reader is what waited forever on amqtt's graceful close.
        _, pending = await asyncio.wait([handler._reader_task], timeout=CLOSE_DEADLINE + 5)
        assert not pending, "the connection of a client that reads nothing was never closed"
        with contextlib.suppress(ConnectionResetError):
            await stalled.wait_closed_by_broker()


@pytest.fixture(scope="module")
def server_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def device_ca() -> trustme.CA:
    return trustme.CA()


def _write_tls_files(
    server_ca: trustme.CA, directory: Path, client_ca: trustme.CA | None
) -> TlsFiles:
    server = server_ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    server.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    server.private_key_pem.write_to_path(str(key_path))
    ca_path = None
    if client_ca is not None:
        ca_path = directory / "devices-ca.pem"
        client_ca.cert_pem.write_to_path(str(ca_path))
    return TlsFiles(cert_path, key_path, client_ca=ca_path)


def _client_context(server_ca: trustme.CA, identity_from: trustme.CA | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    server_ca.configure_trust(context)
    if identity_from is not None:
        identity_from.issue_cert("device-1@example.org").configure_cert(context)
    return context


_CONNECT = encode(CONNECT, 0, b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x04tls1")
_WS_UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: mqtt\r\n\r\n"
)


async def _first_answer(port: int, context: ssl.SSLContext, request: bytes) -> bytes:
    """Say `request` over TLS; the first bytes of the answer, or b"" if the broker hung up."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
        )
        try:
            writer.write(request)
            await writer.drain()
            return await reader.read(12)
        except (ssl.SSLError, ConnectionError):
            return b""  # TLS 1.3: the refusal (an alert) arrives after the handshake
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()


_EXCHANGES: dict[Scheme, tuple[bytes, bytes]] = {
    "mqtts": (_CONNECT, b"\x20\x02\x00\x00"),  # CONNECT, answered by CONNACK "accepted"
    "wss": (_WS_UPGRADE, b"HTTP/1.1 101"),  # WebSocket upgrade, answered by "switching"
}


@pytest.mark.parametrize("scheme", list(_EXCHANGES))
async def test_tls_listeners_can_require_a_client_certificate_from_a_ca(
    server_ca: trustme.CA, device_ca: trustme.CA, tmp_path: Path, scheme: Scheme
) -> None:
    request_bytes, accepted = _EXCHANGES[scheme]
    tls = _write_tls_files(server_ca, tmp_path, client_ca=device_ca)
    transport: Literal["tcp", "websockets"] = "websockets" if scheme == "wss" else "tcp"
    async with embedded_broker(tls=tls, tls_port=0, ws_port=0) as broker:
        listener = broker.listener(scheme)
        with_cert = _client_context(server_ca, identity_from=device_ca)
        received = await round_trip(
            listener.host, listener.port, b"device", transport=transport, tls_context=with_cert
        )
        assert received == b"device"
        answer = await _first_answer(listener.port, with_cert, request_bytes)
        assert answer.startswith(accepted)
        for identity in (None, trustme.CA()):  # no certificate, or one from a stranger's CA
            context = _client_context(server_ca, identity_from=identity)
            assert await _first_answer(listener.port, context, request_bytes) == b""


async def test_without_a_client_ca_tls_clients_need_no_certificate(
    server_ca: trustme.CA, tmp_path: Path
) -> None:
    tls = _write_tls_files(server_ca, tmp_path, client_ca=None)
    async with embedded_broker(tls=tls, tls_port=0) as broker:
        listener = broker.listener("mqtts")
        context = _client_context(server_ca, identity_from=None)
        assert await round_trip(listener.host, listener.port, b"x", tls_context=context) == b"x"


def test_an_unusable_client_ca_file_is_a_config_error(
    server_ca: trustme.CA, tmp_path: Path
) -> None:
    tls = _write_tls_files(server_ca, tmp_path, client_ca=None)
    missing = TlsFiles(tls.certfile, tls.keyfile, client_ca=tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match="client CA"):
        missing.server_context()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="client CA"):
        TlsFiles(tls.certfile, tls.keyfile, client_ca=garbage).server_context()
