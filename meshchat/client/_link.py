"""One MQTT connection for the transport: aiomqtt 2.5 with the few hooks it lacks.

aiomqtt 2.5 does not report CONNACK's session-present flag, cannot leave the acknowledgement of
a message to the application (aiomqtt issue #345), waits out its whole timeout when the broker
closes the connection before CONNACK, and drops the connection on a topic that is not UTF-8.
This module overrides the private hooks that fix those, and is the only place in meshchat that
touches aiomqtt's or paho's internals; `tests/client` pins the versions it was written against.
Each `Link` is used for one connection attempt and then thrown away, so no paho state (packet
ids, queued packets) ever crosses from one connection to the next.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

import aiomqtt
import aiomqtt.exceptions
import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__: list[str] = []  # internal: `meshchat.client.transport` is the public face

logger = logging.getLogger(__name__)

T = TypeVar("T")

SUBACK_FAILURE: Final = 0x80
_CONNACK_V311: Final = {1: 132, 2: 133, 3: 136, 4: 134, 5: 135}
"""MQTT 3.1.1 CONNACK return codes as the MQTT 5 reason codes paho 2 reports them with."""


def connack_code(exc: BaseException) -> int | None:
    """The refusal code (MQTT 5 numbering) of a failed connect, or None when it was no refusal."""
    if not isinstance(exc, aiomqtt.exceptions.MqttConnectError):
        return None
    rc = exc.rc
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    if isinstance(rc, int):
        return _CONNACK_V311.get(rc, rc)
    return None


class LinkDownError(Exception):
    """The current connection ended or must end; the message says why."""


async def acked(waiting: Awaitable[T], what: str, seconds: float) -> T:
    """Await a broker's acknowledgement; a broker that does not answer in time ends the link.

    Raises:
        LinkDownError: no answer within `seconds`, or the connection failed.
    """
    try:
        async with asyncio.timeout(seconds):
            return await waiting
    except TimeoutError:
        msg = f"the broker did not acknowledge {what} within {seconds:g} s"
        raise LinkDownError(msg) from None
    except aiomqtt.MqttError as exc:
        raise LinkDownError(f"sending {what} failed: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Received:
    """A PUBLISH as it arrived on one link, not yet acknowledged."""

    link: Link
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int

    def ack(self) -> None:
        """Acknowledge it, if the link it came on is still up (else the broker sends it again)."""
        if self.qos > 0:
            self.link.ack(self.mid, self.qos)


class Link(aiomqtt.Client):
    """An aiomqtt client for one connection, with session-present, manual acks and fast failure."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        deliver: Callable[[Received], bool],
        client_id: str,
        username: str | None,
        password: str | None,
        clean_session: bool,
        keepalive: int,
        will: aiomqtt.Will | None,
        transport: Literal["tcp", "websockets"],
        websocket_path: str | None,
        tls_context: ssl.SSLContext | None,
        connect_timeout: float,
        window: int,
    ) -> None:
        """Prepare a connection; nothing happens on the network until it is entered.

        Args:
            host: the broker's host.
            port: the broker's port.
            deliver: called with each incoming message; returns False when it cannot take it
                (it is then not acknowledged, so a persistent session delivers it again).
            client_id: the MQTT client identifier.
            username: the user name, if any.
            password: the password, if any.
            clean_session: whether the broker forgets the session when the link ends.
            keepalive: seconds between keepalive pings.
            will: the message the broker publishes when the link ends without DISCONNECT.
            transport: TCP or WebSocket.
            websocket_path: the WebSocket path.
            tls_context: TLS settings, or None for a plain connection.
            connect_timeout: seconds for the TCP connect, and again for the CONNACK.
            window: QoS 1 messages in flight at once.
        """
        super().__init__(
            host,
            port,
            username=username,
            password=password,
            identifier=client_id,
            clean_session=clean_session,
            keepalive=keepalive,
            will=will,
            transport=transport,
            websocket_path=websocket_path,
            tls_context=tls_context,
            timeout=connect_timeout,
            max_inflight_messages=window,
            logger=logging.getLogger(f"{__name__}.paho"),
        )
        self.session_present = False
        # aiomqtt warns from 10 pending calls on; a full window of QoS 1 messages is normal.
        self.pending_calls_threshold = window + 10
        self._deliver = deliver
        self._full_logged = False
        # paho acknowledges a QoS 1 message when on_message returns unless told not to; the
        # transport acknowledges it when the application has taken it.
        self._client.manual_ack_set(on=True)
        self._client.connect_timeout = connect_timeout

    @property
    def up(self) -> bool:
        """Whether the connection is established and has not ended."""
        connected = self._connected
        return (
            connected.done()
            and not connected.cancelled()
            and connected.exception() is None
            and not self._disconnected.done()
        )

    def ack(self, mid: int, qos: int) -> None:
        """Send PUBACK for `mid`; a no-op once this link is down (packet ids die with it)."""
        if self.up:
            self._client.ack(mid, qos)

    async def wait_lost(self) -> str:
        """Return, with the reason, once the established connection has ended."""
        try:
            await asyncio.shield(self._disconnected)
        except aiomqtt.MqttCodeError:
            return "the connection was lost"  # paho's code for it says only "unspecified error"
        except Exception as exc:  # noqa: BLE001  # whatever ended it, it is the reason we report
            return f"the connection was lost: {str(exc) or type(exc).__name__}"
        return "the broker closed the connection"

    async def subscribe_all(self, filters: list[tuple[str, int]]) -> list[int]:
        """Subscribe to `filters` in one packet; return the granted QoS (0x80: refused) of each.

        A broker that answers with fewer codes than filters is taken as refusing the rest.
        """
        codes = await self.subscribe(filters, timeout=float("inf"))
        granted = [int(code.value) if isinstance(code, ReasonCode) else int(code) for code in codes]
        return (granted + [SUBACK_FAILURE] * len(filters))[: len(filters)]

    def interrupt(self, reason: str) -> None:
        """Make a pending connect give up now instead of waiting for its CONNACK."""
        if not self._connected.done():
            self._connected.set_exception(aiomqtt.MqttError(reason))

    def abort(self) -> None:
        """Close the socket at once, without DISCONNECT (so the broker publishes the will)."""
        self.interrupt("the connection was aborted")
        # paho's own teardown: it unregisters the socket from the event loop, then closes it.
        self._client._sock_close()  # noqa: SLF001  # paho has no public abort
        if not self._disconnected.done():
            self._disconnected.set_exception(aiomqtt.MqttError("the connection was aborted"))
        self.settle()

    def settle(self) -> None:
        """Mark the outcome futures as seen, so asyncio does not log them as never retrieved."""
        for future in (self._connected, self._disconnected):
            if future.done() and not future.cancelled():
                future.exception()

    # -- aiomqtt's private hooks ---------------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        if not reason_code.is_failure:
            self.session_present = bool(flags.session_present)
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        if not self._connected.done():
            # Closed before CONNACK (a proxy or broker that drops the connection): fail the
            # connect now; aiomqtt would wait for its timeout.
            self._connected.set_exception(
                aiomqtt.MqttError(
                    f"the connection closed before the broker answered ({reason_code})"
                )
            )
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_message(
        self,
        client: paho.Client,  # noqa: ARG002  # aiomqtt's signature
        userdata: object,  # noqa: ARG002
        message: paho.MQTTMessage,
    ) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            # MQTT topics are UTF-8; a broker that sends another is broken or hostile. Dropped and
            # acknowledged: a persistent session would otherwise send it again after each reconnect.
            logger.warning(
                "dropped a message whose topic is not UTF-8 (%d payload bytes)",
                len(message.payload),
            )
            self.ack(message.mid, message.qos)
            return
        received = Received(
            self, topic, bytes(message.payload), message.qos, bool(message.retain), message.mid
        )
        if not self._deliver(received) and not self._full_logged:
            self._full_logged = True
            logger.warning(
                "the incoming queue is full: messages are left unacknowledged (QoS 1, the broker "
                "sends them again on the next connection) or dropped (QoS 0)"
            )
