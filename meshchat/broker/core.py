"""The broker core: amqtt 0.12.1's broker, without the defects we measured, and durable.

amqtt is pinned to exactly 0.12.1 (a test fails on any other version) because this module and
`meshchat.broker.handler` (the protocol handler, with its own list) override its internals.
Before upgrading, re-check every override below against the new code.

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

Durability, with a `BrokerStore` (`meshchat.broker.persist`): ``_start_listeners`` first puts
back the persistent sessions (disconnected, with their subscriptions and queues) and the
retained messages the store holds; from then on ``_handle_client_session``, ``add_subscription``
(whose SUBACK waits for the commit), ``_handle_unsubscription``, ``_delete_session``,
``retain_message`` and the routing (``_route``, ``_enqueue``) keep the store up to date. A QoS 1
PUBLISH that the handler holds back (an `InboundMessage`) is answered by
``_handle_message_delivery`` and ``_run_broadcast``: its PUBACK may go once every copy of it the
broker keeps (queued for persistent sessions, retained) is committed. A retained message is
stored before the message is routed. QoS 0 messages are never stored.

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
from typing import TYPE_CHECKING, Any, Final

import amqtt.broker
from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, WebSocketsReader
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.session import ApplicationMessage, Session
from amqtt.utils import gen_client_id

from meshchat.broker.handler import (
    InboundMessage,
    KeptMessage,
    MeshchatProtocolHandler,
    QueuedMessage,
    TcpWriter,
    Will,
    WsWriter,
)
from meshchat.broker.limits import DEFAULT_MAX_PAYLOAD, LimitedReader
from meshchat.errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from amqtt.contexts import ListenerConfig
    from websockets.asyncio.server import ServerConnection

    from meshchat.broker.persist import BrokerStore
    from meshchat.broker.statedb import RestoredState

__all__ = [
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_MAX_OFFLINE_QUEUE",
    "MeshchatBroker",
    "MeshchatProtocolHandler",
]

logger = logging.getLogger(__name__)

MIN_TLS_VERSION: Final = ssl.TLSVersion.TLSv1_2
DEFAULT_MAX_INFLIGHT: Final = 100
"""QoS 1 messages a client may have unacknowledged before the broker waits for a PUBACK."""
DEFAULT_MAX_OFFLINE_QUEUE: Final = 10_000
"""Messages queued for one session before the oldest are dropped."""
MAX_PACKET_ID: Final = 65535
SUBSCRIBE_DEADLINE: Final = 10.0
"""Seconds a persistent session's SUBACK may wait for its subscription to be stored."""

_OVERFLOW_LOGGED: Final = "meshchat.broker.queue_overflow_logged"


def _valid_topic_name(topic: str | None) -> bool:
    """At least one character (MQTT-4.7.3-1) and no wildcard (MQTT-3.3.2-2)."""
    return topic is not None and topic != "" and "#" not in topic and "+" not in topic


def _persistent(session: Session) -> bool:
    """Whether a session outlives its connection (MQTT-3.1.2-4), and so is stored."""
    return not session.clean_session and not session.is_anonymous


TopicCheck = Callable[[str, Action, str], bool]
"""(client id, amqtt action, topic) -> allowed."""


_MAX_MQTT_PACKET: Final = 268_435_455
"""MQTT 3.1.1's largest remaining length."""


