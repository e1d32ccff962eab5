"""An MQTT transport with no crypto: one persistent session that outlives a flaky link.

The services (the archiver first) and the E2EE client session stand on it (DESIGN.md §2). A
`Transport` keeps one MQTT 3.1.1 session, QoS 1 and ``clean_session=False`` by default, over as
many connections as the link needs: it reconnects with exponential backoff and full jitter until
it is closed, queues what is published while the link is down and sends it in order once it is
back, subscribes again when the broker has lost the session, and announces presence with a birth
message on every connect and a last will.

Delivery is at least once in both directions, never at most once:

- Outgoing: a message leaves the outbox when the broker acknowledged it (PUBACK). One that was
  in flight when the link dropped is sent again, so a receiver may see it twice.
- Incoming: a QoS 1 message is acknowledged when the consumer of `Transport.messages` asks for
  the next one, so a consumer that dies while handling a message gets it again from a persistent
  session. Messages already taken from a link that then dropped are still handed out, and the
  broker sends them again: the layer above drops duplicates (the E2EE seen set does). A consumer
  that must keep a message before the broker may forget it (the archiver commits it to disk
  first) asks for ``messages(manual_ack=True)`` and acknowledges each `Delivery` itself; the
  PUBACKs still go out in arrival order.

The outbox lives in memory. A layer that must not lose a message across a crash keeps its own
durable copy, publishes it with `Transport.publish_nowait` and deletes it when the ``on_sent``
hook reports its message id; after a restart it publishes what is left.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import secrets
import ssl
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, Self, overload

import aiomqtt

from meshchat.client._acks import AckQueue, Delivery
from meshchat.client._link import Link, LinkDownError, Received, acked, connack_code
from meshchat.client._outbox import Outbox
from meshchat.client._subscriptions import Subscriptions
from meshchat.client.urls import BrokerUrl
from meshchat.client.values import (
    DEFAULT_MAX_PAYLOAD,
    Backoff,
    Incoming,
    Publication,
    StateChange,
    TransportState,
    check_qos,
)
from meshchat.errors import AuthenticationError, ConfigError, MeshchatError, TransportError
from meshchat.topics import validate_filter, validate_topic

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["Transport"]

logger = logging.getLogger(__name__)

_CREDENTIALS_REFUSED: Final = {134: "bad user name or password", 135: "not authorized"}
_CLIENT_REFUSED: Final = {132: "unsupported protocol version", 133: "client identifier not valid"}


@dataclass(slots=True, eq=False)
class _Listener:
    changes: collections.deque[StateChange] = field(
        default_factory=lambda: collections.deque(maxlen=64)
    )
    ready: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True, slots=True)
class _Options:
    """A transport's settings, checked once."""

    client_id: str
    username: str | None
    password: str | None = field(repr=False)
    clean_session: bool
    keepalive: int
    will: Publication | None
    birth: Publication | None
    tls_context: ssl.SSLContext | None
    backoff: Backoff
    max_outbox: int
    max_incoming: int
    max_payload: int
    window: int
    connect_timeout: float
    ack_timeout: float
    close_timeout: float
    auth_retries: int
    on_sent: Callable[[int], None] | None

    def __post_init__(self) -> None:
        encoded = self.client_id.encode("utf-8", "replace")
        _require(
            0 < len(encoded) <= 65535,
            f"client id {self.client_id[:64]!r} must be 1 to 65535 bytes of UTF-8",
        )
        _require(1 <= self.keepalive <= 65535, f"keepalive {self.keepalive} is outside 1..65535 s")
        _require(self.max_outbox >= 1, f"max_outbox {self.max_outbox} must be at least 1")
        _require(self.max_incoming >= 1, f"max_incoming {self.max_incoming} must be at least 1")
        _require(
            1 <= self.max_payload <= 268_435_455, f"max_payload {self.max_payload} is out of range"
        )
        _require(1 <= self.window <= 65535, f"window {self.window} is outside 1..65535")
        _require(self.auth_retries >= 0, f"auth_retries {self.auth_retries} must not be negative")
        for name in ("connect_timeout", "ack_timeout", "close_timeout"):
            value = getattr(self, name)
            _require(0 < value < math.inf, f"{name} {value} must be a positive number of seconds")


