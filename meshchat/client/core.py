"""The E2EE client: a device profile's messaging over a transport that comes and goes.

`Client` is an async context manager. It connects as the profile's device (persistent session,
QoS 1, presence by last will), follows the rosters and key records of its groups, feeds all that
arrives to the device's `DeviceSession`, keeps what it decrypts in the `ClientStore`, and sends
through a durable outbox:

1. `send` stores the message (plaintext, on this machine only) and returns at once;
2. when the group's roster and its members' key records are there, the message is sealed
   (encrypted, with the chain distributions it needs) and the session state saved in the same
   transaction as the outbox row;
3. the sealed envelopes are published; once the broker acknowledged all of them, the row goes.

A crash at any point leaves the message queued or sealed; the next run seals or republishes it,
and receivers drop an identical redelivery. Events (`events()`) report decrypted messages,
messages that cannot be read and why, alarms and link changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Final, Self

from meshchat.client.dispatch import DISPATCH_FILE, DispatchLedger, LedgerOrder
from meshchat.client.events import (
    AckStatus,
    Alarm,
    ClientEvent,
    GroupsChanged,
    HistoryPage,
    LinkChanged,
    Mention,
    Message,
    OrderChanged,
    PresenceChanged,
    SiteNotice,
    Unreadable,
)
from meshchat.client.fleet import Fleet
from meshchat.client.presence import PresenceTracker, Seen
from meshchat.client.profile import LOCK_FILE, DeviceProfile
from meshchat.client.store import ClientStore, StoredMessage
from meshchat.client.transport import Transport
from meshchat.client.values import Backoff, Publication, StateChange, TransportState
from meshchat.datadir import exclusive_lock
from meshchat.device.orders import OrderState, new_order_id, order_inner, state_inner
from meshchat.device.telemetry import seal_key_request
from meshchat.e2ee import (
    Decrypted,
    DeviceSession,
    Direct,
    Inner,
    Kind,
    PairKind,
    Refused,
    ReplayAlarm,
    Roster,
    Step,
    Undecryptable,
    Waiting,
    encode_inner,
    seal_pairwise,
)
from meshchat.e2ee.notice import NoticeError, verify_notice
from meshchat.e2ee.plaintext import decode_inner
from meshchat.envelope import GroupMessage, Signed, decode, encode
from meshchat.errors import (
    E2EEError,
    EnvelopeError,
    MeshchatError,
    NotFoundError,
    OrderError,
    PermissionDeniedError,
    TopicError,
)
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
    "RECALL_WINDOW",
    "AckStatus",
    "Alarm",
    "Client",
    "ClientEvent",
    "GroupsChanged",
    "HistoryPage",
    "LinkChanged",
    "Mention",
    "Message",
    "OrderChanged",
    "PresenceChanged",
    "SiteNotice",
    "Unreadable",
]

logger = logging.getLogger(__name__)

SESSION_KEY: Final = "session"
GROUPS_KEY: Final = "groups"
INBOX_SYNCED_KEY: Final = "inbox-synced"
ONLINE: Final = b"online"
OFFLINE: Final = b"offline"
READY_TIMEOUT: Final = 3.0
"""Seconds to wait for members' key records before sealing anyway (they get it later)."""
HANDOFF_POLL: Final = 0.2
"""Seconds between looks for messages other processes queued in this profile's outbox."""
MAX_EVENTS: Final = 10_000
RECALL_WINDOW: Final = 2 * 3600
"""Seconds during which a sender may recall a message, by default."""
RECEIPT_INTERVAL: Final = 2.0
MAX_RECEIPT_REFS: Final = 1000
HISTORY_PAGE: Final = 200
MEMBERSHIP_TIMEOUT: Final = 10.0
"""Seconds to wait for the directory to answer a join or a leave."""
MAX_HISTORY_PAGES: Final = 50
DELIVERED, READ = 0, 1
_MENTION: Final = re.compile(r"(?<![\w@])@([a-z0-9][a-z0-9-]{0,31})\b", re.IGNORECASE)


def check_may_send(session: DeviceSession, topic: str, *, now: float) -> None:
    """Refuse a message the group's current roster forbids (not a member, announcements).

    A missing or expired roster does not refuse: the message waits for a fresh one.

    Raises:
        PermissionDeniedError: the current roster says this user may not post.
    """
    roster = session.rosters.current(topic)
    why_not = session.may_send(topic, now=now)
    if roster is not None and why_not is not None and now < roster.expires_at:
        raise PermissionDeniedError(
            f"cannot send: {why_not}", actor=session.user, permission="group.post"
        )


def group_topic(org: str, groups: Iterable[str], user: str, group: str) -> str:
    """The topic of `group` (``dept/name``) if `user` follows it.

    Raises:
        NotFoundError: the user is not in that group.
    """
    known = sorted(groups)
    if group not in known:
        raise NotFoundError(f"{user} is not in {group} (groups: {', '.join(known) or 'none'})")
    dept, name = group.split("/", 1)
    return GroupTopic(org, dept, name).topic


