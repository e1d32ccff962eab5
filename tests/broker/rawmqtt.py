"""A bare MQTT 3.1.1 client over a TCP socket, and small aiomqtt helpers, for the broker tests.

aiomqtt and paho always answer PUBLISH with PUBACK, ping on time and hide the DUP flag; the bare
client does nothing it is not told to, so a test can go silent, stall mid-packet, withhold an
acknowledgement or send what the protocol forbids, and see every flag the broker sets.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from typing import Self

import aiomqtt

__all__ = [
    "CONNECT",
    "PUBACK",
    "PUBLISH",
    "Packet",
    "Publish",
    "RawClient",
    "encode",
    "messages_until",
    "mqtt_client",
    "next_message",
]

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

DEADLINE = 10.0
"""Seconds any single wait for the broker may take before the test fails."""


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _remaining_length(length: int) -> bytes:
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(encoded)


def encode(packet_type: int, flags: int, body: bytes) -> bytes:
    """One MQTT control packet: fixed header and `body`."""
    return bytes([packet_type << 4 | flags]) + _remaining_length(len(body)) + body


@dataclass(frozen=True, slots=True)
class Packet:
    """A control packet as read from the wire."""

    type: int
    flags: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Publish:
    """A decoded PUBLISH packet, with every flag the broker set."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None

    @classmethod
    def decode(cls, packet: Packet) -> Self:
        """Decode a PUBLISH packet's flags, topic, packet identifier and payload."""
        assert packet.type == PUBLISH, f"expected PUBLISH, got packet type {packet.type}"
        qos = (packet.flags >> 1) & 0x03
        (topic_length,) = struct.unpack_from("!H", packet.body)
        offset = 2 + topic_length
        topic = packet.body[2:offset].decode()
        packet_id = None
        if qos:
            (packet_id,) = struct.unpack_from("!H", packet.body, offset)
            offset += 2
        return cls(
            topic=topic,
            payload=packet.body[offset:],
            qos=qos,
            retain=bool(packet.flags & 0x01),
            dup=bool(packet.flags & 0x08),
            packet_id=packet_id,
        )