class _ClosingError(Exception):
    """The transport is closing; the current connection ends cleanly."""


class Transport:
    """An MQTT session over a link that comes and goes, as an async context manager.

    Example:
        ```python
        async with Transport("mqtt://127.0.0.1:1883", client_id="archiver-1") as transport:
            await transport.subscribe("mc/acme/#")
            async for message in transport.messages():
                store(message.topic, message.payload)
        ```

    Entering makes the first connection attempt. A broker that refuses the credentials raises
    `AuthenticationError` right there; one that cannot be reached does not: the transport enters
    in the ``DISCONNECTED`` state and keeps trying in the background, and what is published
    meanwhile waits in the outbox. Leaving sends what the outbox holds (for up to
    ``close_timeout`` seconds), publishes the last will itself (a clean disconnect makes the
    broker discard it, and presence should read offline either way) and disconnects.
    """

    def __init__(
        self,
        url: BrokerUrl | str,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = False,
        keepalive: int = 60,
        will: Publication | None = None,
        birth: Publication | None = None,
        tls_context: ssl.SSLContext | None = None,
        backoff: Backoff | None = None,
        max_outbox: int = 10_000,
        max_incoming: int = 1000,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        window: int = 20,
        connect_timeout: float = 10.0,
        ack_timeout: float = 30.0,
        close_timeout: float = 5.0,
        auth_retries: int = 3,
        on_sent: Callable[[int], None] | None = None,
    ) -> None:
        """Prepare a transport; nothing touches the network until it is entered.

        Args:
            url: the broker, for example ``mqtt://127.0.0.1:1883`` (see `BrokerUrl`).
            client_id: the MQTT client id; a persistent session needs one that stays the same
                from run to run. With ``clean_session=True`` a random one is made when omitted.
            username: the user name to log in with.
            password: the password or device token.
            clean_session: False (the default) keeps the session, its subscriptions and the
                QoS 1 messages sent to it while the link is down, at the broker.
            keepalive: seconds of silence before a ping; a link that stays silent for about
                twice as long is taken as dead.
            will: published by the broker when the link ends without a clean disconnect.
            birth: published on every connect, before anything from the outbox (presence).
            tls_context: TLS settings for ``mqtts://`` and ``wss://`` (the system's trusted
                CAs when omitted).
            backoff: delays between attempts.
            max_outbox: messages that may wait for the broker's acknowledgement; `publish`
                refuses more.
            max_incoming: messages received and not yet taken by `messages` (QoS 1 ones beyond
                it stay unacknowledged and come again on the next connection).
            max_payload: the largest payload `publish` accepts.
            window: QoS 1 messages in flight at once.
            connect_timeout: seconds for the TCP (or TLS, or WebSocket) connect, and again for
                the broker's CONNACK.
            ack_timeout: seconds the broker may take to acknowledge a message or subscription
                before the link is taken as broken and made again.
            close_timeout: seconds leaving may spend sending the outbox, and again closing.
            auth_retries: after the transport has once been let in, refusals of its
                credentials it retries (a broker may refuse a client that reconnects too often
                with the same answer) before raising `AuthenticationError`. A refusal on the
                very first connect is never retried.
            on_sent: called with the message id of each message the broker acknowledged.

        Raises:
            ConfigError: a setting is unusable (the message names it).
        """
        self._url = url if isinstance(url, BrokerUrl) else BrokerUrl.parse(url)
        if tls_context is not None and not self._url.tls:
            raise ConfigError(
                f"a TLS context was given for {self._url}, which is not encrypted; "
                "use mqtts:// or wss://"
            )
        if client_id is None and not clean_session:
            raise ConfigError(
                "a persistent session (clean_session=False) needs a client id that stays "
                "the same from run to run"
            )
        self._opts = _Options(
            client_id=f"mc{secrets.token_hex(10)}" if client_id is None else client_id,
            username=username,
            password=password,
            clean_session=clean_session,
            keepalive=keepalive,
            will=will,
            birth=birth,
            tls_context=tls_context or (ssl.create_default_context() if self._url.tls else None),
            backoff=backoff or Backoff(),
            max_outbox=max_outbox,
            max_incoming=max_incoming,
            max_payload=max_payload,
            window=window,
            connect_timeout=connect_timeout,
            ack_timeout=ack_timeout,
            close_timeout=close_timeout,
            auth_retries=auth_retries,
            on_sent=on_sent,
        )
        self._random = random.SystemRandom()  # jitter only; SystemRandom needs no seeding

        self._change = StateChange(TransportState.NEW)
        self._changed = asyncio.Event()
        self._listeners: set[_Listener] = set()
        self._error: MeshchatError | None = None
        self._closing = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None
        self._link: Link | None = None
        self._session_present = False

        self._outbox = Outbox(limit=max_outbox, on_sent=on_sent)
        self._inbox: collections.deque[Received] = collections.deque()
        self._inbox_ready = asyncio.Event()
        self._acks = AckQueue()
        self._subscriptions = Subscriptions(
            broker=str(self._url), actor=username or self._opts.client_id
        )

    # -- what callers see ----------------------------------------------------------------------

    @property
    def url(self) -> BrokerUrl:
        """The broker."""
        return self._url

    @property
    def client_id(self) -> str:
        """The MQTT client id."""
        return self._opts.client_id

    @property
    def state(self) -> TransportState:
        """The current state."""
        return self._change.state

    @property
    def last_change(self) -> StateChange:
        """The latest state change, with its details."""
        return self._change

    @property
    def error(self) -> MeshchatError | None:
        """The failure that closed the transport for good, if one did."""
        return self._error

    @property
    def session_present(self) -> bool:
        """Whether the broker still had the session on the latest connect."""
        return self._session_present

    @property
    def queued(self) -> int:
        """Messages published and not yet acknowledged by the broker."""
        return len(self._outbox)

    def __repr__(self) -> str:
        """Say which broker, which client and in what state; never the password."""
        return (
            f"Transport(url='{self._url}', client_id={self._opts.client_id!r}, "
            f"state={self.state.value}, queued={self.queued})"
        )

    async def __aenter__(self) -> Self:
        """Start, and wait for the outcome of the first connection attempt.

        Raises:
            AuthenticationError: the broker refused the credentials.
            ConfigError: the broker refused the client id or the protocol version.
            TransportError: the transport was entered before (it runs once).
        """
        if self.state is not TransportState.NEW:
            raise TransportError(
                f"this transport to {self._url} was already {self.state.value}; "
                "make a new Transport to connect again",
                reason="reused",
            )
        self._set(StateChange(TransportState.CONNECTING))
        tasks = asyncio.TaskGroup()
        await tasks.__aenter__()
        self._tasks = tasks
        tasks.create_task(self._supervise(), name="meshchat[transport].loop")
        try:
            await self._first_attempt.wait()
        except BaseException:
            await self._shutdown()
            raise
        if self._error is not None:
            await self._shutdown()
            raise self._error
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Send what the outbox holds (briefly), publish the will and disconnect."""
        await self._shutdown()

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> int:
        """Publish, and return the message id once the broker acknowledged the message.

        While the link is down the message waits in the outbox. Cancelling the wait does not
        withdraw the message.

        Raises:
            TopicError: `topic` is not a valid MQTT topic name.
            TransportError: the outbox is full, the payload too large, or the transport
                closed before the broker acknowledged the message.
            AuthenticationError: the transport closed because its credentials were refused.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        message_id = self._enqueue(topic, payload, qos, retain, future)
        await future
        return message_id

    def publish_nowait(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> int:
        """Put a message in the outbox and return its message id at once.

        The ``on_sent`` hook reports the id when the broker has acknowledged it.

        Raises:
            TopicError: `topic` is not a valid MQTT topic name.
            TransportError: the outbox is full, the payload too large, or the transport closed.
            AuthenticationError: the transport closed because its credentials were refused.
        """
        return self._enqueue(topic, payload, qos, retain, None)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> int:
        """Subscribe, now and after every reconnect that finds the session gone.

        Returns once the broker confirmed it (after the link is back, when it is down), with
        the QoS the broker granted.

        Raises:
            TopicError: `topic_filter` is not a valid MQTT topic filter.
            PermissionDeniedError: the broker refused the subscription.
            TransportError: the transport closed first.
        """
        self._check_open()
        validate_filter(topic_filter)
        check_qos(qos)
        return await self._subscriptions.add(topic_filter, qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        """Stop a subscription; returns once the broker confirmed it (or has no session).

        Raises:
            TopicError: `topic_filter` is not a valid MQTT topic filter.
            TransportError: the transport closed first.
        """
        self._check_open()
        validate_filter(topic_filter)
        await self._subscriptions.remove(topic_filter)

    @overload
    def messages(self, *, manual_ack: Literal[False] = False) -> AsyncGenerator[Incoming, None]: ...

    @overload
    def messages(self, *, manual_ack: Literal[True]) -> AsyncGenerator[Delivery, None]: ...

    async def messages(
        self, *, manual_ack: bool = False
    ) -> AsyncGenerator[Incoming | Delivery, None]:
        """Yield incoming messages in arrival order, across reconnects, until the transport closes.

        By default a QoS 1 message is acknowledged to the broker when the next one is asked for.
        With `manual_ack` each message comes as a `Delivery` and is acknowledged only when its
        `Delivery.ack` is called; the acknowledgements go out in arrival order all the same, so
        one acknowledged early waits for the ones before it. Meant for one consumer; with
        several, each message goes to one of them.

        Args:
            manual_ack: the consumer acknowledges each message itself (after it has kept it).

        Raises:
            AuthenticationError: the transport closed because its credentials were refused.
        """
        previous: Received | None = None
        while True:
            if previous is not None:
                previous.ack()
                previous = None
            while not self._inbox and self.state is not TransportState.CLOSED:
                self._inbox_ready.clear()
                await self._inbox_ready.wait()
            if self.state is TransportState.CLOSED:
                if self._error is not None:
                    raise self._error
                return
            received = self._inbox.popleft()
            if manual_ack:
                yield self._acks.track(received)
            else:
                previous = received
                yield Incoming(received.topic, received.payload, received.qos, received.retain)

    async def wait_state(self, *states: TransportState) -> StateChange:
        """Wait until the transport is in one of `states` (at once if it is); return the change.

        Raises:
            AuthenticationError: the transport closed because its credentials were refused.
            TransportError: the transport closed (and CLOSED is not among `states`).
        """
        while self.state not in states:
            if self.state is TransportState.CLOSED:
                if self._error is not None:
                    raise self._error
                raise TransportError(
                    f"the transport to {self._url} closed while waiting for "
                    f"{', '.join(state.value for state in states)}",
                    reason="closed",
                )
            await self._changed.wait()
        return self._change

    async def state_changes(self) -> AsyncGenerator[StateChange, None]:
        """Yield the current state, then every change, until the transport closes.

        Each iterator sees every change (it keeps the latest 64 when read slowly).
        """
        listener = _Listener()
        self._listeners.add(listener)
        try:
            change = self._change
            yield change
            while change.state is not TransportState.CLOSED:
                while not listener.changes:
                    listener.ready.clear()
                    await listener.ready.wait()
                change = listener.changes.popleft()
                yield change
        finally:
            self._listeners.discard(listener)

    # -- the outbox, the inbox and the state ---------------------------------------------------

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self.state is TransportState.CLOSED or self._closing.is_set():
            raise TransportError(f"the transport to {self._url} is closed", reason="closed")

    def _enqueue(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        future: asyncio.Future[None] | None,
    ) -> int:
        self._check_open()
        validate_topic(topic)
        check_qos(qos)
        data = _as_bytes(payload)
        if len(data) > self._opts.max_payload:
            raise TransportError(
                f"a payload of {len(data)} bytes is over the limit of {self._opts.max_payload}",
                reason="too-large",
            )
        where = f"the broker at {self._url} (the transport is {self.state.value})"
        return self._outbox.put(topic, data, qos, retain, future, where=where).message_id

    def _deliver(self, received: Received) -> bool:
        if self.state is TransportState.CLOSED or len(self._inbox) >= self._opts.max_incoming:
            return False
        self._inbox.append(received)
        self._inbox_ready.set()
        return True

    def _set(self, change: StateChange) -> None:
        self._change = change
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for listener in self._listeners:
            listener.changes.append(change)
            listener.ready.set()

    def _close_out(self) -> None:
        """Fail what still waits, and enter CLOSED."""
        error = self._error

        def closed() -> MeshchatError:
            return error or TransportError(
                f"the transport to {self._url} closed first", reason="closed"
            )

        dropped = self._outbox.fail_all(closed)
        if dropped:
            logger.warning(
                "closed the transport to %s with %d messages not acknowledged", self._url, dropped
            )
        self._subscriptions.fail_all(closed)
        self._inbox.clear()
        reason = str(error) if error is not None else "closed"
        self._set(StateChange(TransportState.CLOSED, reason=reason, error=error))
        self._inbox_ready.set()

    async def _shutdown(self) -> None:
        self._closing.set()
        if self._link is not None:
            self._link.interrupt("the transport is closing")
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            # The loop never raises on purpose, so the body's own exception is not handed to the
            # task group (it would come back wrapped in an ExceptionGroup).
            await tasks.__aexit__(None, None, None)

    # -- the connection loop -------------------------------------------------------------------

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = refusals = 0
        let_in = False
        try:
            while not self._closing.is_set():
                self._set(StateChange(TransportState.CONNECTING))
                link = self._new_link()
                self._link = link
                outcome = await self._connect(link)
                if outcome is None:
                    let_in, refusals = True, 0
                    started = loop.time()
                    reason = await self._serve(link)
                    await self._finish(link)
                    if loop.time() - started >= self._opts.backoff.reset_after:
                        attempt = 0
                elif isinstance(outcome, str):
                    reason = outcome
                elif (
                    isinstance(outcome, AuthenticationError)
                    and let_in
                    and refusals < self._opts.auth_retries
                ):
                    refusals += 1
                    reason = str(outcome)
                else:
                    self._error = outcome
                    logger.warning("giving up on %s: %s", self._url, outcome)
                    return
                self._link = None
                if self._closing.is_set():
                    return
                delay = self._opts.backoff.delay(attempt, self._random.random())
                # Loud when the link goes, quiet while it stays gone.
                level = logging.WARNING if outcome is None or not attempt else logging.INFO
                attempt += 1
                logger.log(
                    level, "no connection to %s (%s); retrying in %.1f s", self._url, reason, delay
                )
                self._set(StateChange(TransportState.DISCONNECTED, retry_in=delay, reason=reason))
                self._first_attempt.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closing.wait()
        finally:
            self._link = None
            self._close_out()
            self._first_attempt.set()

    def _new_link(self) -> Link:
        will = self._opts.will
        return Link(
            self._url.host,
            self._url.port,
            deliver=self._deliver,
            client_id=self._opts.client_id,
            username=self._opts.username,
            password=self._opts.password,
            clean_session=self._opts.clean_session,
            keepalive=self._opts.keepalive,
            will=None
            if will is None
            else aiomqtt.Will(will.topic, will.payload, will.qos, will.retain),
            transport="websockets" if self._url.websocket else "tcp",
            websocket_path=self._url.path or None,
            tls_context=self._opts.tls_context,
            connect_timeout=self._opts.connect_timeout,
            window=self._opts.window,
        )

    async def _connect(self, link: Link) -> str | MeshchatError | None:
        """Connect; None when connected, else why not (an error when retrying will not help)."""
        try:
            await link.__aenter__()
        except aiomqtt.MqttError as exc:
            link.abort()
            return self._refusal(exc) or f"cannot connect: {exc}"
        except BaseException:
            link.abort()
            raise
        return None

    def _refusal(self, exc: aiomqtt.MqttError) -> MeshchatError | None:
        code = connack_code(exc)
        who = f"client {self._opts.client_id!r}"
        if self._opts.username is not None:
            who += f" as {self._opts.username!r}"
        error: MeshchatError
        if code in _CREDENTIALS_REFUSED:
            error = AuthenticationError(
                f"the broker at {self._url} refused the login of {who}: "
                f"{_CREDENTIALS_REFUSED[code]}. Check the user name and password (or device "
                "token); the account may also be revoked, or the client connecting too often"
            )
        elif code in _CLIENT_REFUSED:
            error = ConfigError(f"the broker at {self._url} refused {who}: {_CLIENT_REFUSED[code]}")
        else:
            return None
        error.__cause__ = exc
        return error

    async def _serve(self, link: Link) -> str:
        """Run an established connection until it ends; return why it ended."""
        reason = "closed"
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._watch(link), name="meshchat[transport].watch")
                tasks.create_task(self._until_closing(), name="meshchat[transport].close")
                if not link.session_present:
                    self._subscriptions.session_lost()
                await self._subscriptions.sync(link, self._opts.ack_timeout)
                if self._opts.birth is not None:
                    birth = self._opts.birth
                    await acked(
                        link.publish(
                            birth.topic,
                            birth.payload,
                            qos=birth.qos,
                            retain=birth.retain,
                            timeout=math.inf,
                        ),
                        "the birth message",
                        self._opts.ack_timeout,
                    )
                self._session_present = link.session_present
                logger.info(
                    "connected to %s as %r (session present: %s)",
                    self._url,
                    self._opts.client_id,
                    link.session_present,
                )
                self._set(
                    StateChange(TransportState.CONNECTED, session_present=link.session_present)
                )
                self._first_attempt.set()
                for _ in range(self._opts.window):
                    tasks.create_task(self._send_loop(link), name="meshchat[transport].send")
                tasks.create_task(
                    self._subscriptions.keep_in_step(link, self._opts.ack_timeout),
                    name="meshchat[transport].subscribe",
                )
        except* LinkDownError as down:
            reason = str(down.exceptions[0])
        except* _ClosingError:
            pass
        finally:
            self._outbox.requeue()
        return reason

    async def _finish(self, link: Link) -> None:
        """End a connection: cleanly when closing (will published by us), else abruptly."""
        if self._closing.is_set() and link.up:
            try:
                async with asyncio.timeout(self._opts.close_timeout):
                    if self._opts.will is not None:
                        will = self._opts.will
                        await link.publish(
                            will.topic,
                            will.payload,
                            qos=will.qos,
                            retain=will.retain,
                            timeout=math.inf,
                        )
                    await link.__aexit__(None, None, None)
            except (TimeoutError, aiomqtt.MqttError) as exc:
                logger.warning("could not disconnect from %s cleanly: %s", self._url, exc)
            else:
                link.settle()
                return
        link.abort()

    async def _watch(self, link: Link) -> None:
        raise LinkDownError(await link.wait_lost())

    async def _until_closing(self) -> None:
        await self._closing.wait()
        if self.state is TransportState.CONNECTED and self.queued:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._opts.close_timeout):
                    await self._outbox.wait_idle()
        raise _ClosingError

    async def _send_loop(self, link: Link) -> None:
        while True:
            # Nothing is awaited between taking a message and handing it to paho: the order in
            # which the senders take messages is the order they go on the wire.
            item = await self._outbox.take()
            sending = link.publish(
                item.topic, item.payload, qos=item.qos, retain=item.retain, timeout=math.inf
            )
            await acked(sending, f"message {item.message_id}", self._opts.ack_timeout)
            self._outbox.sent(item)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _as_bytes(payload: object) -> bytes:
    # bytes(5) would be five NUL bytes: a caller without type checks gets an error instead.
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    msg = f"a payload is bytes, not {type(payload).__name__}"
    raise TypeError(msg)
