"""The device's protocol core, sans-IO: what to subscribe to and publish, given what arrives.

`DeviceCore` owns the device's `DeviceSession` (rosters, key records, inbox) and its telemetry
key. The paho shell (`meshchat.device.sdk`) feeds it every message and publishes what it
returns; tests drive it without a network.

How telemetry finds its readers:

1. the device follows its own list of groups, which the directory service keeps retained on
   ``_s/dir/{device}/reply``; one of them is its dispatch group (named in its credentials), the
   others are channels it may post alerts in;
2. it follows each group's signed roster, and the key record of each member;
3. its readers are the devices of the dispatch group's members that are people. Device
   accounts (a member whose record lists one device, named like the member) are not readers:
   trackers in one dispatch group do not read each other. The same people may send it work
   orders;
4. each reader gets the current telemetry key in its inbox (a signed, sealed direct message),
   once; the geofence worker gets the fixes-only key on its share topic (retained). The
   worker's X25519 key comes from the credential file, or from the worker's reader
   certificate (retained on ``mc/{org}/_s/geofence``), which the device checks against its
   trust bundle (`meshchat.e2ee.telemetry.open_reader_cert`); a newer certificate with another
   key gets the current key at once;
5. when a reader leaves (a member removed, a device gone from a record) the device makes a new
   key and shares it with the readers that remain: a reader who left cannot read what follows.
   A new key is also made at every start and once a week.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import msgpack

from meshchat.device.alerts import DEFAULT_RULES, Alerter, AlertPost, AlertRule, NewAlert
from meshchat.device.credentials import DeviceCredentials
from meshchat.device.orders import OrderState, may_move, parse_order, state_inner
from meshchat.device.telemetry import (
    GEOFENCE_READER,
    GpsFix,
    Status,
    encode_gps,
    encode_status,
    geofence_share_topic,
    is_key_request,
    seal_key_share,
)
from meshchat.e2ee import (
    DeviceSession,
    Direct,
    Inner,
    KeyRecord,
    Kind,
    Outgoing,
    Refused,
    RosterError,
    Step,
)
from meshchat.e2ee.telemetry import TelemetrySealer, open_reader_cert
from meshchat.envelope import GroupMessage, decode
from meshchat.errors import E2EEError, EnvelopeError, OrderError, TopicError
from meshchat.rpc import PUSH_ID, Request, decode_reply
from meshchat.topics import (
    GroupTopic,
    InboxTopic,
    KeyTopic,
    PresenceTopic,
    RosterTopic,
    ServiceTopic,
    TelemetryTopic,
    parse_topic,
)

__all__ = [
    "OFFLINE",
    "ONLINE",
    "DeviceCore",
    "Output",
    "Publication",
    "WorkOrder",
]

logger = logging.getLogger(__name__)

ONLINE: Final = b"online"
OFFLINE: Final = b"offline"
"""Presence payloads, the same as people's clients publish (``_p/{device}``, retained)."""
DIRECTORY_SERVICE: Final = "dir"
ARCHIVE_SERVICE: Final = "archive"
MAX_KEPT_ORDERS: Final = 1000
MAX_PENDING_ALERTS: Final = 100
"""Alert posts kept while the alert group's roster or members' keys are not here yet."""
"""Finished orders remembered (so a redelivery is recognised); open ones are always kept."""
_STATE_VERSION: Final = 2
_STATE_VERSIONS: Final = frozenset({1, _STATE_VERSION})
MAX_INBOX_PAGES: Final = 50
"""Pages of the archived inbox a first run reads at most (64 KiB each)."""