class RawClient:
    """One TCP connection speaking MQTT 3.1.1 by hand; every read has a deadline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Wrap an open connection; use `RawClient.connect` to make one."""
        self.reader = reader
        self.writer = writer
        self.session_present = False

    @classmethod
    async def connect(
        cls,
        port: int,
        client_id: str,
        *,
        clean_session: bool = True,
        keepalive: int = 60,
        will: tuple[str, bytes] | None = None,
        username: str | None = None,
    ) -> Self:
        """Open a connection and complete CONNECT/CONNACK; the broker must accept it."""
        client = await cls.open(port)
        return_code = await client.handshake(
            client_id,
            clean_session=clean_session,
            keepalive=keepalive,
            will=will,
            username=username,
        )
        assert return_code == 0, f"the broker refused the connection with code {return_code}"
        return client

    @classmethod
    async def open(cls, port: int, *, receive_buffer: int | None = None) -> Self:
        """Open a TCP connection to the broker on 127.0.0.1 without saying anything yet.

        Args:
            port: the broker's port.
            receive_buffer: a small kernel receive buffer, for a client that stops reading.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)  # noqa: FBT003  # the socket API
        try:
            async with asyncio.timeout(DEADLINE):
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
                reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer)

    async def handshake(
        self,
        client_id: str,
        *,
        clean_session: bool = True,
        keepalive: int = 60,
        will: tuple[str, bytes] | None = None,
        username: str | None = None,
    ) -> int:
        """Send CONNECT and return the CONNACK return code."""
        flags = 0x02 if clean_session else 0
        payload = _string(client_id)
        if will is not None:
            flags |= 0x04 | 0x08  # will flag, will QoS 1
            payload += _string(will[0]) + _string(will[1])
        if username is not None:
            flags |= 0x80
            payload += _string(username)
        variable = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
        await self.send(encode(CONNECT, 0, variable + payload))
        connack = await self.read()
        assert connack.type == CONNACK, f"expected CONNACK, got packet type {connack.type}"
        self.session_present = bool(connack.body[0] & 0x01)
        return connack.body[1]

    async def send(self, data: bytes) -> None:
        """Write raw bytes (whole packets, or deliberately part of one)."""
        self.writer.write(data)
        async with asyncio.timeout(DEADLINE):
            await self.writer.drain()

    async def read(self, deadline: float = DEADLINE) -> Packet:
        """The next control packet.

        Raises:
            asyncio.IncompleteReadError: the broker closed the connection.
            TimeoutError: nothing arrived within `deadline` seconds.
        """
        async with asyncio.timeout(deadline):
            first = await self.reader.readexactly(1)
            length, multiplier = 0, 1
            while True:
                (byte,) = await self.reader.readexactly(1)
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                if not byte & 0x80:
                    break
            body = await self.reader.readexactly(length)
        return Packet(first[0] >> 4, first[0] & 0x0F, body)

    async def read_publish(self, deadline: float = DEADLINE) -> Publish:
        """The next packet, which must be a PUBLISH."""
        return Publish.decode(await self.read(deadline))

    async def wait_closed_by_broker(self, deadline: float = DEADLINE) -> None:
        """Read until the broker closes the connection; fails if it stays open past `deadline`."""
        async with asyncio.timeout(deadline):
            while await self.reader.read(65536):
                pass

    async def subscribe(self, topic: str, qos: int = 1, packet_id: int = 1) -> int:
        """Subscribe and return the granted QoS from the SUBACK."""
        body = struct.pack("!H", packet_id) + _string(topic) + bytes([qos])
        await self.send(encode(SUBSCRIBE, 0x02, body))
        while True:  # retained messages may be sent around the SUBACK
            packet = await self.read()
            if packet.type == SUBACK:
                return packet.body[2]

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 1, retain: bool = False
    ) -> None:
        """Send a PUBLISH (without waiting for any acknowledgement)."""
        body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
        await self.send(encode(PUBLISH, qos << 1 | int(retain), body))

    async def puback(self, packet_id: int) -> None:
        """Acknowledge a QoS 1 PUBLISH."""
        await self.send(encode(PUBACK, 0, struct.pack("!H", packet_id)))

    async def ping(self) -> list[Packet]:
        """Send PINGREQ and read up to the PINGRESP; returns the packets that came before it.

        The round trip proves the connection is served, and gives the broker the time to send
        whatever it was free to send: a test asserting "nothing more" checks the list is empty.
        """
        await self.send(encode(PINGREQ, 0, b""))
        before: list[Packet] = []
        while (packet := await self.read()).type != PINGRESP:
            before.append(packet)
        return before

    async def disconnect(self) -> None:
        """Say DISCONNECT and close the connection."""
        await self.send(encode(DISCONNECT, 0, b""))
        await self.close()

    async def close(self) -> None:
        """Close the TCP connection without a DISCONNECT (an abnormal end for the broker)."""
        self.writer.close()
        try:
            async with asyncio.timeout(DEADLINE):
                await self.writer.wait_closed()
        except (ConnectionError, TimeoutError):
            pass

    async def __aenter__(self) -> Self:
        """The client itself; it is already connected."""
        return self

    async def __aexit__(self, *_exc: object) -> None:
        """Close the connection."""
        await self.close()


def mqtt_client(
    port: int, client_id: str = "", *, clean_session: bool | None = None
) -> aiomqtt.Client:
    """An aiomqtt client for the broker on 127.0.0.1:`port`, with a connect deadline."""
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=client_id or None,
        clean_session=clean_session,
        timeout=DEADLINE,
    )


async def messages_until(
    client: aiomqtt.Client,
    marker_topic: str,
    deadline: float = DEADLINE,
    *,
    marker: bytes | None = None,
) -> list[aiomqtt.Message]:
    """Every message `client` receives before the first one on `marker_topic` (with `marker`).

    The broker delivers to one client in order, so a marker published after a scenario is a
    barrier: anything the broker was going to send the client by then arrives before it.
    """
    received: list[aiomqtt.Message] = []
    async with asyncio.timeout(deadline):
        async for message in client.messages:
            if message.topic.value == marker_topic and (
                marker is None or message.payload == marker
            ):
                return received
            received.append(message)
    msg = "the client disconnected before the marker arrived"
    raise AssertionError(msg)


async def next_message(client: aiomqtt.Client, deadline: float = DEADLINE) -> aiomqtt.Message:
    """The next message `client` receives."""
    async with asyncio.timeout(deadline):
        return await anext(aiter(client.messages))
