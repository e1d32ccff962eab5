"""`ChatView`: what the chat app shows of one user's groups, kept current from a `Client`.

It reads the client's events and shows what the local store holds. Scrolling back past the
oldest message on this device asks the archiver for older ones, in a worker: what it sends is
read by the client and shows up in place as it arrives. `ChatApp` (in `cli.chatapp.app`) adds
what the user does: the composer's commands and the keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import Final

from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, Input, Static

from cli.chatapp.model import (
    SHOWN,
    Entry,
    Numbers,
    entries_of,
    entry_of,
    older,
    order_line,
    who_line,
)
from cli.chatapp.widgets import (
    Composer,
    GroupItem,
    GroupList,
    LinkBanner,
    LinkStatus,
    MessageItem,
    MessageView,
)
from meshchat.client import (
    AckStatus,
    Alarm,
    Client,
    ClientEvent,
    GroupsChanged,
    LinkChanged,
    Mention,
    Message,
    OrderChanged,
    PresenceChanged,
    TransportState,
    Unreadable,
)
from meshchat.client.dispatch import LedgerOrder
from meshchat.device import ANSWERS
from meshchat.e2ee import Kind
from meshchat.errors import MeshchatError
from meshchat.topics import GroupTopic

__all__ = ["ARCHIVE_PAGE", "LOADING", "MAX_SHOWN", "NO_OLDER", "PAGE", "START", "ChatView"]

logger = logging.getLogger(__name__)

PAGE: Final = 50
"""Messages shown when a group opens, and loaded each time the user scrolls past the top."""
START: Final = "— the start of this group's history on this device —"
LOADING: Final = "— loading older messages from the archive… —"
NO_OLDER: Final = "— no older messages: this is the start of the group —"
ARCHIVE_PAGE: Final = 200
"""Envelopes asked of the archiver per page (receipts and reactions count too)."""
ARCHIVE_PAGES: Final = 5
"""Pages one step back reads at most while they hold only what this device has already."""
ARCHIVE_TIMEOUT: Final = 15.0
"""Seconds to wait for one page from the archiver."""
_DIRECT_KINDS: Final = frozenset({Kind.WORKORDER, Kind.ORDER_STATE})
"""Direct messages that are not chat: work orders and their answers show as orders."""
MAX_SHOWN: Final = 500
"""Lines the message view keeps while following new messages; older ones are dropped."""


@dataclass(slots=True)
class _Paging:
    """How far back the archiver was read for one group (kept while the app runs)."""

    cursor: object = None
    done: bool = False
    failed: str = ""


class ChatView(App[None]):
    """The screen of the chat app: groups, messages, the link; following a client's events."""

    CSS_PATH = Path(__file__).with_name("chat.tcss")  # absolute: subclasses live elsewhere
    TITLE = "meshchat"
    ENABLE_COMMAND_PALETTE = False

    def __init__(
        self,
        client: Client,
        *,
        clock: Callable[[], float] = time.time,
        tz: tzinfo | None = None,
        page: int = PAGE,
    ) -> None:
        """Show the messages of `client`'s user.

        Args:
            client: an entered client (or one entered before the app mounts).
            clock: the time source (for "today" and the time of queued messages).
            tz: the time zone of the times shown (default: the local one).
            page: messages shown when a group opens, and loaded per step back.
        """
        super().__init__()
        self.client = client
        self.me = client.profile.user
        self.current: str | None = None
        self.numbers = Numbers()
        self.link: tuple[TransportState, int, str] = (client.state, client.queued, "")
        self._clock = clock
        self._tz = tz
        self._page = page
        self._shown: dict[tuple[int, int], MessageItem] = {}
        self._unsent: dict[int, MessageItem] = {}
        """Lines of our messages marked queued, by outbox id (`_mark_delivered` reads these)."""
        self._oldest: int | None = None
        self._more = True
        self._waiting: dict[str, set[tuple[int, int]]] = {}
        self._top: MessageItem | None = None
        self._archive: dict[str, _Paging] = {}
        self._fetching: set[str] = set()
        self._orders: dict[str, MessageItem] = {}
        self._who: MessageItem | None = None
        self.sub_title = f"{self.me} on {client.profile.device} · {client.profile.org}"

    # ------------------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        """Header, offline banner, groups and link on the left, messages and composer."""
        yield Header(icon="✉")
        yield LinkBanner(id="banner")
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Static("Groups", classes="heading")
                yield GroupList(id="groups", initial_index=None)
                yield LinkStatus(id="link")
            with Vertical(id="main"):
                yield Static(id="title")
                yield MessageView(id="messages", initial_index=None)
                # Not selecting all on focus: a prefilled `/reply #N ` is typed on, not over.
                yield Composer(
                    id="composer",
                    placeholder="Write a message; /help for commands",
                    select_on_focus=False,
                )
        yield Footer()

    async def on_mount(self) -> None:
        """Show the groups and the link, open the first group, follow the client."""
        self.link = (self.client.state, self.client.queued, "")
        await self._set_groups(self.client.groups)
        self._draw_link()
        self.query_one("#composer", Input).focus()
        self.run_worker(self._follow(), name="meshchat[chat].events", group="client")

    @property
    def view(self) -> MessageView:
        """The message view."""
        return self.query_one("#messages", MessageView)

    @property
    def group_list(self) -> GroupList:
        """The group list."""
        return self.query_one("#groups", GroupList)

    @property
    def composer(self) -> Input:
        """The composer."""
        return self.query_one("#composer", Input)

    def _topic(self, group: str) -> str:
        # Not `group_topic`, which refuses a group this user no longer follows: a line of a
        # group just left may still be on screen.
        dept, name = group.split("/", 1)
        return GroupTopic(self.client.org, dept, name).topic

    def _now(self) -> float:
        return self._clock()

    # ------------------------------------------------------------------------------ groups

    async def _set_groups(self, groups: list[str]) -> None:
        listed = self.group_list
        for item in list(listed.children):
            if isinstance(item, GroupItem) and item.group not in groups:
                await item.remove()
        for position, group in enumerate(sorted(groups)):
            if listed.item(group) is None:
                item = GroupItem(group)
                topic = self._topic(group)
                self._waiting[group] = set(self.client.store.awaiting_ack(topic, self.me))
                item.urgent = len(self._waiting[group])
                item.show()
                await listed.insert(position, [item])
        if self.current not in groups:
            if groups:
                await self.open_group(min(groups))
            else:
                self.current = None
                await self.view.clear()
                self._title()
                await self._note(
                    f"{self.me} is in no group yet. An admin or a department manager adds you "
                    f"with `meshchat group add DEPT/GROUP {self.me}`; the group shows up here "
                    "by itself."
                )
        self._draw_link()

    async def open_group(self, group: str) -> None:
        """Show a group's latest messages and clear its unread count."""
        self.current = group
        listed = self.group_list
        item = listed.item(group)
        if item is not None:
            item.unread = item.mentions = 0
            item.show()
            listed.index = listed.groups.index(group)
        self._title()
        self._shown.clear()
        self._unsent.clear()
        self._oldest, self._more = None, True
        self._top = self._who = None
        view = self.view
        await view.clear()
        await self._load_older(archive=False)
        if not self._shown:
            self._fetch_older(group)  # nothing here on this device: ask the archive at once
        topic, store = self._topic(group), self.client.store
        unread = store.notices(topic)
        read = store.messages_by_id(topic, [m for m, _, _ in unread]) if unread else {}
        notices = [
            Entry(group, message_id, unreadable=reason)
            for message_id, reason, _ in unread
            if message_id not in read
        ]
        await self._append(notices)
        view.anchor()

    def _title(self) -> None:
        title = self.query_one("#title", Static)
        if self.current is None:
            title.update(Text("no group"))
            return
        roster = self.client.session.rosters.current(self._topic(self.current))
        text = self.current
        if roster is not None:
            text += f" · {len(roster.members)} members"
            if roster.announcement:
                text += " · announcements"
        title.update(Text(text))

    # ----------------------------------------------------------------------------- history

    async def _load_older(self, *, archive: bool = True) -> int:
        """Show older messages above the oldest one shown; returns how many there were.

        Args:
            archive: when this device holds nothing older, ask the archiver (in a worker;
                what it sends shows up in place as the client reads it).
        """
        group = self.current
        if group is None:
            return 0
        if not self._more:
            if archive:
                self._fetch_older(group)
            return 0
        topic = self._topic(group)
        store = self.client.store
        found, self._more = older(
            store, topic, until_ts=self._oldest, seen=set(self._shown), want=self._page
        )
        items = [self._item(e) for e in entries_of(store, group, topic, found, self.numbers)]
        if not self._more:
            self._top = self._item(Entry(group, None, note=self._top_text(group)))
            items.insert(0, self._top)
        if found:
            self._oldest = found[0].ts
        view = self.view
        if items:
            keep = view.index
            await view.insert(0, items)
            if keep is not None:
                view.index = keep + len(items)
        return len(found)

    def _fetch_older(self, group: str) -> None:
        """Ask the archiver for a group's messages older than this device holds (a worker)."""
        paging = self._archive.setdefault(group, _Paging())
        if paging.done or group in self._fetching:
            return
        if self.client.state is not TransportState.CONNECTED:
            paging.failed = "offline; the archive is asked when the link is back"
        else:
            paging.failed = ""
            self._fetching.add(group)
            self.run_worker(
                self._fetch(group, paging),
                name="meshchat[chat].history",
                group="history",
                exit_on_error=False,
            )
        self._draw_top()

    async def _fetch(self, group: str, paging: _Paging) -> None:
        """Read pages back in time until one holds something new here, or the archive ends."""
        try:
            for _ in range(ARCHIVE_PAGES):
                async with asyncio.timeout(ARCHIVE_TIMEOUT):
                    page = await self.client.fetch_history_page(
                        group, cursor=paging.cursor, limit=ARCHIVE_PAGE, newest_first=True
                    )
                paging.cursor = page.cursor
                if page.cursor is None:
                    paging.done = True
                    break
                if page.unseen:
                    break
        except TimeoutError:
            paging.failed = "the archive did not answer"
        except MeshchatError as exc:
            paging.failed = str(exc)
            logger.info("no older history of %s: %s", group, exc)
        finally:
            self._fetching.discard(group)
            self._draw_top()

    def _top_text(self, group: str) -> str:
        paging = self._archive.get(group)
        if group in self._fetching:
            return LOADING
        if paging is None:
            return START
        if paging.failed:
            return f"— older messages: {paging.failed}; pgup tries again —"
        return NO_OLDER if paging.done else START

    def _draw_top(self) -> None:
        """Redraw the line at the top of the view: start, loading, or no older messages."""
        group, top = self.current, self._top
        if group is not None and top is not None and top.entry.group == group:
            top.show(Entry(group, None, note=self._top_text(group)))

    def _item(self, entry: Entry) -> MessageItem:
        item = MessageItem(entry, me=self.me, now=self._now(), tz=self._tz)
        if entry.message_id is not None:
            self._shown[entry.message_id] = item
        if entry.outbox_id is not None:
            self._unsent[entry.outbox_id] = item
        return item

    async def _append(self, entries: list[Entry]) -> None:
        if not entries:
            return
        view = self.view
        following = view.scroll_y >= view.max_scroll_y  # the user reads the newest lines
        await view.extend([self._item(entry) for entry in entries])
        excess = len(view.children) - MAX_SHOWN
        if excess > 0 and following:
            await self._forget_oldest(excess + self._page)

    async def _forget_oldest(self, count: int) -> None:
        """Drop the oldest lines of a long session (page up brings them back)."""
        view = self.view
        dropped = list(view.children)[:count]
        for child in dropped:
            if isinstance(child, MessageItem) and child.entry.message_id is not None:
                self._shown.pop(child.entry.message_id, None)
        await view.remove_children(dropped)
        if self._top in dropped:
            self._top = None
        first = next((i.entry for i in view.items() if i.entry.ts), None)
        self._oldest, self._more = (first.ts if first else None), True

    async def _note(self, text: str) -> MessageItem:
        """A line from the app in the message view (not sent to anyone)."""
        await self._append([Entry(self.current or "", None, note=text)])
        view = self.view
        view.scroll_end(animate=False)
        return view.items()[-1]

    def _shows(self, item: MessageItem | None) -> bool:
        """Whether a line is still in the message view (a group change clears it)."""
        return item is not None and item.parent is self.view

    async def _show_order(self, order: LedgerOrder) -> None:
        """A work order's line: added when it is sent, changed in place as it is answered."""
        text = order_line(order)
        item = self._orders.get(order.order_id)
        if item is not None and self._shows(item):
            item.show(Entry(item.entry.group, None, note=text))
        elif self.current is not None:
            self._orders[order.order_id] = await self._note(text)
        if order.direction == "out" and order.state in ANSWERS:
            self.notify(text, title=f"work order {order.state}", markup=False)

    def who_text(self, group: str) -> str:
        """The members of a group and what this client knows of their presence."""
        roster = self.client.session.rosters.current(self._topic(group))
        if roster is None:
            return f"The member list of {group} has not arrived yet (it comes from the server)."
        lines = [f"{len(roster.members)} members of {group}:"]
        for member in roster.members:
            seen = self.client.presence_of(member)
            if member == self.me:
                seen = dataclasses.replace(seen, online=True)
            lines.append(
                who_line(seen, announcer=member in roster.announcers, now=self._now(), tz=self._tz)
            )
        return "\n".join(lines)

    def _redraw_who(self) -> None:
        item = self._who
        if item is not None and self._shows(item) and self.current is not None:
            item.show(Entry(self.current, None, note=self.who_text(self.current)))

    # ------------------------------------------------------------------------------ events

    async def _follow(self) -> None:
        async for event in self.client.events():
            try:
                await self.on_client_event(event)
            except Exception:  # one bad event must not end the chat
                logger.exception("could not show %s", type(event).__name__)

    async def on_client_event(self, event: ClientEvent) -> None:  # noqa: C901, PLR0912  # one per kind
        """Reflect one event of the client on screen."""
        match event:
            case LinkChanged():
                self.link = (event.state, event.queued, event.reason)
                self._draw_link()
                self._mark_delivered()
            case GroupsChanged():
                await self._set_groups(list(event.groups))
            case Message(group="") if event.kind in _DIRECT_KINDS:
                pass  # work orders show through `OrderChanged`
            case Message(group=""):
                self.notify(event.text, title=f"direct message from {event.sender}", markup=False)
            case Message():
                await self._client_message(event)
            case Unreadable() if event.group == self.current:
                item = self._shown.get(event.message_id)
                entry = Entry(event.group, event.message_id, unreadable=event.reason)
                if item is None:
                    await self._append([entry])
                else:
                    item.show(entry)
            case Mention():
                self.notify(
                    event.text,
                    title=f"@{event.sender} mentioned you in {event.group}",
                    markup=False,
                )
                group = self.group_list.item(event.group)
                if group is not None and event.group != self.current:
                    group.mentions += 1
                    group.show()
            case AckStatus():
                self._refresh(event.group, event.message_id)
            case OrderChanged():
                await self._show_order(event.order)
            case PresenceChanged():
                self._redraw_who()
            case Alarm():
                self.notify(
                    f"{event.what}: {event.reason}", title="alarm", severity="error", markup=False
                )

    async def _client_message(self, event: Message) -> None:
        group = event.group
        if event.kind in SHOWN:
            if event.kind is Kind.URGENT and event.sender != self.me:
                self._waiting.setdefault(group, set()).add(event.message_id)
                self._count_urgent(group)
            at = self._place(event) if group == self.current else None
            if group == self.current and at != _ABOVE:
                await self._show_message(event, at)
            elif event.sender != self.me and not event.history:
                item = self.group_list.item(group)
                if item is not None:
                    item.unread += 1
                    item.show()
            return
        target = event.target
        if target is None:
            return
        if event.kind is Kind.ACK and event.sender == self.me:
            self._waiting.get(group, set()).discard(target)
            self._count_urgent(group)
        if event.kind is Kind.RECALL:
            self._waiting.get(group, set()).discard(target)
            self._count_urgent(group)
        self._refresh(group, target)

    def _place(self, event: Message) -> int | None:
        """Where a message of the open group goes: None at the bottom (or where it is shown).

        A message read from the archive may be older than what is shown: it goes in its place
        by time, or, when this device holds older messages not shown yet, nowhere now (paging
        back shows it in its place): then `_ABOVE`.
        """
        if not event.history or event.message_id in self._shown:
            return None
        items = self.view.items()
        if event.ts >= max((item.entry.ts for item in items), default=0):
            return None
        if self._more and (self._oldest is None or event.ts < self._oldest):
            return _ABOVE
        return next(
            (at for at, item in enumerate(items) if item.entry.ts > event.ts),
            len(items),
        )

    async def _show_message(self, event: Message, at: int | None = None) -> None:
        topic = self._topic(event.group)
        stored = self.client.store.message(topic, event.message_id)
        if stored is None:
            return
        entry = entry_of(self.client.store, event.group, topic, stored, self.numbers)
        item = self._shown.get(event.message_id)
        if item is None and event.sender == self.me:
            item = self._pending(event.kind, stored.body)
            if item is not None:
                entry.outbox_id = item.entry.outbox_id
                self._shown[event.message_id] = item
        if item is not None:
            item.show(entry)
        elif at is None:
            await self._append([entry])
        else:
            await self._insert(at, entry)
        self._mark_delivered()

    async def _insert(self, at: int, entry: Entry) -> None:
        """Put a message read from the archive in its place, keeping the picked message."""
        view = self.view
        keep = view.index
        await view.insert(at, [self._item(entry)])
        if keep is not None and keep >= at:
            view.index = keep + 1
        if not self._more and (self._oldest is None or entry.ts < self._oldest):
            self._oldest = entry.ts

    def _pending(self, kind: Kind, body: str) -> MessageItem | None:
        """The oldest line of a message of ours not sealed yet, with this kind and text."""
        for item in self.view.items():
            entry = item.entry
            unsealed = entry.message_id is None and entry.outbox_id is not None
            if unsealed and entry.kind is kind and entry.body == body:
                return item
        return None

    def _refresh(self, group: str, message_id: tuple[int, int]) -> None:
        """Redraw a message shown here after an edit, recall, reaction or acknowledgement."""
        item = self._shown.get(message_id)
        if group != self.current or item is None:
            return
        topic = self._topic(group)
        stored = self.client.store.message(topic, message_id)
        if stored is not None:
            entry = entry_of(self.client.store, group, topic, stored, self.numbers)
            entry.outbox_id = item.entry.outbox_id
            item.show(entry)

    def _mark_delivered(self) -> None:
        """Drop the "queued" mark of our messages the broker has acknowledged.

        Only the lines marked queued are looked at, one outbox row each: nothing is read while
        nothing shown waits to go out.
        """
        for outbox_id, item in list(self._unsent.items()):
            if self.client.store.pending(outbox_id) and self._shows(item):
                continue
            del self._unsent[outbox_id]
            if item.entry.outbox_id == outbox_id:
                item.entry.outbox_id = None
                item.show()

    def _count_urgent(self, group: str) -> None:
        item = self.group_list.item(group)
        if item is not None:
            item.urgent = len(self._waiting.get(group, ()))
            item.show()
        self._draw_link()

    def _draw_link(self) -> None:
        state, queued, reason = self.link
        urgent = sum(len(ids) for ids in self._waiting.values())
        waiting = "; ".join(f"{g}: {why}" for g, why in self.client.waiting_for.items())
        self.query_one("#link", LinkStatus).show(state, queued, urgent, waiting)
        self.query_one("#banner", LinkBanner).show(state, queued, reason)


_ABOVE: Final = -1
"""`ChatView._place`: the message belongs above what is shown; paging back shows it."""