class MeshchatBroker(amqtt.broker.Broker):  # type: ignore[misc]  # amqtt ships no types
    """The amqtt broker of meshchat: amqtt 0.12.1 with the overrides listed in this module.

    Args:
        config: amqtt's broker configuration (a dict, as `amqtt.broker.Broker` takes it).
        max_offline_queue: messages queued for one session before its oldest are dropped.
        max_payload: largest packet body a client may send; a bigger one ends its connection.
        max_inflight: QoS 1 messages one client may have unacknowledged.
        topic_check: decides subscribe, publish and receive directly (client id, action,
            topic), instead of amqtt's plugin round (which schedules a task per plugin and per
            message and cost about 39% of the fan-in throughput here).
        store: the broker's state store, open: persistent sessions, their queued messages and
            retained messages are read back from it on start and kept in it; None keeps
            everything in memory only.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        max_offline_queue: int = DEFAULT_MAX_OFFLINE_QUEUE,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        topic_check: TopicCheck | None = None,
        store: BrokerStore | None = None,
    ) -> None:
        """Configure the broker; nothing listens until `start`.

        Raises:
            ConfigError: a limit is out of range.
        """
        if max_offline_queue < 1:
            raise ConfigError(f"max-offline-queue {max_offline_queue} must be at least 1")
        if not 1 <= max_payload <= _MAX_MQTT_PACKET:
            raise ConfigError(f"max-payload {max_payload} is outside 1..{_MAX_MQTT_PACKET}")
        if not 1 <= max_inflight <= MAX_PACKET_ID:
            raise ConfigError(f"max-inflight {max_inflight} is outside 1..{MAX_PACKET_ID}")
        super().__init__(config)
        self.max_payload = max_payload
        self.max_offline_queue = max_offline_queue
        self.max_inflight = max_inflight
        self.topic_check = topic_check
        self.store = store
        self._connect_lock = asyncio.Lock()

    async def _start_listeners(self) -> None:
        """Put back what the store holds, then listen: no client sees the broker half restored."""
        if self.store is not None:
            self._restore(self.store.take_restored())
        await super()._start_listeners()

    def _restore(self, state: RestoredState) -> None:
        """Persistent sessions come back disconnected, with their subscriptions and queues."""
        for stored in state.sessions:
            handler, session = self.create_offline_session(stored.client_id)
            session.clean_session = False
            self._sessions[stored.client_id] = (session, handler)
            for topic_filter, qos in stored.subscriptions:
                self._subscriptions.setdefault(topic_filter, []).append((session, qos))
            for message in stored.queue:
                kept = KeptMessage(
                    message.topic, message.payload, message.qos, row=message.row, dup=message.dup
                )
                session.retained_messages.put_nowait(kept)
        for retained in state.retained:
            self._retained_messages[retained.topic] = amqtt.broker.RetainedApplicationMessage(
                None, retained.topic, retained.payload, retained.qos
            )

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
        limited = LimitedReader(
            StreamReaderAdapter(reader),
            max_payload=self.max_payload,
            peer=writer.get_extra_info("peername"),
        )
        await self._client_connected(listener_name, limited, TcpWriter(writer))

    async def ws_connected(self, websocket: ServerConnection, listener_name: str) -> None:
        """Serve a WebSocket connection."""
        limited = LimitedReader(
            WebSocketsReader(websocket), max_payload=self.max_payload, peer=websocket.remote_address
        )
        await self._client_connected(listener_name, limited, WsWriter(websocket))

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
            if self.store is not None and _persistent(session) and not session.parent:
                self.store.save_session(session.client_id)
            session.transitions.connect()
            handler.attach(session, reader, writer)
            handler.store = self.store
            handler.will = Will.of(session)
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
        """Route one PUBLISH from a client; returns True to keep serving the client.

        A QoS 1 PUBLISH whose PUBACK waits (an `InboundMessage`) always hears back: from
        `_run_broadcast` once routed, or here with nothing to wait for when it is dropped.
        """
        app_message = wait_deliver.result()
        inbound = app_message if isinstance(app_message, InboundMessage) else None
        try:
            await self.plugins_manager.fire_event(
                BrokerEvents.MESSAGE_RECEIVED,
                client_id=client_session.client_id,
                message=app_message,
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
                BrokerEvents.MESSAGE_BROADCAST,
                client_id=client_session.client_id,
                message=app_message,
            )
            floor = 0
            if app_message.publish_packet is not None and app_message.publish_packet.retain_flag:
                # Retained first: the PUBACK then waits for the routed copies and this one.
                await self.retain_message(client_session, topic, app_message.data, app_message.qos)
                floor = self.store.ticket if self.store is not None else 0
            await self._broadcast_message(
                client_session, topic, app_message.data, app_message.qos, inbound, floor
            )
            inbound = None  # _run_broadcast answers it now
        finally:
            if inbound is not None and not inbound.stored.done():
                inbound.stored.set_result(None)  # dropped: nothing to wait for
        return True

    async def _broadcast_message(  # noqa: PLR0917  # amqtt's signature, and two more
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
        inbound: InboundMessage | None = None,
        floor: int = 0,
    ) -> None:
        """Queue a message for routing; `inbound` hears once it is stored (and `floor` is)."""
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        if inbound is not None:
            broadcast["inbound"] = (inbound, floor)
        await self._broadcast_queue.put(broadcast)

    async def _run_broadcast(self, running_tasks: Any) -> None:  # noqa: ANN401  # amqtt's deque
        """Queue one published message for every session subscribed to its topic."""
        del running_tasks  # amqtt spawned a task per delivery; we queue them per session
        broadcast = await self._broadcast_queue.get()
        topic: str = broadcast["topic"]
        data: bytes = broadcast["data"]
        published_qos: int | None = broadcast.get("qos")
        stored = False
        try:
            for topic_filter, subscriptions in list(self._subscriptions.items()):
                if not self._matches(topic, topic_filter):
                    continue
                for target, granted in list(subscriptions):
                    qos = granted if published_qos is None else min(published_qos, granted)
                    stored |= await self._route(broadcast["session"], target, topic, data, qos)
        finally:
            if "inbound" in broadcast:
                inbound, floor = broadcast["inbound"]
                if self.store is None:
                    if not inbound.stored.done():
                        inbound.stored.set_result(None)
                else:
                    self.store.when_durable(self.store.ticket if stored else floor, inbound.stored)

    async def _route(
        self, source: Session | None, target: Session, topic: str, data: bytes, qos: int
    ) -> bool:
        """Queue a message for one session; returns whether it was stored for it."""
        kept = self.store is not None and qos in {QOS_1, QOS_2} and _persistent(target)
        if target.transitions.state == "connected":
            if not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
                logger.debug("client %r may not receive %r", target.client_id, topic)
                return False
            row = self._keep(target, topic, data, qos) if kept else None
            self._enqueue(target, QueuedMessage(topic, qos, data, row=row))
        elif qos in {QOS_1, QOS_2} and _persistent(target):
            # Kept for an offline persistent session (MQTT-3.1.2-5). Whether the client may
            # receive it is decided when it is delivered (`run_outbox`): by then the policy may
            # have changed, and an access plugin knows who the client is only while connected.
            row = self._keep(target, topic, data, qos) if kept else None
            message = KeptMessage(topic, data, qos, row=row)
            message.source_session = source
            self._enqueue(target, message)
            await self.plugins_manager.fire_event(
                BrokerEvents.RETAINED_MESSAGE, client_id=target.client_id, retained_message=message
            )
        else:
            return False
        return kept

    def _keep(self, session: Session, topic: str, data: bytes, qos: int) -> int:
        """Store a message for a persistent session; returns its row."""
        if self.store is None:
            raise BrokerError("the broker keeps no state store")
        return self.store.enqueue(str(session.client_id), topic, bytes(data), qos)

    def _enqueue(
        self, session: Session, message: ApplicationMessage, *, bounded: bool = True
    ) -> None:
        """Queue a message for a session; over the bound, the oldest queued message goes."""
        queue = session.retained_messages
        if bounded and queue.qsize() >= self.max_offline_queue:
            dropped = queue.get_nowait()
            row = dropped.row if isinstance(dropped, QueuedMessage | KeptMessage) else None
            if row is not None and self.store is not None:
                self.store.remove(row)
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
            message = QueuedMessage(topic, qos, retained.data, retain=True)
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
            if self.store is not None and _persistent(session):
                self.store.save_subscription(str(session.client_id), subscription[0], granted)
                await self._stored_before_ack(session, "subscription")
        return granted

    async def _stored_before_ack(self, session: Session, what: str) -> None:
        """Wait (bounded) until what was submitted to the store so far is committed."""
        if self.store is None:
            return
        try:
            await self.store.flush(SUBSCRIBE_DEADLINE)
        except (TimeoutError, BrokerError) as exc:
            # Acknowledged anyway: it holds in memory, and after a restart the client sees
            # from the CONNACK's session-present flag, or missing messages, that it must redo.
            logger.error(  # noqa: TRY400  # the cause is in the store's own log
                "client %r: its %s was not stored (%s)",
                session.client_id,
                what,
                str(exc) or "timed out",
            )

    async def _handle_unsubscription(
        self,
        client_session: Session,
        handler: MeshchatProtocolHandler,
        unsubscribe_waiter: asyncio.Future[Any],
    ) -> None:
        """Unsubscribe (amqtt's), and forget a persistent session's subscription in the store."""
        unsubscription = unsubscribe_waiter.result()
        for topic_filter in unsubscription.topics:
            self._del_subscription(topic_filter, client_session)
            if self.store is not None and _persistent(client_session):
                self.store.drop_subscription(str(client_session.client_id), topic_filter)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_UNSUBSCRIBED,
                client_id=client_session.client_id,
                topic=topic_filter,
            )
        await handler.mqtt_acknowledge_unsubscription(unsubscription.packet_id)

    async def _delete_session(self, client_id: str) -> None:
        """Forget a session (a clean session replaces it), in the store too."""
        previous = self._sessions.get(client_id)
        await super()._delete_session(client_id)
        if self.store is not None and previous is not None and _persistent(previous[0]):
            self.store.drop_session(client_id)

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        """Retain (or, with no data, clear) the message of a topic (amqtt's), in the store too."""
        await super().retain_message(source_session, topic_name, data, qos)
        if self.store is None or topic_name is None:
            return
        if data:
            self.store.retain(topic_name, bytes(data), qos or QOS_0)
        else:
            self.store.unretain(topic_name)
