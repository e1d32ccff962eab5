"""The broker's side of one client connection: amqtt 0.12.1's protocol handler, with our fixes.

`MeshchatProtocolHandler` (a `BrokerProtocolHandler`; `meshchat.broker.core` lists the
broker's own overrides):

- keep-alive: a client that sends nothing for 1.5 x its keep-alive is cut (MQTT-3.1.2-24),
  also when it stalls in the middle of a packet; the disconnect then publishes its will.
- delivery: one task per connection sends the session queue in order with at most
  ``max_inflight`` QoS 1 messages unacknowledged, so packet identifiers never run out; an
  unacknowledged QoS 1 message stays in the session and is sent again, DUP set, on reconnect.
- durability: with a state store (`meshchat.broker.persist`), a QoS 1 PUBLISH is acknowledged
  only once the broker has routed it and committed the copies it keeps (queued for persistent
  sessions, retained), PUBACKs in the order the PUBLISHes came (at once, as amqtt does, while
  the store holds no persistent session and the message is not retained); a delivery is marked
  sent in the store before it goes out (DUP after a restart) and leaves the store with its
  PUBACK, or when it is dropped over the queue bound or refused at delivery.
- disconnect signalling: a disconnect is latched, so one that happens while the session starts
  is not lost (amqtt's waiter could be replaced after it fired, hanging the connection forever).
- closing: a connection's graceful close waits at most ``CLOSE_DEADLINE`` for the client to
  take what is still buffered for it, then drops the connection, as it does when the close is
  cancelled halfway; amqtt waited forever for a client that reads nothing, or left the socket
  open for good (the writers' ``close``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WebSocketsWriter
from amqtt.broker import RetainedApplicationMessage
from amqtt.errors import AMQTTError, ProtocolHandlerError
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import (
    INCOMING,
    ApplicationMessage,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
    Session,
)

from meshchat.errors import BrokerError

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from amqtt.mqtt.connect import ConnectPacket
    from amqtt.plugins.manager import PluginManager
    from websockets.asyncio.server import ServerConnection

    from meshchat.broker.persist import BrokerStore

__all__ = ["MeshchatProtocolHandler"]

logger = logging.getLogger(__name__)

KEEPALIVE_FACTOR: Final = 1.5
"""A client is cut after this many keep-alive periods without a byte from it (MQTT-3.1.2-24)."""
CLOSE_DEADLINE: Final = 2.0
"""Seconds closing a connection may wait for the client to take what is buffered for it."""
RETRY_DEADLINE: Final = 10.0
"""Seconds a QoS 2 flow resumed on reconnect may take (amqtt's own limit)."""
STORE_DEADLINE: Final = 30.0
"""Seconds a QoS 1 publish may wait to be routed and stored before its connection is dropped."""


@dataclass(frozen=True, slots=True)
class Will:
    """The last will a CONNECT registered for its network connection."""

    topic: str
    message: bytes
    qos: int
    retain: bool

    @classmethod
    def of(cls, session: Session) -> Will | None:
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


class TcpWriter(StreamWriterAdapter):  # type: ignore[misc]  # amqtt ships no types
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


class WsWriter(WebSocketsWriter):  # type: ignore[misc]  # amqtt ships no types
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


class QueuedMessage(OutgoingApplicationMessage):  # type: ignore[misc]  # amqtt ships no types
    """A message on its way to one session.

    Attributes:
        row: its row in the broker's state store, or None when it is not stored.
        dup: it went out before (to the session's previous connection): DUP is set when it is
            first sent on this one.
    """

    __slots__ = ("dup", "row")

    def __init__(
        self,
        topic: str,
        qos: int,
        data: bytes | bytearray,
        *,
        retain: bool = False,
        row: int | None = None,
        dup: bool = False,
    ) -> None:
        """A message not yet sent; the packet identifier is given when it is."""
        super().__init__(None, topic, qos, data, retain)
        self.row = row
        self.dup = dup


class KeptMessage(RetainedApplicationMessage):  # type: ignore[misc]  # amqtt ships no types
    """A message kept for a session while it was offline (or read back from the state store).

    Whether the client may receive it is checked when it is delivered. Kept as amqtt keeps it
    (a `RetainedApplicationMessage`), so amqtt's plugins see the same.
    """

    __slots__ = ("dup", "row")

    def __init__(
        self, topic: str, data: bytes | bytearray, qos: int, *, row: int | None, dup: bool = False
    ) -> None:
        """Keep `data`; `row` and `dup` as in `QueuedMessage`."""
        super().__init__(None, topic, data, qos)
        self.row = row
        self.dup = dup


class InboundMessage(IncomingApplicationMessage):  # type: ignore[misc]  # amqtt ships no types
    """A QoS 1 PUBLISH from a client whose PUBACK waits for the broker's word.

    Attributes:
        stored: resolved by the broker once the message is routed and every copy it keeps
            (queued for persistent sessions, retained) is committed; failed when that failed.
    """

    __slots__ = ("stored",)

    def __init__(self, message: IncomingApplicationMessage, stored: asyncio.Future[None]) -> None:
        """Take over a message as amqtt read it."""
        super().__init__(
            message.packet_id, message.topic, message.qos, message.data, message.retain
        )
        self.publish_packet = message.publish_packet  # type: ignore[misc]  # a slot of amqtt's base class, which mypy cannot see
        self.stored = stored


def _as_outgoing(item: ApplicationMessage) -> QueuedMessage:
    if isinstance(item, QueuedMessage):
        return item
    if isinstance(item, KeptMessage):
        return QueuedMessage(item.topic, item.qos or QOS_0, item.data, row=item.row, dup=item.dup)
    # Queued through amqtt's own API (a persistence plugin restoring a session, for example):
    # a message routed to an offline session, never a retained one, so RETAIN is clear
    # (MQTT-3.3.1-9).
    return QueuedMessage(item.topic, item.qos or QOS_0, item.data)


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
        self.will: Will | None = None
        self.superseded = False
        self.outbox: asyncio.Task[None] | None = None
        self._acked = asyncio.Event()
        self._gone = asyncio.Event()
        self._gone_with: DisconnectPacket | None = None
        self._last_read = 0.0
        self._idle_limit = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self.store: BrokerStore | None = None
        """The broker's state store: set, QoS 1 publishes are acknowledged once stored."""
        self._last_puback: asyncio.Future[None] | None = None

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
                self._forget(message)
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
                    self._forget(item)
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

    async def _deliver(self, message: QueuedMessage) -> None:
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
            self._forget(message)
            return
        if message.qos == QOS_1:
            message.packet_id = session.next_packet_id
            # In the session before it is sent: if the link drops now, a reconnect resends it.
            session.inflight_out[message.packet_id] = message
            if message.row is not None and not message.dup and self.store is not None:
                self.store.sent(message.row)  # queued before the PUBLISH leaves: DUP next time
        packet = message.build_publish_packet(dup=message.dup)
        message.publish_packet = packet
        await self._send_packet(packet)

    def _forget(self, message: ApplicationMessage) -> None:
        """A stored message is done with (acknowledged, refused, given up): unstore it."""
        row = message.row if isinstance(message, QueuedMessage | KeptMessage) else None
        if row is not None and self.store is not None:
            self.store.remove(row)

    async def _handle_qos1_message_flow(self, app_message: ApplicationMessage) -> None:
        """Acknowledge an incoming QoS 1 PUBLISH once the broker has routed and stored it.

        Without a store, or for outgoing messages, amqtt's own flow. With one, the PUBACK waits
        until the copies the broker keeps of the message are committed, and follows the PUBACK
        of the PUBLISH before it (MQTT-4.6.0-2). A message that cannot be stored in time is
        not acknowledged: the connection is dropped and the client sends it again.

        While the store holds no persistent session, a message that is not retained has
        nothing to be kept for, and is acknowledged at once (after any PUBACK still waiting).
        """
        store = self.store
        if store is None or app_message.direction != INCOMING or self.session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        packet = app_message.publish_packet
        if (
            not store.keeps_sessions
            and (packet is None or not packet.retain_flag)
            and (self._last_puback is None or self._last_puback.done())
        ):
            await super()._handle_qos1_message_flow(app_message)
            return
        packet_id = app_message.packet_id
        if packet_id is None or app_message.puback_packet is not None:
            await super()._handle_qos1_message_flow(app_message)  # amqtt raises its own error
            return
        previous, self._last_puback = self._last_puback, self._loop.create_future()
        mine = self._last_puback
        try:
            message = InboundMessage(app_message, self._loop.create_future())
            await self.session.delivered_message_queue.put(message)
            try:
                async with asyncio.timeout(STORE_DEADLINE):
                    await message.stored
                    if previous is not None:
                        await previous
            except (TimeoutError, BrokerError) as exc:
                logger.error(  # noqa: TRY400  # the cause is in the store's own log
                    "client %r: message %s was not stored (%s): dropping the connection "
                    "without acknowledging it",
                    self.client_id,
                    packet_id,
                    str(exc) or "timed out",
                )
                self.abort()
                return
            puback = PubackPacket.build(packet_id)
            await self._send_packet(puback)
            app_message.puback_packet = puback
        finally:
            mine.set_result(None)