def saved_groups(store: ClientStore) -> list[str]:
    """The groups a profile followed when its client last heard from the directory."""
    raw = store.get(GROUPS_KEY)
    return [] if not raw else [g for g in raw.decode("utf-8").split("\n") if g]


def _group_path(topic: str) -> str:
    parsed = parse_topic(topic)
    assert isinstance(parsed, GroupTopic)
    return parsed.path


class Client:
    """Messaging for one device profile; an async context manager."""

    def __init__(
        self,
        profile: DeviceProfile,
        *,
        broker: str | None = None,
        clock: Callable[[], float] = time.time,
        backoff: Backoff | None = None,
        ready_timeout: float = READY_TIMEOUT,
        recall_window: int = RECALL_WINDOW,
        send_receipts: bool = True,
        receipt_interval: float = RECEIPT_INTERVAL,
    ) -> None:
        """Prepare the client; nothing connects until it is entered.

        Args:
            profile: the device profile.
            broker: another broker URL than the profile's.
            clock: the time source.
            backoff: delays between connection attempts.
            ready_timeout: seconds to wait for members' key records before sealing anyway.
            recall_window: seconds after sending during which a sender may recall a message
                (recalls arriving later are ignored).
            send_receipts: send "delivered" receipts for messages read here (batched).
            receipt_interval: seconds a batch of receipts collects before it goes out.

        One process at a time uses a profile: the client holds the profile's lock from here
        until it exits. Short-lived commands that find it held hand their messages to the
        running client through the store's outbox instead (`meshchat.client.handoff`).

        Raises:
            BusyError: another process (or another `Client`) uses this profile now.
            ConfigError: the profile is damaged or its store unusable.
        """
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(
            exclusive_lock(profile.path / LOCK_FILE, f"device profile {profile.user!r}")
        )
        try:
            self._prepare(profile, broker, clock, backoff, ready_timeout)
        except BaseException:
            self._lock.close()
            raise
        self.recall_window = recall_window
        self.send_receipts = send_receipts
        self.receipt_interval = receipt_interval

    def _prepare(
        self,
        profile: DeviceProfile,
        broker: str | None,
        clock: Callable[[], float],
        backoff: Backoff | None,
        ready_timeout: float,
    ) -> None:
        self.profile = profile
        self.org = profile.org
        self._clock = clock
        self._receipt_batches: dict[str, list[tuple[int, int]]] | None = {}
        self._receipts_due = asyncio.Event()
        self._ready_timeout = ready_timeout
        self.store = ClientStore(profile.store_path, clock=clock)
        trust = profile.trust()
        self.trust = trust
        signing, box = profile.signing(), profile.box()
        saved = self.store.get(SESSION_KEY)
        if saved is None:
            self.session = DeviceSession(
                trust=trust, user=profile.user, device=profile.device, signing=signing, box=box
            )
        else:
            self.session = DeviceSession.from_bytes(saved, trust=trust, signing=signing, box=box)
        presence = PresenceTopic(self.org, profile.device).topic
        self.transport = Transport(
            broker or profile.broker,
            client_id=profile.device,
            username=profile.user,
            password=profile.token(),
            clean_session=False,
            will=Publication(presence, OFFLINE, retain=True),
            birth=Publication(presence, ONLINE, retain=True),
            backoff=backoff,
        )
        self._events: asyncio.Queue[ClientEvent] = asyncio.Queue(MAX_EVENTS)
        self._outbox_changed = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._sent = asyncio.Event()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._waiting: dict[str, str] = {}
        self._kept = 0
        self._roster_changed = asyncio.Event()
        self._replies: dict[bytes, asyncio.Future[object]] = {}
        self._groups: set[str] = set(self._saved_groups())
        self._records_changed = asyncio.Event()
        self.fleet = Fleet(self.store, ask=self._ask_telemetry_key)
        """Telemetry and presence of the devices this client reads (`watch_devices`)."""
        self.dispatch = DispatchLedger(profile.path / DISPATCH_FILE)
        """Work orders sent from (and to) this device, and their answers."""
        self._orders_changed = asyncio.Event()
        self.presence = PresenceTracker(self.store, clock=clock)
        """Presence of the people whose devices this client watches (`watch_presence`)."""
        self._presence_watched: set[str] = set()

    # ------------------------------------------------------------------------------ life

    @property
    def state(self) -> TransportState:
        """The link's state."""
        return self.transport.state

    @property
    def queued(self) -> int:
        """Messages the user sent that the broker has not acknowledged yet."""
        return self.store.queued

    @property
    def groups(self) -> list[str]:
        """The groups (``dept/name``) this client follows."""
        return sorted(self._groups)

    async def __aenter__(self) -> Self:
        """Connect (or keep trying in the background) and start following the groups.

        Raises:
            AuthenticationError: the broker refused the device's token (revoked?).
        """
        try:
            await self.transport.__aenter__()
        except BaseException:
            self.store.close()
            self._lock.close()
            raise
        self._start(self._consume(), "consume")
        self._start(self._watch_store(), "handoff")
        self._start(self._watch_link(), "link")
        self._start(self._send_loop(), "send")
        self._start(self._receipt_loop(), "receipts")
        # Subscribing waits for the broker; offline, the client still works from its store.
        subscribing = self._start(self._subscribe_all(), "subscribe")
        if self.transport.state is TransportState.CONNECTED:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10.0):
                    await asyncio.shield(subscribing)
        return self

    def _start(self, work: Coroutine[object, object, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=f"meshchat[client].{name}")
        task.add_done_callback(_log_failure)
        self._background.append(task)
        return task

    async def __aexit__(self, *exc_info: object) -> None:
        """Send what can be sent briefly, save the state and disconnect."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self.flush()
        tasks = [*self._background, *self._inflight.values()]
        self._background.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._save_session()
        await self.transport.__aexit__(None, None, None)
        self.store.close()
        self.dispatch.close()
        self._lock.close()

    async def _watch_store(self) -> None:
        """Send what other processes queued in this profile's outbox (`meshchat send` hands off).

        SQLite's ``data_version`` changes only when another connection commits, so this costs
        one pragma per tick while nothing happens.
        """
        seen = self.store.data_version()
        while True:
            await asyncio.sleep(HANDOFF_POLL)
            version = self.store.data_version()
            if version != seen:
                seen = version
                self._outbox_changed.set()
                self._emit(LinkChanged(self.state, self.queued))

    def _saved_groups(self) -> list[str]:
        return saved_groups(self.store)

    def _save_groups(self) -> None:
        self.store.put(GROUPS_KEY, "\n".join(sorted(self._groups)).encode("utf-8"))

    def _save_session(self) -> None:
        self.store.put(SESSION_KEY, self.session.to_bytes())

    async def _subscribe_all(self) -> None:
        org = self.org
        await self.transport.subscribe(f"mc/{org}/_k/+")
        await self.transport.subscribe(InboxTopic(org, self.profile.device).topic)
        await self.transport.subscribe(
            ServiceTopic(org, "dir", self.profile.user, reply=True).topic
        )
        for path in sorted(self._groups):
            await self._follow(path)
        await self._refresh_groups()
        if self.store.get(INBOX_SYNCED_KEY) is None:
            await self._sync_inbox()

    async def _sync_inbox(self) -> None:
        """Once, on a new device: read what reached its inbox before its session existed.

        Senders share their chains with a new device as soon as its key record appears, which
        can be a moment before the device's persistent session subscribes to its inbox; the
        archiver keeps inboxes, so nothing sent in that moment is lost.
        """
        cursor: object = None
        try:
            for _ in range(MAX_HISTORY_PAGES):
                async with asyncio.timeout(10.0):
                    value = await self.request(
                        "archive", Request("inbox", (self.profile.device, None, cursor))
                    )
                match value:
                    case [list(items), next_cursor]:
                        pass
                    case _:
                        return
                for item in items:
                    payload = item[-1] if isinstance(item, list) and item else None
                    if isinstance(payload, bytes):
                        self._apply(self.session.on_inbox(payload))
                cursor = next_cursor
                if cursor is None:
                    break
        except (MeshchatError, TimeoutError) as exc:
            logger.info("no inbox history from the archiver (%s); relying on the session", exc)
            return
        self.store.put(INBOX_SYNCED_KEY, b"1")

    async def _subscribe_group(self, path: str) -> None:
        dept, name = path.split("/", 1)
        topic = GroupTopic(self.org, dept, name)
        await self.transport.subscribe(topic.roster.topic)
        await self.transport.subscribe(topic.topic)

    async def _refresh_groups(self) -> None:
        """Ask the directory which groups this user is in, and follow new ones."""
        with contextlib.suppress(MeshchatError, TimeoutError):
            async with asyncio.timeout(10.0):
                value = await self.request("dir", Request("groups"))
            if isinstance(value, list):
                await self._set_groups({str(g) for g in value})

    async def _set_groups(self, fresh: set[str]) -> None:
        """Follow the groups the directory says this user is in now."""
        added = sorted(fresh - self._groups)
        changed = fresh != self._groups
        self._groups = fresh
        self._save_groups()
        try:
            for path in added:
                await self._follow(path)
        finally:
            # Said once the new groups are subscribed: whoever reacts by sending into one
            # (or by asking who is there) does not race this device's subscription.
            if changed:
                self._emit(GroupsChanged(tuple(sorted(fresh))))

    async def _follow(self, path: str) -> None:
        """Subscribe to a group and its roster.

        The broker may learn of a new membership a moment after the directory told us, so a
        refusal is retried briefly.
        """
        for delay in (0.2, 0.5, 1.0, 2.0, 4.0, None):
            try:
                await self._subscribe_group(path)
            except PermissionDeniedError:
                if delay is None or path not in self._groups:
                    raise
                await asyncio.sleep(delay)
            else:
                return

    async def watch_devices(self, devices: Iterable[str]) -> None:
        """Follow devices' presence and telemetry in `fleet` (persistent: once is enough).

        Raises:
            PermissionDeniedError: the broker refuses a device's telemetry topics (only its
                department and admins may read them; only its dispatch groups can decrypt).
        """
        for device in devices:
            await self.transport.subscribe(PresenceTopic(self.org, device).topic)
            for kind in ("status", "gps"):
                await self.transport.subscribe(TelemetryTopic(self.org, device, kind).topic)

    async def watch_presence(self, users: Iterable[str]) -> None:
        """Follow the presence of these people's devices in `presence` (read-only).

        Only the devices their key records list now are followed (presence is public within
        the org); `PresenceChanged` events report changes.
        """
        for device in self.session.keys.devices_of(users):
            if device.name not in self._presence_watched:
                await self.transport.subscribe(PresenceTopic(self.org, device.name).topic)
                self._presence_watched.add(device.name)

    def presence_of(self, user: str) -> Seen:
        """What this client knows of a person's presence (see `watch_presence`)."""
        record = self.session.keys.record(user)
        devices = [d.name for d in record.devices] if record is not None else []
        return self.presence.of(user, devices)

    async def join(self, group: str) -> list[str]:
        """Ask the directory to add this user to a group; returns the user's groups now.

        The directory decides with the same right as ``meshchat group add`` (admins, and
        managers of the group's department), re-signs the roster and audits the change.

        Raises:
            MeshchatError: the directory refused (its reason names the missing permission)
                or did not answer in time.
        """
        return await self._membership("join", group)

    async def leave(self, group: str) -> list[str]:
        """Ask the directory to take this user out of a group; returns the user's groups now.

        Anyone may leave a group, except a site channel (the geofence keeps those). The
        group's keys rotate before its next message.

        Raises:
            MeshchatError: the directory refused or did not answer in time.
        """
        return await self._membership("leave", group)

    async def _membership(self, op: str, group: str) -> list[str]:
        try:
            async with asyncio.timeout(MEMBERSHIP_TIMEOUT):
                value = await self.request("dir", Request(op, (group,)))
        except TimeoutError as exc:
            raise MeshchatError(
                f"the directory did not answer within {MEMBERSHIP_TIMEOUT:g} s; try again"
            ) from exc
        if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
            raise MeshchatError("the directory's reply is malformed")
        await self._set_groups({str(g) for g in value})
        return self.groups

    async def fetch_history(
        self,
        group: str,
        *,
        since: float | None = None,
        until: float | None = None,
        max_pages: int = MAX_HISTORY_PAGES,
    ) -> int:
        """Fetch a group's older messages from the archiver and keep what this device can read.

        Messages whose keys this device lacks (sent before it existed, or while its session
        was lost) wait while their senders are asked for the keys, and are read when the keys
        come; `Unreadable` events explain the ones withheld. Bound the wait with a timeout.

        Returns:
            How many messages were new here.

        Raises:
            NotFoundError: the user is not in that group.
            MeshchatError: the archiver refused (its message says why).
        """
        self._topic(group)
        before = self._kept
        cursor: object = None
        for _ in range(max_pages):
            page = await self.fetch_history_page(group, since=since, until=until, cursor=cursor)
            cursor = page.cursor
            if cursor is None:
                break
        return self._kept - before

    async def fetch_history_page(
        self,
        group: str,
        *,
        since: float | None = None,
        until: float | None = None,
        cursor: object = None,
        limit: int = HISTORY_PAGE,
        newest_first: bool = False,
    ) -> HistoryPage:
        """Fetch one page of a group's history from the archiver (see `fetch_history`).

        Args:
            group: the group (``dept/name``).
            since: only envelopes the archiver received at or after this (unix seconds).
            until: only envelopes it received before this.
            cursor: the previous page's `HistoryPage.cursor` (None: the first page).
            limit: envelopes in the page at most (the archiver may send fewer).
            newest_first: page backwards in time (scrollback); each page is still read oldest
                first, so every chain is read forwards.

        Raises:
            NotFoundError: the user is not in that group.
            MeshchatError: the archiver refused (its message says why).
        """
        topic = self._topic(group)
        before = self._kept
        args = (group, since, until, cursor, limit, newest_first)
        value = await self.request("archive", Request("history", args))
        match value:
            case [list(items), next_cursor]:
                pass
            case _:
                raise MeshchatError("the archiver's history reply is malformed")
        unseen = 0
        for item in reversed(items) if newest_first else items:
            match item:
                case [*_, int(chain_id), int(index), _, bytes(payload)]:
                    unseen += not self.store.has_message(topic, (chain_id, index))
                    self._apply(self.session.on_group_message(topic, payload, history=True))
        return HistoryPage(len(items), unseen, self._kept - before, next_cursor)

    def _ask_telemetry_key(self, device: str, key_id: int) -> None:
        """Ask a device for a telemetry key this client never got (signed, sealed to it)."""
        owner = self.session.keys.owner(device)
        if owner is None:
            return  # its key record is not here yet; the next report asks again
        payload = seal_key_request(
            key_id,
            sender=self.profile.device,
            signing=self.session.signing,
            device=device,
            device_box=owner[1].box,
            ts=self._now(),
        )
        self.transport.publish_nowait(InboxTopic(self.org, device).topic, payload)

    # ---------------------------------------------------------------------- work orders

    async def send_order(self, device: str, text: str) -> LedgerOrder:
        """Send a work order to one device (a device account's, or a person's); returns it.

        It is sealed to that device and signed by this one, queued in the outbox (it goes out
        when the link allows) and kept in `dispatch`, where its answers land.

        Raises:
            NotFoundError: no key record lists that device (after waiting `ready_timeout`).
            EnvelopeError: the text is empty or too long.
        """
        owner = self.session.keys.owner(device)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._ready_timeout):
                while owner is None:
                    self._records_changed.clear()
                    await self._records_changed.wait()
                    owner = self.session.keys.owner(device)
        if owner is None:
            raise NotFoundError(f"no device {device!r} is known (no key record lists it)")
        user, keys = owner
        order_id = new_order_id()
        inner = order_inner(order_id, text, ts=self._now())
        sealed = seal_pairwise(
            sender=self.profile.device,
            sender_key=self.session.signing,
            recipient=device,
            recipient_box=keys.box,
            kind=PairKind.DIRECT,
            fields=(encode_inner(inner),),
        )
        topic = InboxTopic(self.org, device).topic
        self.store.enqueue_sealed(topic, encode_inner(inner), [(topic, encode(sealed))])
        order = self.dispatch.add_sent(order_id, device=device, user=user, text=text, ts=inner.ts)
        self._outbox_changed.set()
        self._orders_changed.set()
        self._emit(OrderChanged(order))
        return order

    async def answer_order(self, order_id: str, state: OrderState, reason: str = "") -> LedgerOrder:
        """Answer a work order sent to this user (accepted, done, rejected with a reason).

        Raises:
            OrderError: no such order sent to this user, it cannot move there, or a rejection
                without a reason.
        """
        order = self.dispatch.order(order_id)
        if order is None or order.direction != "in":
            raise OrderError(f"no work order {order_id!r} was sent to {self.profile.user} here")
        if state is OrderState.REJECTED and not reason.strip():
            raise OrderError("a rejection needs a reason")
        moved = self.dispatch.move(order_id, state, reason, self._now())
        if moved is None:
            raise OrderError(f"work order {order_id} is {order.state}; it cannot become {state}")
        self._emit(OrderChanged(moved))
        inner = state_inner(order_id, state, reason, ts=self._now())
        try:
            outgoing = self.session.seal_direct(order.user, inner)
        except E2EEError as exc:
            raise OrderError(f"cannot answer {order_id}: {exc}") from exc
        topic = InboxTopic(self.org, order.device).topic
        pairs = [(item.topic, item.payload) for item in outgoing]
        self.store.enqueue_sealed(topic, encode_inner(inner), pairs)
        self._outbox_changed.set()
        self._orders_changed.set()
        return moved

    async def wait_order(self, order_id: str, check: Callable[[LedgerOrder], bool]) -> LedgerOrder:
        """Wait until the order satisfies `check` (bound it with `asyncio.timeout`)."""
        while True:
            order = self.dispatch.order(order_id)
            if order is not None and check(order):
                return order
            self._orders_changed.clear()
            await self._orders_changed.wait()

    async def request(self, service: str, request: Request) -> object:
        """Ask a service and wait for its reply (bound the wait with `asyncio.timeout`).

        Raises:
            MeshchatError: the service refused (its message).
        """
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._replies[request.id] = future
        try:
            if service != "dir":
                await self.transport.subscribe(
                    ServiceTopic(self.org, service, self.profile.user, reply=True).topic
                )
            await self.transport.publish(
                ServiceTopic(self.org, service, self.profile.user).topic, request.encode()
            )
            return await future
        finally:
            self._replies.pop(request.id, None)

    # ---------------------------------------------------------------------------- events

    async def events(self) -> AsyncIterator[ClientEvent]:
        """Decrypted messages, unreadable ones, alarms and link changes, as they happen."""
        while True:
            yield await self._events.get()

    def _emit(self, event: ClientEvent) -> None:
        if self._events.full():
            self._events.get_nowait()  # nobody is listening: drop the oldest
        self._events.put_nowait(event)

    async def _watch_link(self) -> None:
        change: StateChange
        async for change in self.transport.state_changes():
            self._emit(LinkChanged(change.state, self.queued, change.reason))
            if change.state is TransportState.CONNECTED:
                self._outbox_changed.set()

    # --------------------------------------------------------------------------- receiving

    async def _consume(self) -> None:
        async for message in self.transport.messages():
            try:
                self._dispatch(message.topic, message.payload)
            except (MeshchatError, sqlite3.Error) as exc:
                # Never stop reading: one bad message, or a store that another process holds
                # locked for too long, must not silence the client.
                logger.warning("could not handle a message on %s: %s", message.topic, exc)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            parsed = parse_topic(topic)
        except TopicError:
            return
        match parsed:
            case RosterTopic():
                if payload:
                    self._apply(self.session.on_roster(parsed.group_topic.topic, payload))
                    self._outbox_changed.set()
                    self._roster_changed.set()
            case KeyTopic(user=user):
                if payload:
                    self._apply(self.session.on_key_record(user, payload))
                    self._records_changed.set()
            case InboxTopic():
                self._inbox(payload)
            case GroupTopic():
                self._apply(self.session.on_group_message(parsed.topic, payload))
            case ServiceTopic(reply=True):
                self._reply(payload)
            case TelemetryTopic() | PresenceTopic():
                self._device_topic(parsed, payload)

    def _device_topic(self, topic: TelemetryTopic | PresenceTopic, payload: bytes) -> None:
        """A watched device's report or presence (`watch_devices`, `watch_presence`)."""
        self.fleet.on_message(topic, payload)
        if isinstance(topic, PresenceTopic):
            online = self.presence.on_presence(topic.device, payload)
            owner = self.session.keys.owner(topic.device)
            if online is not None and owner is not None:
                self._emit(PresenceChanged(owner[0], topic.device, online))

    def _inbox(self, payload: bytes) -> None:
        if _is_signed(payload):
            self._notice(payload)
        else:
            self._apply(self.session.on_inbox(payload))

    def _notice(self, payload: bytes) -> None:
        """A signed notice from a service (the geofence: "You joined the plant-3 channel")."""
        try:
            notice = verify_notice(self.trust, payload, device=self.profile.device)
        except (NoticeError, EnvelopeError) as exc:
            self._emit(Alarm("a notice in this device's inbox", str(exc)))
            return
        self._emit(SiteNotice(_group_path(notice.group_topic), notice.kind.value, notice.text))

    def _reply(self, payload: bytes) -> None:
        with contextlib.suppress(MeshchatError):
            reply = decode_reply(payload)
            if reply.id == PUSH_ID:
                if reply.ok and isinstance(reply.value, list):
                    self._start(self._set_groups({str(g) for g in reply.value}), "groups")
                return
            future = self._replies.get(reply.id)
            if future is not None and not future.done():
                if reply.ok:
                    future.set_result(reply.value)
                else:
                    future.set_exception(MeshchatError(str(reply.value)))

    def _apply(self, step: Step) -> None:
        """Keep and report what a step produced, publish what it asks, save the state."""
        for event in step.events:
            self._record(event)
        for item in step.outgoing:
            self.transport.publish_nowait(item.topic, item.payload, retain=item.retain)
        self._save_session()

    def _record(self, event: object) -> None:
        match event:
            case Decrypted():
                self._keep(event)
            case Undecryptable():
                path = _group_path(event.group_topic)
                self.store.add_notice(
                    event.group_topic, event.message_id, reason=event.reason, code=event.code
                )
                self._emit(Unreadable(path, event.message_id, event.reason, event.code))
            case ReplayAlarm():
                self._emit(
                    Alarm(
                        f"message {event.message_id} in {_group_path(event.group_topic)}",
                        f"replayed with different content (claimed by {event.device})",
                    )
                )
            case Refused():
                logger.warning("refused %s: %s", event.what, event.reason)
                self._emit(Alarm(event.what, event.reason))
            case Direct() if event.inner.kind is Kind.TELEMETRY_KEY:
                self.fleet.take_key(event.device, event.inner)
            case Direct():
                order = self.dispatch.take(event, me=self.profile.user)
                if order is not None:
                    self._orders_changed.set()
                    self._emit(OrderChanged(order))
                self._emit(
                    Message(
                        "",
                        (0, 0),
                        event.sender,
                        event.device,
                        event.inner.kind,
                        event.inner.ts,
                        event.inner.fields,
                    )
                )
            case Waiting():
                pass

    def _keep(self, event: Decrypted) -> None:
        inner = event.inner
        topic = event.group_topic
        target: tuple[int, int] | None = None
        if inner.kind is Kind.EDIT:
            target = _ref(inner.fields[1])
        elif inner.kind is Kind.RECALL:
            target = self._recallable(topic, _ref(inner.fields[0]), event.sender, inner.ts)
        first = inner.fields[0] if inner.fields else ""
        new = self.store.add_message(
            topic,
            event.message_id,
            sender=event.sender,
            device=event.device,
            kind=int(inner.kind),
            ts=inner.ts,
            body=first if isinstance(first, str) else "",
            fields=encode_inner(inner),
            target=target,
        )
        if not new:
            return
        self._kept += 1
        path = _group_path(topic)
        self._emit(
            Message(
                path,
                event.message_id,
                event.sender,
                event.device,
                inner.kind,
                inner.ts,
                inner.fields,
                event.history,
            )
        )
        self._follow_up(event, path)

    def _recallable(
        self, topic: str, target: tuple[int, int], sender: str, ts: int
    ) -> tuple[int, int] | None:
        """The recall's target if its own sender recalls it within the window, else None."""
        original = self.store.message(topic, target)
        if original is None or original.sender != sender:
            return None
        return target if ts - original.ts <= self.recall_window else None

    def _follow_up(self, event: Decrypted, path: str) -> None:
        """What a kind means beyond the message itself: reactions, receipts, acks, mentions."""
        inner, topic, sender = event.inner, event.group_topic, event.sender
        match inner.kind:
            case Kind.REACT:
                emoji = str(inner.fields[0])
                self.store.add_reaction(topic, _ref(inner.fields[1]), user=sender, emoji=emoji)
            case Kind.RECEIPT:
                kind, refs = inner.fields
                assert isinstance(kind, int)
                assert isinstance(refs, tuple)
                for ref in refs:
                    self.store.add_receipt(topic, _ref(ref), user=sender, kind=kind, at=inner.ts)
            case Kind.ACK:
                target = _ref(inner.fields[0])
                if self.store.add_ack(topic, target, user=sender, at=inner.ts):
                    missing = self.store.unacknowledged(topic, target)
                    if missing is not None:
                        self._emit(AckStatus(path, target, tuple(missing)))
            case Kind.URGENT:
                roster = self.session.rosters.current(topic)
                members = roster.members if roster else ()
                expected = [m for m in members if m != sender]
                self.store.add_urgent(topic, event.message_id, expected=expected)
        if inner.kind in {Kind.TEXT, Kind.REPLY, Kind.URGENT} and sender != self.profile.user:
            self._note_delivered(topic, event.message_id)
            if self._mentions_me(topic, sender, str(inner.fields[0])):
                self._emit(Mention(path, event.message_id, sender, str(inner.fields[0])))

    def _mentions_me(self, topic: str, sender: str, text: str) -> bool:
        names = {match.lower() for match in _MENTION.findall(text)}
        if self.profile.user in names:
            return True
        roster = self.session.rosters.current(topic)
        return "all" in names and roster is not None and sender in roster.announcers

    def _note_delivered(self, topic: str, message_id: tuple[int, int]) -> None:
        if not self.send_receipts or self._receipt_batches is None:
            return
        batch = self._receipt_batches.setdefault(topic, [])
        if len(batch) < MAX_RECEIPT_REFS:
            batch.append(message_id)
        self._receipts_due.set()

    async def _receipt_loop(self) -> None:
        """Send delivered receipts in batches: one message per group every few seconds."""
        while True:
            await self._receipts_due.wait()
            await asyncio.sleep(self.receipt_interval)  # batch what arrives meanwhile
            self._receipts_due.clear()
            batches, self._receipt_batches = self._receipt_batches or {}, {}
            for topic, refs in batches.items():
                if refs and self.session.may_send(topic, now=self._clock()) is None:
                    inner = Inner(Kind.RECEIPT, int(self._clock()), (DELIVERED, tuple(refs)))
                    self.store.enqueue(topic, encode_inner(inner))
            self._outbox_changed.set()

    # ----------------------------------------------------------------------------- sending

    def _topic(self, group: str) -> str:
        return group_topic(self.org, self._groups, self.profile.user, group)

    async def send(self, group: str, text: str, *, kind: Kind = Kind.TEXT) -> int:
        """Queue a text message (``dept/name``); returns its outbox id at once.

        Raises:
            NotFoundError: the user is not in that group.
            EnvelopeError: the message does not fit its kind.
        """
        return await self.send_inner(group, Inner(kind, int(self._clock()), (text,)))

    async def send_inner(self, group: str, inner: Inner) -> int:
        """Queue any message kind; returns its outbox id at once.

        Raises:
            NotFoundError: the user is not in that group.
            PermissionDeniedError: the group's current roster says this user may not post
                (an announcement channel, or no longer a member). A missing or expired roster
                does not refuse: the message waits for a fresh one (see `waiting_for`).
        """
        topic = self._topic(group)
        check_may_send(self.session, topic, now=self._clock())
        item = self.store.enqueue(topic, encode_inner(inner))
        self._outbox_changed.set()
        self._emit(LinkChanged(self.state, self.queued))
        return item

    async def wait_roster(
        self, group: str, check: Callable[[Roster], bool] | None = None
    ) -> Roster:
        """Wait until the group's roster is here (and satisfies `check`); bound it by a timeout."""
        topic = self._topic(group)
        while True:
            roster = self.session.rosters.current(topic)
            if roster is not None and (check is None or check(roster)):
                return roster
            self._roster_changed.clear()
            await self._roster_changed.wait()

    @property
    def waiting_for(self) -> dict[str, str]:
        """Groups whose queued messages cannot be sealed yet, and why (no or expired roster)."""
        return dict(self._waiting)

    async def reply(self, group: str, target: tuple[int, int], text: str) -> int:
        """Reply to a message."""
        return await self.send_inner(group, Inner(Kind.REPLY, self._now(), (text, target)))

    async def edit(self, group: str, target: tuple[int, int], text: str) -> int:
        """Change the text of one of this user's messages.

        Raises:
            PermissionDeniedError: it is not this user's message (or not here).
        """
        self._own(group, target, "edit")
        return await self.send_inner(group, Inner(Kind.EDIT, self._now(), (text, target)))

    async def recall(self, group: str, target: tuple[int, int]) -> int:
        """Withdraw one of this user's messages for everyone, within the recall window.

        Raises:
            PermissionDeniedError: not this user's message, or the window has passed.
        """
        original = self._own(group, target, "recall")
        if self._now() - original.ts > self.recall_window:
            raise PermissionDeniedError(
                f"message {target[0]}:{target[1]} is older than the recall window "
                f"({self.recall_window // 60} minutes)",
                actor=self.profile.user,
                permission="message.recall",
            )
        return await self.send_inner(group, Inner(Kind.RECALL, self._now(), (target,)))

    async def react(self, group: str, target: tuple[int, int], emoji: str) -> int:
        """React to a message."""
        return await self.send_inner(group, Inner(Kind.REACT, self._now(), (emoji, target)))

    async def mark_read(self, group: str, targets: list[tuple[int, int]]) -> int:
        """Tell the group these messages were read."""
        refs = tuple(targets[:MAX_RECEIPT_REFS])
        return await self.send_inner(group, Inner(Kind.RECEIPT, self._now(), (READ, refs)))

    async def urgent(self, group: str, text: str) -> int:
        """An urgent notice: members are asked to acknowledge it."""
        return await self.send_inner(group, Inner(Kind.URGENT, self._now(), (text,)))

    async def ack(self, group: str, target: tuple[int, int]) -> int:
        """Acknowledge an urgent notice."""
        return await self.send_inner(group, Inner(Kind.ACK, self._now(), (target,)))

    def unacknowledged(self, group: str, target: tuple[int, int]) -> list[str] | None:
        """Who has not acknowledged an urgent notice (None: no such urgent notice here)."""
        return self.store.unacknowledged(self._topic(group), target)

    def _own(self, group: str, target: tuple[int, int], what: str) -> StoredMessage:
        original = self.store.message(self._topic(group), target)
        if original is None or original.sender != self.profile.user:
            raise PermissionDeniedError(
                f"only the sender may {what} a message, and {target[0]}:{target[1]} is not "
                f"one of {self.profile.user}'s messages in {group}",
                actor=self.profile.user,
                permission=f"message.{what}",
            )
        return original

    def _now(self) -> int:
        return int(self._clock())

    async def flush(self) -> None:
        """Wait until the broker acknowledged everything queued (bound it with a timeout)."""
        while self.store.queued:
            self._sent.clear()
            self._outbox_changed.set()
            await self._sent.wait()

    async def _send_loop(self) -> None:
        while True:
            await self._outbox_changed.wait()
            self._outbox_changed.clear()
            blocked: set[str] = set()
            self._waiting.clear()
            for item in self.store.outbox():
                if item.id in self._inflight or item.group_topic in blocked:
                    continue
                pairs = item.sealed
                if pairs is None:
                    why_not = self.session.may_send(item.group_topic, now=self._clock())
                    if why_not is not None:
                        blocked.add(item.group_topic)  # keep this group's order: wait
                        self._waiting[_group_path(item.group_topic)] = why_not
                        continue
                    await self._await_records(item.group_topic)
                    pairs = self._seal(item.id, item.group_topic, item.inner)
                    if pairs is None:
                        blocked.add(item.group_topic)
                        continue
                self._inflight[item.id] = asyncio.create_task(self._deliver(item.id, pairs))

    async def _await_records(self, group_topic: str) -> None:
        """Give members' key records a moment to arrive, so every device gets the chain now."""
        roster = self.session.rosters.current(group_topic)
        if roster is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._ready_timeout):
                while any(self.session.keys.record(m) is None for m in roster.members):
                    self._records_changed.clear()
                    await self._records_changed.wait()

    def _seal(
        self, item_id: int, group_topic: str, raw: bytes
    ) -> tuple[tuple[str, bytes], ...] | None:
        try:
            inner = decode_inner(raw)
            outgoing = self.session.encrypt(group_topic, inner, now=self._clock())
        except E2EEError as exc:
            logger.warning("cannot send to %s yet: %s", group_topic, exc)
            return None
        pairs = tuple((item.topic, item.payload) for item in outgoing)
        last = outgoing[-1].payload
        message_id = _message_id(last)
        self.store.seal(
            item_id,
            list(pairs),
            message_id=message_id,
            state_key=SESSION_KEY,
            state=self.session.to_bytes(),
        )
        # Keep our own message at once (it also comes back from the broker, deduplicated).
        self._apply(self.session.on_group_message(group_topic, last))
        return pairs

    async def _deliver(self, item_id: int, pairs: tuple[tuple[str, bytes], ...]) -> None:
        try:
            await asyncio.gather(
                *(self.transport.publish(topic, payload) for topic, payload in pairs)
            )
        except MeshchatError as exc:
            logger.warning("message %d not sent yet: %s", item_id, exc)
            return
        finally:
            self._inflight.pop(item_id, None)
        self.store.sent(item_id)
        self._sent.set()
        self._emit(LinkChanged(self.state, self.queued))


def _is_signed(payload: bytes) -> bool:
    """Whether an inbox payload is a signed envelope (a service's notice)."""
    try:
        return isinstance(decode(payload), Signed)
    except EnvelopeError:
        return False


def _ref(value: object) -> tuple[int, int]:
    """A message id from a decoded field (the codec checked its shape)."""
    assert isinstance(value, tuple)
    return (int(value[0]), int(value[1]))


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("client task %s failed", task.get_name(), exc_info=task.exception())


def _message_id(payload: bytes) -> tuple[int, int]:
    envelope = decode(payload)
    assert isinstance(envelope, GroupMessage)
    return (envelope.chain_id, envelope.index)
