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
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Final, Self

from meshchat.client._history import HISTORY_PAGE, MAX_HISTORY_PAGES, History
from meshchat.client._membership import Membership
from meshchat.client._membership import group_topic as group_topic  # noqa: PLC0414 -- re-export
from meshchat.client._orders import WorkOrders
from meshchat.client._receipts import MAX_RECEIPT_REFS, READ, RECEIPT_INTERVAL, Receipts
from meshchat.client._receiving import Receiver
from meshchat.client._saved import GROUPS_KEY as GROUPS_KEY  # noqa: PLC0414 -- re-export
from meshchat.client._saved import INBOX_SYNCED_KEY, load_session, save_session
from meshchat.client._saved import saved_groups as saved_groups  # noqa: PLC0414 -- re-export
from meshchat.client._sending import Sender
from meshchat.client._sending import check_may_send as check_may_send  # noqa: PLC0414 -- re-export
from meshchat.client._services import Services
from meshchat.client._shared import SERVICE_TIMEOUT, Shared, log_failure
from meshchat.client._watching import Watching
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
from meshchat.client.presence import OFFLINE, ONLINE, Seen
from meshchat.client.profile import LOCK_FILE, DeviceProfile
from meshchat.client.store import ClientStore, StoredMessage
from meshchat.client.transport import Transport
from meshchat.client.values import Backoff, Publication, StateChange, TransportState
from meshchat.datadir import exclusive_lock
from meshchat.device.orders import OrderState
from meshchat.e2ee import Inner, Kind, Roster, encode_inner
from meshchat.errors import BusyError, PermissionDeniedError
from meshchat.rpc import Request
from meshchat.topics import InboxTopic, PresenceTopic, ServiceTopic

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

READY_TIMEOUT: Final = 3.0
"""Seconds to wait for members' key records before sealing anyway (they get it later)."""
HANDOFF_POLL: Final = 0.2
"""Seconds between looks for messages other processes queued in this profile's outbox."""
MAX_EVENTS: Final = 10_000
RECALL_WINDOW: Final = 2 * 3600
"""Seconds during which a sender may recall a message, by default."""


