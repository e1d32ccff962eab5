"""The synchronous device SDK: a paho-mqtt client around `DeviceCore`, for small Linux devices.

`Device` connects with a credential file from `meshchat device add` and keeps the link up in a
background thread:

- persistent session (clean session off, the device name as client id), so the broker keeps
  work orders and key distributions while the device is away;
- QoS 1 for everything but, optionally, GPS fixes; inbound QoS 1 messages are acknowledged only
  after they were handled and the device's state saved (paho's manual acknowledgements);
- a last will that marks the device offline (``_p/{device}``, retained), an ``online`` birth
  message on every connect, and ``offline`` again on a clean `close`;
- reconnects with exponential backoff and jitter (from `min_backoff` doubling to `max_backoff`,
  each wait drawn between half and all of it, so a fleet that lost the broker at once does
  not come back at once);
- a refused login (revoked device, wrong token) stops it for good with `AuthenticationError`;
- work orders from the people in its dispatch groups reach `on_order` once each (kept in the
  state file before the broker's copy is acknowledged; an order still unanswered when the
  process ended is handed to `on_order` again at the next start), and `Order.accept`, `done`
  and `reject` answer them end-to-end encrypted;
- alerts: rules on its own status (`meshchat.device.alerts`: battery below 15%, temperature
  above 60 °C, load above 80% by default) and `alert` post into its dispatch group (or
  `alert_group`), deduplicated and rate-limited; the counts of repeats go out with the next
  report and on `close`.

Callbacks run on paho's network thread; `publish_*` and the answers may be called from any
thread, the callbacks included.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Self
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from meshchat.device.alerts import DEFAULT_RULES, AlertRule
from meshchat.device.core import OFFLINE, ONLINE, DeviceCore, Output, WorkOrder
from meshchat.device.credentials import DeviceCredentials
from meshchat.device.orders import OrderState
from meshchat.device.telemetry import ExtraValue, GpsFix, Status
from meshchat.errors import (
    AuthenticationError,
    ConfigError,
    E2EEError,
    OrderError,
    TransportError,
)
from meshchat.files import write_private

__all__ = ["DEFAULT_KEEPALIVE", "Device", "Order", "OrderHandler"]

logger = logging.getLogger(__name__)

DEFAULT_KEEPALIVE: Final = 30
"""Seconds between keepalive pings; the broker declares the device gone after 1.5 times this."""
MAX_QUEUED: Final = 10_000
"""QoS 1 messages kept in memory while the link is down; older ones are refused beyond this."""
_REFUSED: Final = frozenset({134, 135})
"""CONNACK reasons that retrying cannot fix: bad user name or password, not authorised."""
_PORTS: Final = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
EARLY_ACK_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Order:
    """A work order handed to `on_order`; answer it with `accept`, `done` or `reject`.

    Attributes:
        order_id: the dispatcher's id for it (``wo-...``).
        text: what to do.
        sender: the dispatcher who sent it.
        ts: when it was sent (unix seconds, the dispatcher's clock).
        device: the device it was sent to.
    """

    order_id: str
    text: str
    sender: str
    ts: int
    device: Device = field(repr=False, compare=False)

    def accept(self) -> None:
        """Tell the dispatcher the order is taken on.

        Raises:
            OrderError: it was answered already.
        """
        self.device.answer(self.order_id, OrderState.ACCEPTED)

    def done(self) -> None:
        """Tell the dispatcher the order is done.

        Raises:
            OrderError: it was answered with done or rejected already.
        """
        self.device.answer(self.order_id, OrderState.DONE)

    def reject(self, reason: str) -> None:
        """Tell the dispatcher the order will not be done, and why.

        Raises:
            OrderError: no reason, or it was answered with done or rejected already.
        """
        self.device.answer(self.order_id, OrderState.REJECTED, reason)


OrderHandler = Callable[[Order], object]
"""Called once per work order, on paho's thread (keep it short, or hand the order on)."""


class Device:
    """A device's link to meshchat: telemetry out, presence, inbox in; a context manager."""

    def __init__(
        self,
        credentials: DeviceCredentials | Path | str,
        *,
        broker: str | None = None,
        state_path: Path | str | None = None,
        keepalive: int = DEFAULT_KEEPALIVE,
        min_backoff: int = 1,
        max_backoff: int = 60,
        connect_timeout: float = 10.0,
        gps_qos: int = 1,
        ca_file: Path | str | None = None,
        on_order: OrderHandler | None = None,
        alert_rules: Iterable[AlertRule | str] = DEFAULT_RULES,
        alert_group: str | None = None,
        clock: Callable[[], float] = time.time,
        username: str | None = None,
    ) -> None:
        """Prepare the device; nothing connects until `start` (or ``with``).

        Args:
            credentials: the credentials, or the path of their file.
            broker: another broker URL than the credentials' (``mqtt://``, ``mqtts://``,
                ``ws://``, ``wss://``).
            state_path: where the device keeps its state between runs (rosters, key records,
                pinned identities, seen work orders); default: beside the credential file,
                with ``.state`` added; None with in-memory credentials: nothing is kept.
            keepalive: seconds between keepalive pings.
            min_backoff: seconds before the first reconnect attempt.
            max_backoff: the longest wait between attempts.
            connect_timeout: seconds ``with`` waits for the first connection before it goes on
                offline (publications queue until the link is up).
            gps_qos: 1 (default) queues fixes while offline and resends them; 0 drops them.
            ca_file: CA certificates for ``mqtts://`` and ``wss://`` (default: the system's).
            on_order: called with each work order, once (see the module docstring).
            alert_rules: rules checked on every status (`AlertRule`, or text such as
                ``"battery < 15"``); ``()`` for none.
            alert_group: the group alerts go to (``dept/name``; the device must be a member
                and allowed to post); default: its dispatch group.
            clock: the time source.
            username: the account the device logs in as: default the device's own name (a
                device account); a device registered to a person logs in as that person,
                with the device's token (its fixes then count as the person's in the geofence).

        Raises:
            ConfigError: the credentials or the URL are unusable.
        """
        if isinstance(credentials, DeviceCredentials):
            self.credentials = credentials
            self.state_path = Path(state_path) if state_path is not None else None
        else:
            path = Path(credentials)
            self.credentials = DeviceCredentials.load(path)
            self.state_path = (
                Path(state_path) if state_path is not None else path.with_name(path.name + ".state")
            )
        if gps_qos not in {0, 1}:
            raise ConfigError(f"gps_qos must be 0 or 1, not {gps_qos}")
        self._clock = clock
        self.on_order = on_order
        self.connect_timeout = connect_timeout
        self.gps_qos = gps_qos
        self.keepalive = keepalive
        self.username = username or self.credentials.device
        url = broker or self.credentials.broker
        self._scheme, self._host, self._port, self._path = _parse_url(url)
        self.broker = url
        saved = self._read_state()
        rules = [r if isinstance(r, AlertRule) else AlertRule.parse(r) for r in alert_rules]
        try:
            self.core = DeviceCore(
                self.credentials,
                state=saved,
                now=clock(),
                alert_rules=rules,
                alert_group=alert_group,
            )
        except E2EEError as exc:
            raise ConfigError(f"{self.state_path}: {exc}") from exc
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._unacked: set[int] = set()
        self._handling = 0  # messages being handled (and their orders handed over) now
        self._acked_early: dict[int, float] = {}
        self._connected = threading.Event()
        self._settled = threading.Event()
        self._refused: str | None = None
        self._started = False
        self._connected_once = False
        self._closed = False
        self._client = self._make_client(ca_file, min_backoff, max_backoff)

    # ------------------------------------------------------------------------------- setup

    def _read_state(self) -> bytes | None:
        if self.state_path is None or not self.state_path.exists():
            return None
        try:
            return self.state_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.state_path}: {exc.strerror}") from exc

    def _save_state(self) -> None:
        if self.state_path is None:
            return
        try:
            write_private(self.state_path, self.core.state())
        except OSError as exc:
            logger.warning("could not save the device state to %s: %s", self.state_path, exc)

    def _make_client(self, ca_file: Path | str | None, low: int, high: int) -> mqtt.Client:
        websockets = self._scheme in {"ws", "wss"}
        client = _JitteredClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.credentials.device,
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
            transport="websockets" if websockets else "tcp",
            manual_ack=True,
        )
        client.username_pw_set(self.username, self.credentials.token)
        client.will_set(self.core.presence_topic, OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(low, high)
        client.max_queued_messages_set(MAX_QUEUED)
        if websockets:
            client.ws_set_options(path=self._path or "/mqtt")
        if self._scheme in {"mqtts", "wss"}:
            client.tls_set(ca_certs=None if ca_file is None else str(ca_file))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    # ---------------------------------------------------------------------------- life

    @property
    def name(self) -> str:
        """The device's name."""
        return self.credentials.device

    @property
    def online(self) -> bool:
        """Whether the link to the broker is up."""
        return self._connected.is_set()

    @property
    def refused(self) -> str | None:
        """Why the broker refused the device for good (revoked, bad token), or None."""
        return self._refused

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the broker acknowledged every QoS 1 publication; True when it did."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._unacked, timeout)

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the device knows its dispatch groups, their rosters and members' keys.

        From then on every reader known to the directory has been sent the telemetry key (the
        key shares go out before anything published after this returns).
        """
        with self._changed:
            return self._changed.wait_for(lambda: self.core.synced, timeout)

    def wait_readers(self, devices: list[str], timeout: float | None = None) -> bool:
        """Wait until these readers' devices were sent the telemetry key and the broker has it.

        Args:
            devices: device names of dispatchers (people's devices in the dispatch groups).
            timeout: seconds; None waits for ever.

        Returns:
            True when they hold the current key (as far as the broker is concerned).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            if not self._changed.wait_for(
                lambda: set(devices) <= set(self.core.shared_with), timeout
            ):
                return False
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.flush(left)

    def start(self) -> None:
        """Connect in the background (returns at once; see `wait_connected`)."""
        if self._closed:
            raise TransportError(
                f"device {self.name} was closed; make a new Device", reason="closed"
            )
        if self._started:
            return
        self._started = True
        self._client.connect_async(self._host, self._port, keepalive=self.keepalive)
        self._client.loop_start()
        with self._lock:
            unanswered = [o for o in self.core.open_orders() if o.state is OrderState.RECEIVED]
        self._hand_over(unanswered)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait for the link (or a refusal); True when connected.

        Raises:
            AuthenticationError: the broker refused the device's login (revoked, wrong token).
        """
        self._settled.wait(timeout)
        if self._refused is not None:
            raise AuthenticationError(
                f"the broker refused device {self.name}: {self._refused} (revoked, or the "
                "credential file is out of date)"
            )
        return self._connected.is_set()

    def __enter__(self) -> Self:
        """Start, and wait up to `connect_timeout` for the link and for the readers' keys.

        The device then knows its dispatch groups and their members, and has sent each reader
        the telemetry key. When the broker is not reachable in time it goes on offline: what
        it publishes waits for the link.

        Raises:
            AuthenticationError: the broker refused the device's login.
        """
        deadline = time.monotonic() + self.connect_timeout
        self.start()
        try:
            if not self.wait_connected(self.connect_timeout):
                logger.warning(
                    "%s is not reachable yet; %s works offline and keeps trying",
                    self.broker,
                    self.name,
                )
            elif not self.wait_synced(max(0.0, deadline - time.monotonic())):
                if self.core.reading_inbox:
                    logger.warning(
                        "%s has asked the archiver for its inbox and has no answer yet; work "
                        "orders sent before its first start arrive when it answers",
                        self.name,
                    )
                    return self
                logger.warning(
                    "%s has not heard of its dispatch groups yet (is the directory service "
                    "running?); readers get the telemetry key when it does",
                    self.name,
                )
        except AuthenticationError:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Say offline, disconnect and save the state."""
        self.close()

    def close(self, timeout: float = 2.0) -> None:
        """Publish ``offline`` (if connected), disconnect, stop the thread and save the state."""
        if self._closed:
            return
        # A message being handled (an order handed to `on_order`) finishes first, so that its
        # answer goes out with the rest.
        with self._changed:
            self._changed.wait_for(lambda: self._handling == 0, timeout)
        if self._connected.is_set():
            self._emit(self._compute(lambda: self.core.flush_alerts(now=self._clock(), force=True)))
            self.flush(timeout)
        self._closed = True
        if self._connected.is_set():
            info = self._client.publish(self.core.presence_topic, OFFLINE, qos=1, retain=True)
            # The link may go down meanwhile: the last will says offline instead.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self._client.disconnect()
        if self._started:
            self._client.loop_stop()
        with self._lock:
            self._save_state()

    # ------------------------------------------------------------------------ callbacks

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: object,
    ) -> None:
        if reason_code.is_failure:
            if reason_code.value in _REFUSED:
                self._refused = str(reason_code)
                logger.error("the broker refused %s: %s", self.name, reason_code)
                client.disconnect()
                self._settled.set()
            else:
                logger.warning("the broker turned %s away: %s", self.name, reason_code)
            return
        now = self._clock()

        def first() -> Output:
            if not self._connected_once:
                self._connected_once = True
                return self.core.start(now=now)
            if not flags.session_present:
                return Output(subscribe=self.core.subscriptions())
            return Output()

        out = self._compute(first)
        client.publish(self.core.presence_topic, ONLINE, qos=1, retain=True)
        self._emit(out)
        self._connected.set()
        self._settled.set()
        logger.info("%s connected to %s", self.name, self.broker)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: object,
    ) -> None:
        self._connected.clear()
        if not self._closed:
            logger.info("%s lost the link: %s; reconnecting", self.name, reason_code)

    def _on_message(
        self, client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage
    ) -> None:
        orders: list[WorkOrder] = []
        with self._changed:
            self._handling += 1
        try:
            # The state, with new orders, is saved before the ack.
            out = self._compute(
                lambda: self.core.on_message(
                    message.topic, bytes(message.payload), now=self._clock()
                )
            )
            self._emit(out)
            orders = out.orders
        except Exception:
            # A bug must not kill paho's thread; the message is acknowledged and dropped.
            logger.exception("%s could not handle a message on %s", self.name, message.topic)
        client.ack(message.mid, message.qos)
        try:
            self._hand_over(orders)
        finally:
            with self._changed:
                self._handling -= 1
                self._changed.notify_all()

    def _hand_over(self, orders: list[WorkOrder]) -> None:
        """Give new work orders to `on_order` (outside the lock: it may answer at once)."""
        if self.on_order is None:
            return
        for order in orders:
            try:
                self.on_order(Order(order.order_id, order.text, order.sender, order.ts, self))
            except Exception:
                # The order stays unanswered and comes back at the next start.
                logger.exception("on_order failed for work order %s", order.order_id)

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        _reason_code: ReasonCode,
        _properties: object,
    ) -> None:
        with self._changed:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                # Acknowledged before `_emit` noted it, or a QoS 0 message (paho reports those
                # as sent); entries go after a minute, long before paho reuses a message id.
                now = time.monotonic()
                self._acked_early[mid] = now
                for old in [m for m, at in self._acked_early.items() if now - at > EARLY_ACK_S]:
                    del self._acked_early[old]
            self._changed.notify_all()

    # Lock order: paho holds its callback mutex while it runs our callbacks, and takes it in
    # publish() and subscribe(). So our lock is held only to compute (and save the state),
    # never while calling into paho; otherwise a callback waiting for our lock and a publish
    # waiting for paho's mutex would deadlock.

    def _compute(self, make: Callable[[], Output]) -> Output:
        """Run the core under the lock; save the state when it changed."""
        with self._lock:
            out = make()
            if out.state_changed:
                self._save_state()
        return out

    def _emit(self, out: Output) -> None:
        """Subscribe and publish what the core asked for (never under the lock)."""
        for topic in out.subscribe:
            self._client.subscribe(topic, qos=1)
        for item in out.publish:
            info = self._client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
            if item.qos:
                with self._changed:
                    if self._acked_early.pop(info.mid, None) is None:
                        self._unacked.add(info.mid)
        with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------------- telemetry

    def _now(self) -> int:
        return int(self._clock())

    def publish_status(
        self,
        status: Status | None = None,
        *,
        battery: int | None = None,
        temperature: float | None = None,
        load: float | None = None,
        signal: int | None = None,
        uptime: int | None = None,
        state: str | None = None,
        extra: dict[str, ExtraValue] | None = None,
    ) -> None:
        """Publish a status report, end-to-end encrypted, retained.

        Give a `Status`, or its fields (the time is now).

        Raises:
            TelemetryError: a field is out of range or of the wrong type (nothing is sent).
            TransportError: the device was closed.
        """
        if status is None:
            status = Status(
                self._now(),
                battery=battery,
                temperature=temperature,
                load=load,
                signal=signal,
                uptime=uptime,
                state=state,
                extra=extra or {},
            )
        self._send(lambda now: self.core.status(status, now=now))

    def publish_fix(
        self,
        fix: GpsFix | None = None,
        *,
        lat: float | None = None,
        lon: float | None = None,
        accuracy: float | None = None,
        speed: float | None = None,
        heading: float | None = None,
        battery: int | None = None,
        ts: int | None = None,
    ) -> None:
        """Publish a GPS fix, end-to-end encrypted (about 55 bytes on the wire).

        Give a `GpsFix`, or its fields (`ts` defaults to now).

        Raises:
            TelemetryError: a field is out of range or of the wrong type (nothing is sent).
            TransportError: the device was closed.
        """
        if fix is None:
            if lat is None or lon is None:
                raise TypeError("publish_fix needs a GpsFix, or lat and lon")
            fix = GpsFix(
                self._now() if ts is None else ts,
                lat,
                lon,
                accuracy=accuracy,
                speed=speed,
                heading=heading,
                battery=battery,
            )
        self._send(lambda now: self.core.fix(fix, now=now, qos=self.gps_qos))

    # ---------------------------------------------------------------------------- orders

    @property
    def orders(self) -> list[WorkOrder]:
        """Work orders not done or rejected, oldest first."""
        with self._lock:
            return self.core.open_orders()

    def answer(self, order_id: str, state: OrderState | str, reason: str = "") -> None:
        """Answer a work order: ``accepted``, ``done`` or ``rejected`` (with a reason).

        The answer goes to every device of the dispatcher, end-to-end encrypted (QoS 1; it
        waits for the link when it is down).

        Raises:
            OrderError: no such order, a state it cannot move to, or a rejection without a
                reason.
        """
        try:
            wanted = OrderState(state)
        except ValueError as exc:
            raise OrderError(f"{state!r} is not an answer: accepted, done or rejected") from exc
        self._send(lambda now: self.core.answer(order_id, wanted, reason, now=now))

    # ---------------------------------------------------------------------------- alerts

    def alert(self, text: str, *, key: str | None = None) -> None:
        """Post an alert into the alert group (end-to-end encrypted, signed by the device).

        Repeats of one alert (the same `key`, default its text) within 10 minutes edit the
        first message with a count instead of posting again; at most 5 new alerts a minute.

        Raises:
            TransportError: the device was closed.
        """
        self._send(lambda now: self.core.alert(key or text, text, now=now))

    @property
    def pending_alerts(self) -> int:
        """Alerts waiting for the alert group's roster or its members' keys."""
        with self._lock:
            return self.core.pending_alerts

    def _send(self, seal: Callable[[float], Output]) -> None:
        if self._closed:
            raise TransportError(f"device {self.name} was closed", reason="closed")

        def make() -> Output:
            now = self._clock()
            out = seal(now)
            out.extend(self.core.flush_alerts(now=now))
            return out

        self._emit(self._compute(make))


