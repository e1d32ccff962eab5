"""The broker core: amqtt 0.12.1's broker and protocol handler, without the defects we measured.

amqtt is pinned to exactly 0.12.1 (a test fails on any other version) because this module
overrides its internals. Before upgrading, re-check every override below against the new code.

`MeshchatBroker` (an `amqtt.broker.Broker`):

- ``_initialize_client_session``, ``_handle_client_session`` (with ``_open_session`` and
  ``_take_over``): a CONNECT is authenticated before it can touch the session its client id
  names; every connection has its own `Session` object, to which a resumed session's state
  moves, and a clean session's state never moves into a later persistent one (nor its clean
  flag); a reconnect takes the old connection over (its own will published once, the session
  left to the new connection); a resumed session gets the retained messages of its own
  subscriptions only; everything sent to a client goes through its session queue (below).
- ``_handle_disconnect``: publishes the connection's own will, through the PUBLISH checks.
- ``_handle_message_delivery``: a publish to a ``$`` topic is dropped, for that message only; an
  empty topic closes the connection; neither mutes the client any longer.
- ``_run_broadcast``: delivered QoS is min(publish, subscription); deliveries are queued per
  session, the queue bounded (oldest dropped, logged once per session); for a session that is
  offline the topic plugins' RECEIVE check happens when the message is finally delivered.
- ``_publish_retained_messages_for_subscription``: every retained delivery passes the topic
  plugins with ``Action.RECEIVE`` and gets min(retained, subscription) QoS.
- ``add_subscription``: a repeated subscription replaces the granted QoS (MQTT-3.8.4-3).
- ``_create_ssl_context``: TLS 1.2 or newer; client certificates required when a CA is given.
- ``stream_connected``, ``ws_connected``, ``create_offline_session``: our writer and handler.

`MeshchatProtocolHandler` (a `BrokerProtocolHandler`):

- keep-alive: a client that sends nothing for 1.5 x its keep-alive is cut (MQTT-3.1.2-24),
  also when it stalls in the middle of a packet; the disconnect then publishes its will.
- delivery: one task per connection sends the session queue in order with at most
  ``max_inflight`` QoS 1 messages unacknowledged, so packet identifiers never run out; an
  unacknowledged QoS 1 message stays in the session and is sent again, DUP set, on reconnect.
- disconnect signalling: a disconnect is latched, so one that happens while the session starts
  is not lost (amqtt's waiter could be replaced after it fired, hanging the connection forever).
- closing: a connection's graceful close waits at most ``CLOSE_DEADLINE`` for the client to
  take what is still buffered for it, then drops the connection, as it does when the close is
  cancelled halfway; amqtt waited forever for a client that reads nothing, or left the socket
  open for good (the writers' ``close``).

Left as amqtt 0.12.1 has them, because fixing them means replacing amqtt's packet reader loop
(``ProtocolHandler._reader_loop``) or its QoS 2 state machine: a malformed packet (a PUBLISH
with a wildcard topic, for one) is discarded mid-packet and reading goes on from there; a QoS 2
delivery interrupted by a disconnect is not resumed on reconnect. Not addressed yet either:
nothing limits how long a client may take to send its CONNECT.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import amqtt.broker
from amqtt.adapters import (
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WebSocketsReader,
    WebSocketsWriter,
)
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import (
    INCOMING,
    ApplicationMessage,
    OutgoingApplicationMessage,
    Session,
)
from amqtt.utils import gen_client_id

from meshchat.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from amqtt.contexts import ListenerConfig
    from amqtt.mqtt.connect import ConnectPacket
    from amqtt.mqtt.puback import PubackPacket
    from amqtt.plugins.manager import PluginManager
    from websockets.asyncio.server import ServerConnection

__all__ = ["DEFAULT_MAX_INFLIGHT", "DEFAULT_MAX_OFFLINE_QUEUE", "MeshchatBroker"]

logger = logging.getLogger(__name__)

MIN_TLS_VERSION: Final = ssl.TLSVersion.TLSv1_2
KEEPALIVE_FACTOR: Final = 1.5
"""A client is cut after this many keep-alive periods without a byte from it (MQTT-3.1.2-24)."""
DEFAULT_MAX_INFLIGHT: Final = 100
"""QoS 1 messages a client may have unacknowledged before the broker waits for a PUBACK."""
DEFAULT_MAX_OFFLINE_QUEUE: Final = 10_000
"""Messages queued for one session before the oldest are dropped."""
CLOSE_DEADLINE: Final = 2.0
"""Seconds closing a connection may wait for the client to take what is buffered for it."""
RETRY_DEADLINE: Final = 10.0
"""Seconds a QoS 2 flow resumed on reconnect may take (amqtt's own limit)."""
MAX_PACKET_ID: Final = 65535

_OVERFLOW_LOGGED: Final = "meshchat.broker.queue_overflow_logged"


def _valid_topic_name(topic: str | None) -> bool:
    """At least one character (MQTT-4.7.3-1) and no wildcard (MQTT-3.3.2-2)."""
    return topic is not None and topic != "" and "#" not in topic and "+" not in topic


TopicCheck = Callable[[str, Action, str], bool]
"""(client id, amqtt action, topic) -> allowed."""


@dataclass(frozen=True, slots=True)
class _Will:
    """The last will a CONNECT registered for its network connection."""

    topic: str
    message: bytes
    qos: int
    retain: bool

    @classmethod
    def of(cls, session: Session) -> _Will | None:
        if not session.will_flag or session.will_topic is None or session.will_message is None:
            return None
        return cls(
            topic=session.will_topic,
            message=bytes(session.will_message),
            qos=session.will_qos or QOS_0,
            retain=bool(session.will_retain),
        )


@runtime_checkable
class _Abortable(Protocol):
    def abort(self) -> None: ...


class _ActivityReader(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no types
    """Passes reads through and reports each one, so the keep-alive sees every byte arrive."""

    def __init__(self, inner: ReaderAdapter, on_read: Callable[[], None]) -> None:
        self._inner = inner
        self._on_read = on_read

    async def read(self, n: int = -1) -> bytes:
        data: bytes = await self._inner.read(n)
        self._on_read()
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class _TcpWriter(StreamWriterAdapter):  # type: ignore[misc]  # amqtt ships no types
    """amqtt's TCP writer, with a close that always ends, and an abort."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self._stream = writer

    def abort(self) -> None:
        """Drop the connection now, unsent data and all."""
        self.is_closed = True
        self._stream.transport.abort()

    async def close(self) -> None:
        """Close gracefully within `CLOSE_DEADLINE`, else (or when cancelled) drop the connection.

        amqtt waits until the client has taken everything still buffered for it: forever for
        a client that reads nothing any more; and a close cancelled halfway left the socket
        open for good.
        """
        if self.is_closed:
            return
        self.is_closed = True
        closed = False
        try:
            async with asyncio.timeout(CLOSE_DEADLINE):
                await self._stream.drain()
                if self._stream.can_write_eof():
                    self._stream.write_eof()
                self._stream.close()
                await self._stream.wait_closed()
            closed = True
        except (TimeoutError, OSError) as exc:
            logger.debug("closing a connection gracefully failed (%r): dropping it", exc)
        finally:
            if not closed:
                self._stream.transport.abort()


class _WsWriter(WebSocketsWriter):  # type: ignore[misc]  # amqtt ships no types
    """amqtt's WebSocket writer, with a close that always ends, and an abort."""

    def __init__(self, connection: ServerConnection) -> None:
        super().__init__(connection)
        self._connection = connection

    def abort(self) -> None:
        """Drop the connection now."""
        self._connection.transport.abort()

    async def close(self) -> None:
        """Close gracefully within `CLOSE_DEADLINE`, else (or when cancelled) drop it."""
        closed = False
        try:
            async with asyncio.timeout(CLOSE_DEADLINE):
                await super().close()
            closed = True
        except TimeoutError:
            logger.debug("closing a WebSocket gracefully timed out: dropping it")
        finally:
            if not closed:
                self.abort()


def _as_outgoing(item: ApplicationMessage) -> OutgoingApplicationMessage:
    if isinstance(item, OutgoingApplicationMessage):
        return item
    # Queued through amqtt's own API (a persistence plugin restoring a session, for example):
    # a message routed to an offline session, never a retained one, so RETAIN is clear
    # (MQTT-3.3.1-9).
    return OutgoingApplicationMessage(None, item.topic, item.qos or QOS_0, item.data, retain=False)


class MeshchatProtocolHandler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt ships no types
    """One client connection: amqtt's broker-side protocol handler, with keep-alive and pacing."""

    def __init__(
        self,
        plugins_manager: PluginManager,
        session: Session | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Create a handler; amqtt builds one per CONNECT (see `init_from_connect`)."""
        super().__init__(plugins_manager, session, loop)
        self.will: _Will | None = None
        self.superseded = False
        self.outbox: asyncio.Task[None] | None = None
        self._acked = asyncio.Event()
        self._gone = asyncio.Event()
        self._gone_with: DisconnectPacket | None = None
        self._last_read = 0.0
        self._idle_limit = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def client_id(self) -> str | None:
        """The client this connection belongs to, once attached."""
        return self.session.client_id if self.session is not None else None

    def attach(self, session: Session, reader: ReaderAdapter, writer: Any) -> None:  # noqa: ANN401  # amqtt's WriterAdapter
        """Attach to a session; reads are watched for the keep-alive."""
        super().attach(session, _ActivityReader(reader, self._saw_activity), writer)

    def _saw_activity(self) -> None:
        self._last_read = self._loop.time()

    async def start(self) -> None:
        """Start reading, arm the keep-alive and resend what the session left unacknowledged."""
        keep_alive = self.session.keep_alive if self.session is not None else 0
        if keep_alive > 0:
            self._idle_limit = KEEPALIVE_FACTOR * keep_alive
            self._saw_activity()
            self._idle_timer = self._loop.call_at(
                self._last_read + self._idle_limit, self._check_idle
            )
        await super().start()

    def _check_idle(self) -> None:
        self._idle_timer = None
        due = self._last_read + self._idle_limit
        if self._loop.time() < due:
            self._idle_timer = self._loop.call_at(due, self._check_idle)
            return
        logger.info(
            "client %r sent nothing for %.1f s, 1.5 times its keep-alive: closing its connection",
            self.client_id,
            self._idle_limit,
        )
        self.abort()

    def abort(self) -> None:
        """Drop the connection now; the disconnect is then handled as for a lost link."""
        if self.outbox is not None and self.outbox is not asyncio.current_task():
            self.outbox.cancel()  # nothing more goes out on this connection
        if isinstance(self.writer, _Abortable):
            self.writer.abort()
        elif self._reader_task is not None:
            self._reader_task.cancel()

    async def stop(self) -> None:
        """Stop reading and sending, and close the connection."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.outbox is not None and self.outbox is not asyncio.current_task():
            self.outbox.cancel()
        await super().stop()
        self._latch_disconnect(None)

    def _latch_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        if not self._gone.is_set():
            self._gone_with = disconnect
            self._gone.set()

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        """Record the end of the connection (a DISCONNECT, or None when the link was lost)."""
        self._latch_disconnect(disconnect)
        await super().handle_disconnect(disconnect)

    async def wait_disconnect(self) -> DisconnectPacket | None:
        """Wait until the connection ends; returns the DISCONNECT, or None for a lost link."""
        await self._gone.wait()
        return self._gone_with

    async def handle_connect(self, connect: ConnectPacket) -> None:
        """A second CONNECT is a protocol violation: disconnect the client (MQTT-3.1.0-2)."""
        del connect
        logger.warning("client %r sent a second CONNECT: closing its connection", self.client_id)
        await self.handle_disconnect(None)

    async def handle_puback(self, puback: PubackPacket) -> None:
        """Complete a QoS 1 delivery: the message leaves the session and the window opens."""
        packet_id = puback.variable_header.packet_id if puback.variable_header else None
        if packet_id in self._puback_waiters:  # one of amqtt's own flows waits for it
            await super().handle_puback(puback)
        elif self.session is not None:
            message = self.session.inflight_out.get(packet_id)
            if message is not None and message.qos == QOS_1:
                del self.session.inflight_out[packet_id]
                message.puback_packet = puback
            else:
                logger.debug("client %r acknowledged unknown message %s", self.client_id, packet_id)
        # Even for an unknown id: after a take-over the old connection may have completed the
        # message, and this connection's sender must still look at the window again.
        self._acked.set()

    async def _retry_deliveries(self) -> None:
        """Send again, DUP set, what the session left unacknowledged (MQTT-4.4.0-1).

        QoS 1 messages go out at once, in their original order, and are completed by PUBACK
        like any other; QoS 2 flows resume as amqtt resumes them.
        """
        if self.session is None:
            return
        for message in list(self.session.inflight_out.values()):
            if message.qos == QOS_1:
                packet = message.build_publish_packet(dup=True)
                message.publish_packet = packet
                await self._send_packet(packet)
        others = [
            message
            for message in (*self.session.inflight_in.values(), *self.session.inflight_out.values())
            if message.direction == INCOMING or message.qos != QOS_1
        ]
        if others:
            async with asyncio.TaskGroup() as flows:
                for message in others:
                    flows.create_task(self._resume_flow(message), name="meshchat[broker].retry")

    async def _resume_flow(self, message: ApplicationMessage) -> None:
        try:
            async with asyncio.timeout(RETRY_DEADLINE):
                await self._handle_message_flow(message)
        except (TimeoutError, AMQTTError) as exc:
            logger.warning(
                "client %r: resuming message %s failed: %s", self.client_id, message.packet_id, exc
            )

    async def run_outbox(
        self, max_inflight: int, may_receive: Callable[..., Awaitable[bool]]
    ) -> None:
        """Send the session queue in order, with at most `max_inflight` QoS 1 messages unacked.

        Messages kept while the client was offline are checked with `may_receive(topic=...)`
        now, against the access policy in force when they are delivered. Runs for the life of
        the connection; a failure closes this connection only.
        """
        if self.session is None:
            return
        queue = self.session.retained_messages
        try:
            while True:
                while len(self.session.inflight_out) >= max_inflight:
                    self._acked.clear()
                    await self._acked.wait()
                item = await queue.get()
                if not isinstance(item, OutgoingApplicationMessage) and not await may_receive(
                    topic=item.topic
                ):
                    logger.info("client %r may no longer receive %r", self.client_id, item.topic)
                    continue
                await self._deliver(_as_outgoing(item))
        except Exception as exc:
            task = asyncio.current_task()
            if isinstance(exc, ProtocolHandlerError) and task is not None and task.cancelling():
                # amqtt's _send_packet turns our cancellation into this error; undo that.
                raise asyncio.CancelledError from None
            # Whatever went wrong is this connection's: close it, keep serving everyone else.
            logger.exception(
                "delivering to client %r failed: dropping its connection", self.client_id
            )
            self.abort()

    async def _deliver(self, message: OutgoingApplicationMessage) -> None:
        session = self.session
        if session is None:
            return
        if message.qos == QOS_2:
            message.packet_id = session.next_packet_id
            try:
                await self._handle_qos2_message_flow(message)
            except TimeoutError:
                # amqtt's QoS 2 flow gives up after 5 s without PUBREC or PUBCOMP; so do we.
                logger.warning(
                    "client %r did not complete QoS 2 message %s", self.client_id, message.packet_id
                )
            return
        if message.qos == QOS_1:
            message.packet_id = session.next_packet_id
            # In the session before it is sent: if the link drops now, a reconnect resends it.
            session.inflight_out[message.packet_id] = message
        packet = message.build_publish_packet()
        message.publish_packet = packet
        await self._send_packet(packet)


class MeshchatBroker(amqtt.broker.Broker):  # type: ignore[misc]  # amqtt ships no types
    """The amqtt broker of meshchat: amqtt 0.12.1 with the overrides listed in this module.

    Args:
        config: amqtt's broker configuration (a dict, as `amqtt.broker.Broker` takes it).
        max_offline_queue: messages queued for one session before its oldest are dropped.
        max_inflight: QoS 1 messages one client may have unacknowledged.
        topic_check: decides subscribe, publish and receive directly (client id, action,
            topic), instead of amqtt's plugin round (which schedules a task per plugin and per
            message and cost about 39% of the fan-in throughput here).
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        max_offline_queue: int = DEFAULT_MAX_OFFLINE_QUEUE,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        topic_check: TopicCheck | None = None,
    ) -> None:
        """Configure the broker; nothing listens until `start`.

        Raises:
            ConfigError: a limit is out of range.
        """
        if max_offline_queue < 1:
            raise ConfigError(f"max-offline-queue {max_offline_queue} must be at least 1")
        if not 1 <= max_inflight <= MAX_PACKET_ID:
            raise ConfigError(f"max-inflight {max_inflight} is outside 1..{MAX_PACKET_ID}")
        super().__init__(config)
        self.max_offline_queue = max_offline_queue
        self.max_inflight = max_inflight
        self.topic_check = topic_check
        self._connect_lock = asyncio.Lock()

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """The ACL decision: the direct check when there is one, else amqtt's plugins."""
        if self.topic_check is not None:
            return self.topic_check(str(session.client_id), action, topic)
        allowed: bool = await super()._topic_filtering(session, topic, action)
        return allowed

    @staticmethod
    def _create_ssl_context(listener: ListenerConfig) -> ssl.SSLContext:
        """TLS 1.2 or newer; a client certificate is required when the listener names a CA."""
        context: ssl.SSLContext = amqtt.broker.Broker._create_ssl_context(listener)  # noqa: SLF001  # the hook amqtt offers
        context.minimum_version = MIN_TLS_VERSION
        # amqtt asks every client for an optional certificate, checked against the system's CAs;
        # we ask only when a CA is configured, and then insist.
        context.verify_mode = ssl.CERT_REQUIRED if listener.get("cafile") else ssl.CERT_NONE
        return context

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        """Serve a TCP (or TLS) connection."""
        await self._client_connected(listener_name, StreamReaderAdapter(reader), _TcpWriter(writer))

    async def ws_connected(self, websocket: ServerConnection, listener_name: str) -> None:
        """Serve a WebSocket connection."""
        await self._client_connected(
            listener_name, WebSocketsReader(websocket), _WsWriter(websocket)
        )

    def create_offline_session(self, client_id: str) -> tuple[MeshchatProtocolHandler, Session]:
        """A disconnected session (amqtt's plugins restore persistent sessions with it)."""
        session = Session()
        session.client_id = client_id
        handler = MeshchatProtocolHandler(self.plugins_manager, session)
        session.transitions.disconnect()
        return handler, session

    async def _initialize_client_session(
        self,
        reader: ReaderAdapter,
        writer: Any,  # noqa: ANN401  # amqtt's WriterAdapter
        remote_address: str,
        remote_port: int,
    ) -> tuple[MeshchatProtocolHandler, Session]:
        """Read the CONNECT; unlike amqtt, touch no session before authentication."""
        try:
            handler, session = await MeshchatProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except MQTTError as exc:
            logger.warning("invalid CONNECT from %s:%s: %s", remote_address, remote_port, exc)
            await writer.close()
            raise MQTTError(exc) from exc
        except (AMQTTError, NoDataError) as exc:
            logger.info("no CONNECT from %s:%s: %s", remote_address, remote_port, exc)
            raise AMQTTError(exc) from exc
        if session.clean_session and not session.client_id:
            session.client_id = gen_client_id()  # MQTT-3.1.3-6
        return handler, session

    async def _handle_client_session(  # noqa: PLR0917  # amqtt's signature
        self,
        reader: ReaderAdapter,
        writer: Any,  # noqa: ANN401  # amqtt's WriterAdapter
        client_session: Session,
        handler: MeshchatProtocolHandler,
        server: Any,  # noqa: ANN401  # amqtt's Server
        listener_name: str,
    ) -> None:
        """Authenticate, open or resume the session, then serve the connection until it ends."""
        del server
        session = client_session  # this connection's own, as read from the CONNECT
        if not session.client_id:
            raise AMQTTError("a CONNECT without a client id got this far")
        if not await self._authenticate(session, self.listeners_config[listener_name]):
            handler.attach(session, reader, writer)
            await handler.mqtt_connack_authorize(authorize=False)
            await writer.close()
            return
        async with self._connect_lock:
            await self._open_session(session)
            session.transitions.connect()
            handler.attach(session, reader, writer)
            handler.will = _Will.of(session)
            self._sessions[session.client_id] = (session, handler)
        await handler.mqtt_connack_authorize(authorize=True)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id, client_session=session
        )
        try:
            await handler.start()
            if session.parent:
                for subscription in self._subscriptions_of(session):
                    await self._publish_retained_messages_for_subscription(subscription, session)
        except Exception as exc:  # noqa: BLE001  # this client's failure; the loop below cleans up
            logger.warning("starting the session of client %r failed: %s", session.client_id, exc)
            handler.abort()
        may_receive = functools.partial(self._topic_filtering, session, action=Action.RECEIVE)
        async with asyncio.TaskGroup() as tasks:
            handler.outbox = tasks.create_task(
                handler.run_outbox(self.max_inflight, may_receive), name="meshchat[broker].outbox"
            )
            try:
                await self._client_message_loop(session, handler)
            finally:
                handler.outbox.cancel()

    async def _open_session(self, incoming: Session) -> None:
        """Make `incoming` the session of its client id: new, or carrying on a persistent one.

        Every connection gets its own `Session` object (plugins can tell connections apart by
        identity); a resumed session's state (subscriptions, queue, unacknowledged messages)
        moves over to it.
        """
        client_id = incoming.client_id
        incoming.parent = 0
        previous = self._sessions.get(client_id)
        if previous is None:
            return
        session, handler = previous
        if session.transitions.state == "connected":
            await self._take_over(session, handler)
        if incoming.clean_session or session.clean_session or session.is_anonymous:
            # MQTT-3.1.2-6: a clean session starts afresh, and a clean session's state ended
            # with its connection, so a persistent one never inherits it (or its clean flag).
            await self._delete_session(client_id)
            return
        incoming.retained_messages = session.retained_messages
        incoming.inflight_out = session.inflight_out
        incoming.inflight_in = session.inflight_in
        incoming.attributes = session.attributes | incoming.attributes
        for subscriptions in self._subscriptions.values():
            for index, (subscriber, granted) in enumerate(subscriptions):
                if subscriber is session:
                    subscriptions[index] = (incoming, granted)
        incoming.parent = 1

    async def _take_over(self, session: Session, handler: MeshchatProtocolHandler) -> None:
        """Close the connection a session still has because its client connected again.

        MQTT-3.1.4-2: the old connection is closed; it did not say DISCONNECT, so its will is
        published (MQTT-3.1.2-8), once, before the new connection is acknowledged.
        """
        logger.info("client %r connected again: closing its previous connection", session.client_id)
        handler.superseded = True
        handler.abort()  # its sender stops before anything else can leave the session queue
        session.transitions.disconnect()
        await self._publish_will(session, handler)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED, client_id=session.client_id, client_session=session
        )

    async def _handle_disconnect(
        self,
        client_session: Session,
        handler: MeshchatProtocolHandler,
        disconnect_waiter: asyncio.Future[DisconnectPacket | None],
    ) -> None:
        """End a connection: publish its will unless it said DISCONNECT, then close it."""
        if handler.superseded:  # _take_over did the rest; the session is someone else's now
            await self._stop_handler(handler)
            return
        if not isinstance(disconnect_waiter.result(), DisconnectPacket):
            await self._publish_will(client_session, handler)
        await self._stop_handler(handler)
        client_session.transitions.disconnect()
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED,
            client_id=client_session.client_id,
            client_session=client_session,
        )

    async def _publish_will(self, session: Session, handler: MeshchatProtocolHandler) -> None:
        """Publish a connection's will as that client would publish it: through the checks."""
        will = handler.will
        handler.will = None  # at most once
        if will is None:
            return
        if not _valid_topic_name(will.topic) or will.topic.startswith("$"):
            logger.warning(
                "client %r has its will on the invalid or reserved topic %r: not published",
                session.client_id,
                will.topic,
            )
            return
        if not await self._topic_filtering(session, topic=will.topic, action=Action.PUBLISH):
            logger.info("client %r may not publish its will to %r", session.client_id, will.topic)
            return
        logger.debug("client %r is gone: publishing its will", session.client_id)
        await self._broadcast_message(session, will.topic, will.message, will.qos)
        if will.retain:
            await self.retain_message(session, will.topic, will.message, will.qos)

    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: MeshchatProtocolHandler,
        wait_deliver: asyncio.Future[ApplicationMessage | None],
    ) -> bool:
        """Route one PUBLISH from a client; returns True to keep serving the client."""
        app_message = wait_deliver.result()
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id, message=app_message
        )
        if app_message is None:
            return True
        topic = app_message.topic
        if not _valid_topic_name(topic):
            logger.warning(
                "[MQTT-4.7.3-1] client %r published to the invalid topic %r: disconnecting it",
                client_session.client_id,
                topic,
            )
            handler.abort()
            return True
        if topic.startswith("$"):
            logger.warning(
                "[MQTT-4.7.2-1] client %r published to %r; $ topics are the broker's: dropped",
                client_session.client_id,
                topic,
            )
            return True
        if not await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            logger.info("client %r may not publish to %r", client_session.client_id, topic)
            return True
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=app_message
        )
        await self._broadcast_message(client_session, topic, app_message.data, app_message.qos)
        if app_message.publish_packet is not None and app_message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, app_message.data, app_message.qos)
        return True

    async def _run_broadcast(self, running_tasks: Any) -> None:  # noqa: ANN401  # amqtt's deque
        """Queue one published message for every session subscribed to its topic."""
        del running_tasks  # amqtt spawned a task per delivery; we queue them per session
        broadcast = await self._broadcast_queue.get()
        topic: str = broadcast["topic"]
        data: bytes = broadcast["data"]
        published_qos: int | None = broadcast.get("qos")
        for topic_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, topic_filter):
                continue
            for target, granted in list(subscriptions):
                qos = granted if published_qos is None else min(published_qos, granted)
                await self._route(broadcast["session"], target, topic, data, qos)

    async def _route(
        self, source: Session | None, target: Session, topic: str, data: bytes, qos: int
    ) -> None:
        if target.transitions.state == "connected":
            if not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
                logger.debug("client %r may not receive %r", target.client_id, topic)
                return
            self._enqueue(target, OutgoingApplicationMessage(None, topic, qos, data, retain=False))
        elif not target.clean_session and qos in {QOS_1, QOS_2} and not target.is_anonymous:
            # Kept for an offline persistent session (MQTT-3.1.2-5). Whether the client may
            # receive it is decided when it is delivered (`run_outbox`): by then the policy may
            # have changed, and an access plugin knows who the client is only while connected.
            # Kept as amqtt keeps it, so plugins (amqtt's session persistence) see the same.
            kept = amqtt.broker.RetainedApplicationMessage(source, topic, data, qos)
            self._enqueue(target, kept)
            await self.plugins_manager.fire_event(
                BrokerEvents.RETAINED_MESSAGE, client_id=target.client_id, retained_message=kept
            )

    def _enqueue(
        self, session: Session, message: ApplicationMessage, *, bounded: bool = True
    ) -> None:
        """Queue a message for a session; over the bound, the oldest queued message goes."""
        queue = session.retained_messages
        if bounded and queue.qsize() >= self.max_offline_queue:
            queue.get_nowait()
            if not session.attributes.get(_OVERFLOW_LOGGED):
                session.attributes[_OVERFLOW_LOGGED] = True
                logger.warning(
                    "client %r has %d messages waiting, the most one session may have: its "
                    "oldest are dropped to make room (said once per session)",
                    session.client_id,
                    self.max_offline_queue,
                )
        queue.put_nowait(message)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Queue the retained messages one subscription matches, each one the client may receive."""
        topic_filter, granted = subscription
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                logger.info("client %r may not receive retained %r", session.client_id, topic)
                continue
            qos = granted if retained.qos is None else min(granted, retained.qos)
            message = OutgoingApplicationMessage(None, topic, qos, retained.data, retain=True)
            # Not bounded: the retained store is the broker's and finite, and the client asked.
            self._enqueue(session, message, bounded=False)

    def _subscriptions_of(self, session: Session) -> list[tuple[str, int]]:
        return [
            (topic_filter, granted)
            for topic_filter, subscriptions in self._subscriptions.items()
            for subscriber, granted in subscriptions
            if subscriber.client_id == session.client_id
        ]

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Subscribe; a repeated subscription replaces the granted QoS (MQTT-3.8.4-3)."""
        granted: int = await super().add_subscription(subscription, session)
        current = self._sessions.get(session.client_id, (None, None))[0]
        # A connection just taken over may still be reading a SUBSCRIBE; it must not reclaim
        # the subscriptions its successor now owns.
        if granted in {QOS_0, QOS_1, QOS_2} and session is current:
            subscriptions = self._subscriptions[subscription[0]]
            for index, (subscriber, _) in enumerate(subscriptions):
                if subscriber.client_id == session.client_id:
                    subscriptions[index] = (session, granted)
        return granted