@dataclass(frozen=True, slots=True)
class Publication:
    """Something to publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class WorkOrder:
    """A work order as the device keeps it.

    Attributes:
        order_id: the dispatcher's id for it.
        text: what to do.
        sender: the dispatcher (user) who sent it; answers go to all their devices.
        sender_device: the dispatcher's device it came from.
        ts: when it was sent (unix seconds, the sender's clock).
        state: `OrderState.RECEIVED` until the device answers.
        reason: the reason given with the last answer.
    """

    order_id: str
    text: str
    sender: str
    sender_device: str
    ts: int
    state: OrderState = OrderState.RECEIVED
    reason: str = ""


@dataclass(slots=True)
class Output:
    """What one input asks the shell to do."""

    publish: list[Publication] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    direct: list[Direct] = field(default_factory=list)
    orders: list[WorkOrder] = field(default_factory=list)
    state_changed: bool = False

    def extend(self, other: Output) -> None:
        """Append another output."""
        self.publish.extend(other.publish)
        self.subscribe.extend(other.subscribe)
        self.direct.extend(other.direct)
        self.orders.extend(other.orders)
        self.state_changed = self.state_changed or other.state_changed


def is_device_account(user: str, record: KeyRecord) -> bool:
    """Whether a key record is a device account's: one device, named like the account."""
    return len(record.devices) == 1 and record.devices[0].name == user


class DeviceCore:
    """One device's protocol state: session, groups, telemetry key and who holds it."""

    def __init__(
        self,
        credentials: DeviceCredentials,
        *,
        state: bytes | None = None,
        now: float,
        alert_rules: Iterable[AlertRule] = DEFAULT_RULES,
        alert_group: str | None = None,
    ) -> None:
        """Prepare the core; `start` makes the telemetry key.

        Args:
            credentials: the device's credentials.
            state: what `state` returned last run (rosters, key records, pins, groups).
            now: the current time (unix seconds).
            alert_rules: checked on every status; `DEFAULT_RULES` unless told otherwise.
            alert_group: where alerts go (``dept/name``; the device must be a member); default:
                its dispatch group.

        Raises:
            E2EEError: the saved state is corrupt or of another version.
        """
        self.credentials = credentials
        self.org = credentials.org
        self.device = credentials.device
        self.groups: set[str] = set()
        self.orders: dict[str, WorkOrder] = {}
        session_state: bytes | None = None
        self.inbox_synced = False
        """Whether the inbox the archiver kept was read once (a device's first run reads it)."""
        if state is not None:
            session_state, self.groups, self.orders, self.inbox_synced = _restore(state)
        if session_state is None:
            self.session = DeviceSession(
                trust=credentials.trust,
                user=self.device,
                device=self.device,
                signing=credentials.signing,
                box=credentials.box,
            )
        else:
            self.session = DeviceSession.from_bytes(
                session_state,
                trust=credentials.trust,
                signing=credentials.signing,
                box=credentials.box,
            )
        self.sealer = TelemetrySealer.new(now=now)
        self._shared: dict[str, bytes] = {}
        self._geofence_key_id: int | None = None
        self._geofence_box: bytes | None = credentials.geofence
        self._reader_issued = -1
        self._answered: dict[str, int] = {}
        self._groups_known = False
        self.alerter = Alerter(self.device, tuple(alert_rules))
        self.alert_group = alert_group or credentials.group
        self._pending_alerts: list[AlertPost] = []
        self._following: set[str] = set()
        self._inbox_request: bytes | None = None
        self._inbox_pages = 0

    # ------------------------------------------------------------------------------ topics

    @property
    def presence_topic(self) -> str:
        """The device's presence topic (its last will says offline there)."""
        return PresenceTopic(self.org, self.device).topic

    @property
    def inbox_topic(self) -> str:
        """The device's inbox: key distributions, direct messages, work orders."""
        return InboxTopic(self.org, self.device).topic

    @property
    def groups_topic(self) -> str:
        """Where the directory keeps the list of the device's groups (retained)."""
        return ServiceTopic(self.org, DIRECTORY_SERVICE, self.device, reply=True).topic

    @property
    def reader_topic(self) -> str:
        """Where the geofence worker keeps its signed reader certificate (retained)."""
        return ServiceTopic(self.org, GEOFENCE_READER).topic

    @property
    def geofence_reader(self) -> bytes | None:
        """The geofence worker's X25519 key the device shares its fixes-only key with."""
        return self._geofence_box

    def _group_topic(self, path: str) -> GroupTopic:
        dept, name = path.split("/", 1)
        return GroupTopic(self.org, dept, name)

    def subscriptions(self) -> list[str]:
        """Everything to subscribe to on a fresh session (QoS 1)."""
        topics = [self.inbox_topic, self.groups_topic, self.reader_topic]
        if not self.inbox_synced:
            topics.append(ServiceTopic(self.org, ARCHIVE_SERVICE, self.device, reply=True).topic)
        topics.extend(self._group_topic(path).roster.topic for path in sorted(self.groups))
        topics.extend(KeyTopic(self.org, user).topic for user in sorted(self._following))
        return topics

    # ------------------------------------------------------------------------- life cycle

    def start(self, *, now: float) -> Output:
        """What to do on the first connection: follow, and share the key with known readers."""
        self._following = self._members()
        out = Output(subscribe=self.subscriptions())
        out.extend(self._share(now=now))
        return out

    def state(self) -> bytes:
        """The state to keep between runs (it holds no telemetry key: a restart makes a new one)."""
        orders = [
            [o.order_id, o.text, o.sender, o.sender_device, o.ts, o.state.value, o.reason]
            for o in self.orders.values()
        ]
        packed: bytes = msgpack.packb(
            [
                _STATE_VERSION,
                self.session.to_bytes(),
                sorted(self.groups),
                orders,
                self.inbox_synced,
            ],
            use_bin_type=True,
        )
        return packed

    # ---------------------------------------------------------------------------- readers

    @property
    def dispatch_group(self) -> str:
        """The device's dispatch group (``dept/name``)."""
        return self.credentials.group

    def dispatchers(self) -> set[str]:
        """The people in the device's dispatch group: they read its telemetry, send it orders."""
        found = set()
        members = self._members([self.dispatch_group]) if self.dispatch_group in self.groups else ()
        for user in members:
            record = self.session.keys.record(user)
            if record is not None and not is_device_account(user, record):
                found.add(user)
        return found

    def _members(self, paths: Iterable[str] | None = None) -> set[str]:
        """Members of the device's groups (or of `paths`), the device itself left out."""
        members: set[str] = set()
        for path in self.groups if paths is None else paths:
            roster = self.session.rosters.current(self._group_topic(path).topic)
            if roster is not None:
                members.update(roster.members)
        members.discard(self.device)
        return members

    @property
    def reading_inbox(self) -> bool:
        """Whether a first run is reading the inbox the archiver kept (asked, not answered)."""
        return self._inbox_request is not None

    @property
    def synced(self) -> bool:
        """Whether the device knows its groups, their rosters and every member's key record.

        Until then a reader may not have the key yet; `Device` waits for this on start. On a
        first run it also waits for the inbox the archiver kept (work orders sent before).
        """
        if not self._groups_known or self._inbox_request is not None:
            return False  # (on a first run: the inbox the archiver kept is being read)
        if any(
            self.session.rosters.current(self._group_topic(path).topic) is None
            for path in self.groups
        ):
            return False
        return all(self.session.keys.record(user) is not None for user in self._members())

    def readers(self) -> dict[str, bytes]:
        """The devices that should hold the telemetry key now, with their X25519 keys."""
        readers: dict[str, bytes] = {}
        for user in sorted(self.dispatchers()):
            record = self.session.keys.record(user)
            if record is None:
                continue
            for keys in record.devices:
                readers[keys.name] = keys.box
        return readers

    @property
    def shared_with(self) -> list[str]:
        """The readers holding the current key, by device name."""
        return sorted(self._shared)

    def _share(self, *, now: float, rotate: bool = False) -> Output:
        """Share the key with new readers; rotate when one left (or when asked)."""
        out = Output()
        readers = self.readers()
        gone = [name for name, box in self._shared.items() if readers.get(name) != box]
        if gone or rotate or self.sealer.needs_rotation(now=now):
            if gone:
                logger.info("telemetry readers left (%s): new telemetry key", ", ".join(gone))
            self.sealer = TelemetrySealer.new(now=now)
            self._shared = {}
        if self._geofence_key_id != self.sealer.key.key_id:
            out.extend(self._share_geofence(now=now))
        for name, box in sorted(readers.items()):
            if self._shared.get(name) == box:
                continue
            payload = seal_key_share(
                self.sealer.key,
                device=self.device,
                signing=self.credentials.signing,
                recipient=name,
                recipient_box=box,
                ts=int(now),
            )
            out.publish.append(Publication(InboxTopic(self.org, name).topic, payload))
            self._shared[name] = box
        return out

    def _share_geofence(self, *, now: float) -> Output:
        out = Output()
        self._geofence_key_id = self.sealer.key.key_id
        if self._geofence_box is None:
            return out
        payload = seal_key_share(
            self.sealer.key.gps_only(),
            device=self.device,
            signing=self.credentials.signing,
            recipient=GEOFENCE_READER,
            recipient_box=self._geofence_box,
            ts=int(now),
        )
        out.publish.append(
            Publication(geofence_share_topic(self.org, self.device), payload, retain=True)
        )
        return out

    # ---------------------------------------------------------------------------- telemetry

    def status(self, status: Status, *, now: float) -> Output:
        """Seal a status report (retained: a new reader sees the last one at once).

        The alert rules are checked on it; alerts that fire go out after the report.
        """
        out = self._share(now=now) if self.sealer.needs_rotation(now=now) else Output()
        topic = TelemetryTopic(self.org, self.device, "status")
        payload = self.sealer.seal(topic, encode_status(status))
        out.publish.append(Publication(topic.topic, payload, retain=True))
        out.extend(self.alerts(self.alerter.on_status(status, now=now), now=now))
        return out

    def fix(self, fix: GpsFix, *, now: float, qos: int = 1) -> Output:
        """Seal a GPS fix."""
        out = self._share(now=now) if self.sealer.needs_rotation(now=now) else Output()
        topic = TelemetryTopic(self.org, self.device, "gps")
        payload = self.sealer.seal(topic, encode_gps(fix))
        out.publish.append(Publication(topic.topic, payload, qos=qos))
        return out

    # ----------------------------------------------------------------------------- inputs

    def on_message(self, topic: str, payload: bytes, *, now: float) -> Output:
        """Handle one message from the broker."""
        try:
            parsed = parse_topic(topic)
        except TopicError:
            parsed = None
        out = Output()
        match parsed:
            case ServiceTopic(service=service, requester=None) if service == GEOFENCE_READER:
                out = self._on_reader_cert(payload, now=now)
            case ServiceTopic(service=service, reply=True) if service == ARCHIVE_SERVICE:
                out = self._on_inbox_page(payload, now=now)
            case ServiceTopic(reply=True):
                out = self._on_groups(payload, now=now)
                out.extend(self._sync_inbox())
            case RosterTopic() if payload:
                step = self.session.on_roster(parsed.group_topic.topic, payload)
                out = self._step(step, now=now)
                out.extend(self._follow_members())
                out.extend(self._share(now=now))
                out.extend(self.alerts([], now=now))
                out.extend(self._sync_inbox())
            case KeyTopic(user=user) if payload:
                out = self._step(self.session.on_key_record(user, payload), now=now)
                out.extend(self._share(now=now))
                out.extend(self.alerts([], now=now))
                out.extend(self._sync_inbox())
            case InboxTopic():
                out = self._step(self.session.on_inbox(payload), now=now)
        return out

    # ------------------------------------------------------------------- first-run inbox

    def _sync_inbox(self, cursor: object = None) -> Output:
        """On a device's first run, ask the archiver for what reached its inbox before.

        Until a device first connects, the broker holds no session for it and drops what is
        sent to its inbox (a work order to a van still in its box); the archiver keeps every
        inbox. The request waits until the device knows its dispatchers (their rosters and
        key records), since orders are taken from them only.
        """
        if self.inbox_synced or (self._inbox_request is not None and cursor is None):
            return Output()
        if not self.dispatchers():
            return Output()
        request = Request("inbox", (self.device, None, cursor))
        self._inbox_request = request.id
        topic = ServiceTopic(self.org, ARCHIVE_SERVICE, self.device).topic
        return Output(publish=[Publication(topic, request.encode())])

    def _on_inbox_page(self, payload: bytes, *, now: float) -> Output:
        try:
            reply = decode_reply(payload)
        except EnvelopeError as exc:
            logger.warning("ignored a malformed archive reply: %s", exc)
            return Output()
        if self._inbox_request is None or reply.id != self._inbox_request:
            return Output()
        out = Output()
        cursor: object = None
        match reply.value if reply.ok else None:
            case [list(items), next_cursor]:
                for item in items:
                    envelope = item[-1] if isinstance(item, list) and item else None
                    if isinstance(envelope, bytes):
                        out.extend(self._step(self.session.on_inbox(envelope), now=now))
                cursor = next_cursor
            case _:
                logger.warning(
                    "%s: no inbox history from the archiver: %s", self.device, reply.value
                )
        self._inbox_pages += 1
        if cursor is not None and self._inbox_pages < MAX_INBOX_PAGES:
            out.extend(self._sync_inbox(cursor))
            return out
        self.inbox_synced = True
        self._inbox_request = None
        out.state_changed = True
        return out

    def _on_reader_cert(self, payload: bytes, *, now: float) -> Output:
        """The geofence worker's reader certificate: share the key with a new reader key."""
        if not payload:
            return Output()
        try:
            cert = open_reader_cert(payload, self.credentials.trust)
        except (E2EEError, EnvelopeError) as exc:
            logger.warning("ignored a geofence reader certificate: %s", exc)
            return Output()
        if cert.issued_at <= self._reader_issued:
            return Output()  # a redelivery, or an older certificate replayed
        self._reader_issued = cert.issued_at
        if self._geofence_box == cert.public:
            return Output()
        logger.info("%s: the geofence worker has a new reader key", self.device)
        self._geofence_box = cert.public
        self._geofence_key_id = None  # the current key goes to the new reader key now
        return self._share(now=now)

    def _on_groups(self, payload: bytes, *, now: float) -> Output:
        try:
            reply = decode_reply(payload)
        except EnvelopeError as exc:
            logger.warning("ignored a malformed group list: %s", exc)
            return Output()
        if reply.id != PUSH_ID or not reply.ok or not isinstance(reply.value, list):
            return Output()
        fresh = {str(path) for path in reply.value if isinstance(path, str) and "/" in path}
        self._groups_known = True
        if fresh == self.groups:
            return Output()
        added = sorted(fresh - self.groups)
        self.groups = fresh
        out = Output(state_changed=True)
        out.subscribe.extend(self._group_topic(path).roster.topic for path in added)
        out.extend(self._share(now=now))  # a group left may take readers with it
        return out

    def _follow_members(self) -> Output:
        out = Output()
        for user in sorted(self._members() - self._following):
            self._following.add(user)
            out.subscribe.append(KeyTopic(self.org, user).topic)
        return out

    def _step(self, step: Step, *, now: float) -> Output:
        out = Output(state_changed=True)
        for event in step.events:
            match event:
                case Direct() if is_key_request(event.inner):
                    out.extend(self._answer_key_request(event, now=now))
                case Direct() if event.inner.kind is Kind.WORKORDER:
                    out.orders.extend(self._take_order(event))
                case Direct():
                    out.direct.append(event)
                case Refused():
                    logger.warning("refused %s: %s", event.what, event.reason)
        out.publish.extend(_publication(item) for item in step.outgoing)
        return out

    def _answer_key_request(self, event: Direct, *, now: float) -> Output:
        """Send the current key again to a reader who asks (once per key and reader)."""
        out = Output()
        box = self.readers().get(event.device)
        if box is None:
            logger.info("ignored a telemetry key request from %s: not a reader", event.device)
            return out
        key_id = self.sealer.key.key_id
        if self._answered.get(event.device) == key_id:
            return out
        self._answered[event.device] = key_id
        payload = seal_key_share(
            self.sealer.key,
            device=self.device,
            signing=self.credentials.signing,
            recipient=event.device,
            recipient_box=box,
            ts=int(now),
        )
        out.publish.append(Publication(InboxTopic(self.org, event.device).topic, payload))
        self._shared[event.device] = box
        return out

    # ----------------------------------------------------------------------------- alerts

    def alert(self, key: str, text: str, *, now: float) -> Output:
        """An alert the application raises (deduplicated under `key`, rate-limited)."""
        return self.alerts(self.alerter.occurred(key, text, now=now), now=now)

    def flush_alerts(self, *, now: float, force: bool = False) -> Output:
        """Counts of repeated alerts whose edit is due (every count with `force`)."""
        return self.alerts(self.alerter.flush(now=now, force=force), now=now)

    def alerts(self, posts: list[AlertPost], *, now: float) -> Output:
        """Post alerts into the alert group, or keep them until the device may post there."""
        self._pending_alerts.extend(posts)
        del self._pending_alerts[:-MAX_PENDING_ALERTS]
        out = Output()
        if not self._pending_alerts or self._why_not_alert(now=now) is not None:
            return out
        topic = self._group_topic(self.alert_group).topic
        pending, self._pending_alerts = self._pending_alerts, []
        for post in pending:
            if isinstance(post, NewAlert):
                inner = Inner(Kind.TEXT, int(now), (post.text,))
            else:
                inner = Inner(Kind.EDIT, int(now), (post.text, post.message_id))
            try:
                outgoing = self.session.encrypt(topic, inner, now=now)
            except RosterError as exc:
                logger.warning("could not post an alert in %s: %s", self.alert_group, exc)
                continue
            out.publish.extend(_publication(item) for item in outgoing)
            message = decode(outgoing[-1].payload)
            if isinstance(post, NewAlert) and isinstance(message, GroupMessage):
                self.alerter.posted(post.key, (message.chain_id, message.index))
        out.state_changed = True
        return out

    def _why_not_alert(self, *, now: float) -> str | None:
        """None when alerts may go out now, else why they wait."""
        topic = self._group_topic(self.alert_group).topic
        why = self.session.may_send(topic, now=now)
        if why is not None:
            return why
        roster = self.session.rosters.current(topic)
        assert roster is not None
        missing = [
            m for m in roster.members if m != self.device and self.session.keys.record(m) is None
        ]
        return f"waiting for the key records of {', '.join(missing)}" if missing else None

    @property
    def pending_alerts(self) -> int:
        """Alert posts waiting for the alert group's roster or its members' keys."""
        return len(self._pending_alerts)

    # ----------------------------------------------------------------------------- orders

    def _take_order(self, event: Direct) -> list[WorkOrder]:
        """A work order arrived: keep it once, from a dispatcher only."""
        try:
            order_id, text = parse_order(event.inner)
        except EnvelopeError as exc:
            logger.warning("refused a work order from %s: %s", event.sender, exc)
            return []
        if event.sender not in self.dispatchers():
            logger.warning(
                "refused work order %s from %s: not in %s's dispatch group",
                order_id,
                event.sender,
                self.device,
            )
            return []
        if order_id in self.orders:
            return []  # a redelivery, or a copy: the device has it already
        order = WorkOrder(order_id, text, event.sender, event.device, event.inner.ts)
        self.orders[order_id] = order
        self._forget_old_orders()
        return [order]

    def _forget_old_orders(self) -> None:
        finished = [o.order_id for o in self.orders.values() if o.state.final]
        for order_id in finished[: max(0, len(self.orders) - MAX_KEPT_ORDERS)]:
            del self.orders[order_id]

    def open_orders(self) -> list[WorkOrder]:
        """Orders not done or rejected, oldest first."""
        return sorted((o for o in self.orders.values() if not o.state.final), key=lambda o: o.ts)

    def answer(self, order_id: str, state: OrderState, reason: str = "", *, now: float) -> Output:
        """Answer a work order: accepted, done, or rejected (with a reason).

        Raises:
            OrderError: no such order here, it cannot move to `state` (it is done, say), or a
                rejection without a reason.
        """
        order = self.orders.get(order_id)
        if order is None:
            raise OrderError(f"{self.device} has no work order {order_id!r}")
        if not may_move(order.state, state):
            raise OrderError(f"work order {order_id} is {order.state}; it cannot become {state}")
        if state is OrderState.REJECTED and not reason.strip():
            raise OrderError("a rejection needs a reason")
        try:
            inner = state_inner(order_id, state, reason, ts=int(now))
            outgoing = self.session.seal_direct(order.sender, inner)
        except (E2EEError, EnvelopeError) as exc:
            raise OrderError(f"cannot answer work order {order_id}: {exc}") from exc
        self.orders[order_id] = dataclasses.replace(order, state=state, reason=reason)
        out = Output(state_changed=True)
        out.publish.extend(_publication(item) for item in outgoing)
        return out


def _publication(item: Outgoing) -> Publication:
    return Publication(item.topic, item.payload, retain=item.retain)


def _restore(state: bytes) -> tuple[bytes, set[str], dict[str, WorkOrder], bool]:
    try:
        version, session, groups, orders, *rest = msgpack.unpackb(state, raw=False, max_map_len=0)
        if version not in _STATE_VERSIONS or not isinstance(session, bytes):
            raise E2EEError("the device's saved state is from another version of meshchat")
        # Version 1 was saved by devices that had connected: their sessions hold their inbox.
        synced = bool(rest[0]) if version == _STATE_VERSION else True
        kept = {
            str(o[0]): WorkOrder(
                str(o[0]), str(o[1]), str(o[2]), str(o[3]), int(o[4]), OrderState(o[5]), str(o[6])
            )
            for o in orders
        }
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise E2EEError(f"the device's saved state is corrupt: {exc}") from exc
    return session, {str(g) for g in groups}, kept, synced