def next_backoff(
    nominal: float | None, low: float, high: float, draw: Callable[[], float] = random.random
) -> tuple[float, float]:
    """The next reconnect wait: (nominal delay, the wait drawn from it).

    The nominal delay starts at `low` and doubles up to `high`; the wait is drawn uniformly
    between half of it and all of it ("equal jitter").
    """
    step = low if nominal is None else min(nominal * 2, high)
    return step, step * (0.5 + draw() / 2)


class _JitteredClient(mqtt.Client):
    """paho's client with jitter on its exponential reconnect delays.

    paho (2.x) doubles ``_reconnect_delay`` from the minimum on every failed attempt and resets
    it to None once connected, with no jitter and no hook: before each wait this sets it to
    half the drawn wait, which paho then doubles. The nominal delay is kept apart.
    """

    _nominal: float | None = None

    def _reconnect_wait(self) -> None:
        with self._reconnect_delay_mutex:
            if self._reconnect_delay is None:  # connected since the last wait: start over
                self._nominal = None
            self._nominal, wait = next_backoff(
                self._nominal, self._reconnect_min_delay, self._reconnect_max_delay
            )
            self._reconnect_delay = wait / 2  # type: ignore[assignment]  # paho sleeps on floats
        super()._reconnect_wait()


def _parse_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of a broker URL.

    Raises:
        ConfigError: not an mqtt://, mqtts://, ws:// or wss:// URL with a host.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r} is not valid: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _PORTS or not parts.hostname:
        raise ConfigError(
            f"broker URL {url!r} must be mqtt://HOST[:PORT], mqtts://, ws:// or wss://"
        )
    return scheme, parts.hostname, port or _PORTS[scheme], parts.path
