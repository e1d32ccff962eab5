"""The embedded broker routes messages on every listener, speaks TLS 1.2+ only, fails clearly."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import psutil
import pytest
import trustme

from meshchat.broker import BrokerSettings, BrokerState, EmbeddedBroker, TlsFiles, is_loopback
from meshchat.errors import AddressInUseError, BrokerError, ConfigError
from tests.brokers import embedded_broker
from tests.mqtt import round_trip


async def test_message_goes_from_publisher_to_subscriber(broker: EmbeddedBroker) -> None:
    listener = broker.listener("mqtt")
    assert listener.port != 0
    assert listener.url == f"mqtt://127.0.0.1:{listener.port}"
    payload = bytes(range(256))
    assert await round_trip(listener.host, listener.port, payload) == payload


async def test_websocket_client_reaches_a_tcp_subscriber() -> None:
    async with embedded_broker(ws_port=0) as broker:
        ws = broker.listener("ws")
        tcp = broker.listener("mqtt")
        assert ws.url.startswith("ws://")
        received = await round_trip(
            ws.host, ws.port, b"over ws", transport="websockets", subscriber_port=tcp.port
        )
        assert received == b"over ws"


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


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_tls_and_secure_websocket_listeners_carry_messages(
    ca: trustme.CA, tls_files: TlsFiles
) -> None:
    async with embedded_broker(tls=tls_files, tls_port=0, ws_port=0) as broker:
        schemes = [listener.scheme for listener in broker.listeners]
        assert schemes == ["mqtt", "ws", "mqtts", "wss"]
        mqtts, wss = broker.listener("mqtts"), broker.listener("wss")
        context = client_context(ca)
        assert await round_trip(mqtts.host, mqtts.port, b"tls", tls_context=context) == b"tls"
        received = await round_trip(
            wss.host, wss.port, b"wss", transport="websockets", tls_context=context
        )
        assert received == b"wss"


def tls_handshake(port: int, ca: trustme.CA, version: ssl.TLSVersion) -> str:
    """Handshake with exactly `version`; returns the negotiated version or raises ssl.SSLError."""
    context = client_context(ca)
    with warnings.catch_warnings():
        # Python deprecates TLS 1.1; speaking it on purpose is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    # OpenSSL's default security level refuses TLS 1.1 on the client side already; lower it so
    # that the refusal we observe is the server's.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        negotiated = tls.version()
        assert negotiated is not None
        return negotiated


@pytest.fixture
def permissive_tls_server(tls_files: TlsFiles) -> Iterator[int]:
    """A plain TLS server that accepts TLS 1.1: shows this machine's client can speak it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.load_cert_chain(tls_files.certfile, tls_files.keyfile)
    server = socket.create_server(("127.0.0.1", 0))
    port = int(server.getsockname()[1])

    def serve() -> None:
        conn, _ = server.accept()
        try:
            with context.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    server.close()
    thread.join(timeout=5)


async def test_tls_1_1_client_is_refused(
    ca: trustme.CA, tls_files: TlsFiles, permissive_tls_server: int
) -> None:
    try:
        control = tls_handshake(permissive_tls_server, ca, ssl.TLSVersion.TLSv1_1)
    except ssl.SSLError as exc:
        pytest.skip(f"this machine's OpenSSL cannot speak TLS 1.1 at all, nothing to test: {exc}")
    assert control == "TLSv1.1"
    async with embedded_broker(tls=tls_files, tls_port=0) as broker:
        port = broker.listener("mqtts").port
        assert await asyncio.to_thread(tls_handshake, port, ca, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(tls_handshake, port, ca, ssl.TLSVersion.TLSv1_1)


def test_unusable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    missing = TlsFiles(tmp_path / "nope.pem", tmp_path / "nope.key")
    with pytest.raises(ConfigError, match="does not exist"):
        missing.server_context()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        TlsFiles(garbage, garbage).server_context()


async def test_taken_port_is_a_clear_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = int(taken.getsockname()[1])
        with pytest.raises(AddressInUseError) as caught:
            await EmbeddedBroker(BrokerSettings(port=port)).start()
    assert caught.value.port == port
    assert str(caught.value) == (
        f"cannot listen for mqtt on 127.0.0.1:{port}: the address is already in use"
    )


async def test_failed_start_leaves_no_listener_open() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        ws_port = int(taken.getsockname()[1])
        broker = EmbeddedBroker(BrokerSettings(port=0, ws_port=ws_port))
        with pytest.raises(AddressInUseError, match=f"ws on 127.0.0.1:{ws_port}"):
            await broker.start()
    assert broker.state is BrokerState.STOPPED
    assert broker.listeners == []
    # The TCP listener amqtt had opened before the WebSocket one failed is closed again.
    assert not [
        conn
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    ]


async def test_broker_runs_once_and_leaves_no_task_behind() -> None:
    broker = EmbeddedBroker(BrokerSettings(port=0))
    async with broker:
        assert broker.state.value == "running"
        listener = broker.listener("mqtt")
        async with aiomqtt.Client(listener.host, listener.port) as client:
            await client.subscribe("mc/#")
    assert broker.state is BrokerState.STOPPED
    assert asyncio.all_tasks() == {asyncio.current_task()}
    with pytest.raises(BrokerError, match="create a new one"):
        await broker.start()
    with pytest.raises(BrokerError, match="no ws listener"):
        broker.listener("ws")


async def test_stop_with_a_client_still_connected() -> None:
    broker = EmbeddedBroker(BrokerSettings(port=0))
    await broker.start()
    listener = broker.listener("mqtt")
    client = aiomqtt.Client(listener.host, listener.port)
    await client.__aenter__()
    try:
        await broker.stop()
        assert broker.state is BrokerState.STOPPED
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(10):
                await client.publish("mc/x/y", b"after stop", qos=1)
    finally:
        await client.__aexit__(None, None, None)


def _non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not is_loopback(address.address):
                return str(address.address)
    return None


async def test_anonymous_clients_from_other_hosts_are_refused() -> None:
    own_address = _non_loopback_ipv4()
    if own_address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    async with embedded_broker(host="0.0.0.0") as broker:  # noqa: S104  # the point of the test
        port = broker.listener("mqtt").port
        assert await round_trip("127.0.0.1", port, b"local") == b"local"
        with pytest.raises(aiomqtt.MqttCodeError):
            async with asyncio.timeout(10), aiomqtt.Client(own_address, port):
                pass


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("", False),
        (None, False),
        ("not an address", False),
    ],
)
def test_is_loopback(address: str | None, expected: bool) -> None:
    assert is_loopback(address) is expected


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"port": 70000}, "port 70000 is outside"),
        ({"ws_port": -1}, "ws-port -1 is outside"),
        ({"host": "::1"}, "IPv6"),
    ],
)
def test_bad_settings_are_config_errors(settings: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        BrokerSettings(**settings)  # type: ignore[arg-type]  # deliberately loose