class Client:
    """Messaging for one device profile; an async context manager.

    The client holds the session, the store and the transport, runs the background loops and
    offers the API; each domain is a part it composes: `Membership` (groups), `Receiver` (the
    receive path), `Sender` (the outbox), `Receipts`, `History`, `WorkOrders`, `Watching`
    (other devices and people) and `Services` (requests to the org's services).
    """

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
        # The lock first, then the files: closing the stack undoes them in reverse.
        self._files = contextlib.ExitStack()
        try:
            self._files.enter_context(
                exclusive_lock(profile.path / LOCK_FILE, f"device profile {profile.user!r}")
            )
        except BusyError as exc:
            raise BusyError(
                f"{exc}: stop it first, or work through it (`meshchat send` and `ack` hand "
                "their messages to it; `meshchat chat` has /dispatch)",
                pid=exc.pid,
            ) from exc
        try:
            self._prepare(profile, broker, clock, backoff, ready_timeout)
        except BaseException:
            self._files.close()
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
        self.store = ClientStore(profile.store_path, clock=clock)
        self._files.callback(self.store.close)
        trust = profile.trust()
        self.trust = trust
        signing, box = profile.signing(), profile.box()
        self.session = load_session(
            self.store,
            trust=trust,
            user=profile.user,
            device=profile.device,
            signing=signing,
            box=box,
        )
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
        self._background: list[asyncio.Task[None]] = []
        # The wake-ups the parts give each other: work for the send loop, a new roster (for
        # `wait_roster`), new key records (for sealing and work orders).
        self._outbox_changed = asyncio.Event()
        self._roster_changed = asyncio.Event()
        self._records_changed = asyncio.Event()
        # The parts read the time and the settings through the client, so a clock swapped in
        # later, or a setting changed, reaches them all.
        shared = Shared(
            org=self.org,
            user=profile.user,
            device=profile.device,
            session=self.session,
            store=self.store,
            transport=self.transport,
            clock=self._time,
            emit=self._emit,
            outbox_changed=self._outbox_changed,
            records_changed=self._records_changed,
        )
        self._services = Services(shared, on_groups=self._groups_pushed)
        self._membership = Membership(shared, request=self.request)
        self._watching = Watching(shared, presence_clock=clock)
        self.fleet = self._watching.fleet
        """Telemetry and presence of the devices this client reads (`watch_devices`)."""
        self.dispatch = DispatchLedger(profile.path / DISPATCH_FILE)
        self._files.callback(self.dispatch.close)
        """Work orders sent from (and to) this device, and their answers."""
        self.presence = self._watching.presence
        """Presence of the people whose devices this client watches (`watch_presence`)."""
        self._orders = WorkOrders(shared, dispatch=self.dispatch, ready_timeout=ready_timeout)
        self._receipts = Receipts(
            shared, enabled=lambda: self.send_receipts, interval=lambda: self.receipt_interval
        )
        self._receiver = Receiver(
            shared,
            trust=trust,
            services=self._services,
            watching=self._watching,
            orders=self._orders,
            receipts=self._receipts,
            roster_changed=self._roster_changed,
            recall_window=lambda: self.recall_window,
        )
        self._sender = Sender(shared, receiver=self._receiver, ready_timeout=ready_timeout)
        self._history = History(
            shared, receiver=self._receiver, request=self.request, topic=self._topic
        )

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

    @property
    def _groups(self) -> set[str]:
        return self._membership.paths

    async def __aenter__(self) -> Self:
        """Connect (or keep trying in the background) and start following the groups.

        Raises:
            AuthenticationError: the broker refused the device's token (revoked?).
        """
        # Read from the first byte: the transport counts as connected only once the broker has
        # acknowledged the birth message, which on a thin link comes behind the messages the
        # broker kept for this device (about 100 of them, 1.9 s at 64 kbit/s).
        consume = self._start(self._receiver.run(), "consume")
        try:
            await self.transport.__aenter__()
        except BaseException:
            consume.cancel()
            await asyncio.gather(consume, return_exceptions=True)
            self._background.clear()
            self._files.close()
            raise
        self._start(self._watch_store(), "handoff")
        self._start(self._watch_link(), "link")
        self._start(self._sender.run(), "send")
        self._start(self._receipts.run(), "receipts")
        # Subscribing waits for the broker; offline, the client still works from its store.
        subscribing = self._start(self._subscribe_all(), "subscribe")
        if self.transport.state is TransportState.CONNECTED:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SERVICE_TIMEOUT):
                    await asyncio.shield(subscribing)
        return self

    def _start(self, work: Coroutine[object, object, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=f"meshchat[client].{name}")
        task.add_done_callback(log_failure)
        self._background.append(task)
        return task

    async def __aexit__(self, *exc_info: object) -> None:
        """Send what can be sent briefly, save the state and disconnect."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self.flush()
        tasks = [*self._background, *self._sender.inflight]
        self._background.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._save_session()
        await self.transport.__aexit__(None, None, None)
        self._files.close()

    async def _watch_store(self) -> None:
        """Work for other processes on this profile: they hand off through its files.

        What they queue in the outbox (`meshchat send`) is sent; the work orders they send or
        answer (`meshchat dispatch`) are reported as `OrderChanged`. SQLite's ``data_version``
        changes only when another connection commits, so this costs two pragmas per tick while
        nothing happens.
        """
        seen = self.store.data_version()
        ledger_seen = self.dispatch.data_version()
        while True:
            await asyncio.sleep(HANDOFF_POLL)
            version = self.store.data_version()
            if version != seen:
                seen = version
                self._outbox_changed.set()
                self._emit(LinkChanged(self.state, self.queued))
            try:
                ledger_version = self.dispatch.data_version()
                if ledger_version != ledger_seen:
                    ledger_seen = ledger_version
                    self._orders.reconcile()
            except (sqlite3.Error, ValueError):  # the outbox hand-off goes on regardless
                logger.exception("could not read the dispatch ledger")

    def _save_session(self) -> None:
        save_session(self.store, self.session)

    async def _subscribe_all(self) -> None:
        org = self.org
        # All at once: one SUBSCRIBE, one wait. On a thin link the broker's acknowledgement
        # queues behind what it kept for this device, so waiting for each in turn cost that
        # queue's time again per topic.
        await asyncio.gather(
            self.transport.subscribe(f"mc/{org}/_k/+"),
            self.transport.subscribe(InboxTopic(org, self.profile.device).topic),
            self.transport.subscribe(ServiceTopic(org, "dir", self.profile.user, reply=True).topic),
            *(self._membership.follow(path) for path in sorted(self._groups)),
        )
        await self._membership.refresh()
        if self.store.get(INBOX_SYNCED_KEY) is None:
            await self._history.sync_inbox()

    def _groups_pushed(self, groups: set[str]) -> None:
        """The directory says this user's groups changed: follow them, in the background."""
        self._start(self._membership.set_groups(groups), "groups")

    def _time(self) -> float:
        return self._clock()

    def _now(self) -> int:
        return int(self._clock())

    # ------------------------------------------------------------------- groups, history

    async def join(self, group: str) -> list[str]:
        """Ask the directory to add this user to a group; returns the user's groups now.

        The directory decides with the same right as ``meshchat group add`` (admins, and
        managers of the group's department), re-signs the roster and audits the change.

        Raises:
            MeshchatError: the directory refused (its reason names the missing permission)
                or did not answer in time.
        """
        return await self._membership.change("join", group)

    async def leave(self, group: str) -> list[str]:
        """Ask the directory to take this user out of a group; returns the user's groups now.

        Anyone may leave a group, except a site channel (the geofence keeps those). The
        group's keys rotate before its next message.

        Raises:
            MeshchatError: the directory refused or did not answer in time.
        """
        return await self._membership.change("leave", group)

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
        return await self._history.fetch(group, since=since, until=until, max_pages=max_pages)

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
        return await self._history.fetch_page(
            group,
            since=since,
            until=until,
            cursor=cursor,
            limit=limit,
            newest_first=newest_first,
        )

    # ---------------------------------------------------------------- devices and people

    async def watch_devices(self, devices: Iterable[str]) -> None:
        """Follow devices' presence and telemetry in `fleet` (persistent: once is enough).

        Raises:
            PermissionDeniedError: the broker refuses a device's telemetry topics (only its
                department and admins may read them; only its dispatch groups can decrypt).
        """
        await self._watching.watch_devices(devices)

    async def watch_presence(self, users: Iterable[str]) -> None:
        """Follow the presence of these people's devices in `presence` (read-only).

        Only the devices their key records list now are followed (presence is public within
        the org); `PresenceChanged` events report changes.
        """
        await self._watching.watch_presence(users)

    def presence_of(self, user: str) -> Seen:
        """What this client knows of a person's presence (see `watch_presence`)."""
        return self._watching.presence_of(user)

    # ---------------------------------------------------------------------- work orders

    async def send_order(self, device: str, text: str) -> LedgerOrder:
        """Send a work order to one device (a device account's, or a person's); returns it.

        It is sealed to that device and signed by this one, queued in the outbox (it goes out
        when the link allows) and kept in `dispatch`, where its answers land.

        Raises:
            NotFoundError: no key record lists that device (after waiting `ready_timeout`).
            EnvelopeError: the text is empty or too long.
        """
        return await self._orders.send(device, text)

    async def answer_order(self, order_id: str, state: OrderState, reason: str = "") -> LedgerOrder:
        """Answer a work order sent to this user (accepted, done, rejected with a reason).

        Raises:
            OrderError: no such order sent to this user, it cannot move there, or a rejection
                without a reason.
        """
        return await self._orders.answer(order_id, state, reason)

    async def wait_order(self, order_id: str, check: Callable[[LedgerOrder], bool]) -> LedgerOrder:
        """Wait until the order satisfies `check` (bound it with `asyncio.timeout`)."""
        return await self._orders.wait(order_id, check)

    async def request(self, service: str, request: Request) -> object:
        """Ask a service and wait for its reply (bound the wait with `asyncio.timeout`).

        Raises:
            MeshchatError: the service refused (its message).
        """
        return await self._services.request(service, request)

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

    # ----------------------------------------------------------------------------- sending

    def _topic(self, group: str) -> str:
        return self._membership.topic(group)

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
        return self._sender.waiting_for

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
        """Tell the group these messages were read (in receipts of up to 1000 each).

        Returns:
            The outbox id of the last receipt (0 when there was nothing to mark).
        """
        item = 0
        for start in range(0, len(targets), MAX_RECEIPT_REFS):
            refs = tuple(targets[start : start + MAX_RECEIPT_REFS])
            item = await self.send_inner(group, Inner(Kind.RECEIPT, self._now(), (READ, refs)))
        return item

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

    async def flush(self) -> None:
        """Wait until the broker acknowledged everything queued (bound it with a timeout)."""
        await self._sender.flush()
