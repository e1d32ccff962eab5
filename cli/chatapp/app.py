"""`ChatApp`: every group of one user on one screen, over a running `Client`.

`ChatView` shows the groups and messages and follows the client's events; this module adds what
the user does: the composer's commands, sent through the client (which queues while the link is
down), and the keys. The client is opened and closed by whoever runs the app (`meshchat chat`,
or a test).
"""

from __future__ import annotations

import logging
from typing import ClassVar, Final

from textual import on
from textual.binding import Binding, BindingType
from textual.widgets import Input, ListView

from cli.chatapp.commands import Command, CommandError, parse
from cli.chatapp.model import Entry
from cli.chatapp.view import ChatView
from cli.chatapp.widgets import GroupItem, HelpScreen, MessageItem, SearchScreen
from meshchat.client import StoredMessage, TransportState
from meshchat.e2ee import Kind
from meshchat.errors import MeshchatError, TopicError
from meshchat.topics import GroupTopic, parse_topic

__all__ = ["KEYS", "ChatApp"]

logger = logging.getLogger(__name__)

KEYS: Final = [
    ("ctrl+n / ctrl+p", "next / previous group"),
    ("ctrl+g", "next group with unread messages"),
    ("ctrl+f", "search"),
    ("ctrl+o", "acknowledge the urgent notice waiting for you"),
    (
        "pgup / pgdn",
        "scroll; at the top, pgup loads older messages (this device, then the archive)",
    ),
    ("esc", "pick a message: r reply, e edit, x recall, a ack, + react, i or esc back"),
    ("enter", "on a picked message: reply to it"),
    ("tab", "composer, messages and groups in turn"),
    ("f1", "this help"),
    ("ctrl+q", "quit"),
]
"""The keys, as the help screen lists them."""


class ChatApp(ChatView):
    """The terminal chat app: `ChatView` plus the composer's commands and the keys."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+n", "next_group", "Next group", priority=True),
        Binding("ctrl+p", "previous_group", "Previous group", show=False, priority=True),
        Binding("ctrl+g", "next_unread", "Unread", priority=True),
        Binding("ctrl+f", "search", "Search", priority=True),
        Binding("ctrl+o", "ack", "Acknowledge", show=False, priority=True),
        Binding("pageup", "older", "Older", show=False, priority=True),
        Binding("pagedown", "newer", "Newer", show=False, priority=True),
        Binding("f1", "help", "Help", priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    # ---------------------------------------------------------------------------- composer

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        """Send what was typed, or run the command."""
        event.stop()
        line = event.value
        if not line.strip():
            return
        try:
            await self.run_command(parse(line))
        except (CommandError, MeshchatError) as exc:
            self.notify(str(exc), title="not done", severity="error", markup=False)
            return
        event.input.value = ""

    async def run_command(self, command: Command) -> None:  # noqa: C901, PLR0912  # one per command
        """Carry out one composer line.

        Raises:
            CommandError: the command cannot apply here (the message says why).
            MeshchatError: the client refused (not a member, not the sender, too late).
        """
        match command.name:
            case "help":
                self.action_help()
            case "search":
                self._search(command)
            case "who":
                await self._show_who()
            case "join":
                await self._join(command.text)
            case "leave":
                self._membership("leave", command.text or self._group())
            case "react":
                group, target = self._react_target(command.ref)
                await self.client.react(group, target, command.text)
            case "dispatch":
                if self.client.session.keys.owner(command.device) is None:
                    raise CommandError(
                        f"unknown device {command.device!r}: no key record lists it "
                        "(`meshchat device list` shows the devices)"
                    )
                await self.client.send_order(command.device, command.text)
            case "say":
                group = self._group()
                outbox = await self.client.send(group, command.text)
                await self._queued(group, Kind.TEXT, command.text, outbox)
            case "urgent":
                group = self._group()
                outbox = await self.client.urgent(group, command.text)
                await self._queued(group, Kind.URGENT, command.text, outbox)
            case "reply":
                group, target = self._target(command.ref, mine=False, what="reply to")
                outbox = await self.client.reply(group, target, command.text)
                await self._queued(group, Kind.REPLY, command.text, outbox)
            case "edit":
                group, target = self._target(command.ref, mine=True, what="edit")
                await self.client.edit(group, target, command.text)
            case "recall":
                group, target = self._target(command.ref, mine=True, what="recall")
                await self.client.recall(group, target)
            case "ack":
                group, target = self._urgent_target(command.ref)
                await self.client.ack(group, target)

    def _group(self) -> str:
        if self.current is None:
            raise CommandError("open a group first: you are in none yet")
        return self.current

    async def _queued(self, group: str, kind: Kind, text: str, outbox: int) -> None:
        """Show our message at once, marked queued until the broker has it."""
        if group == self.current:
            entry = Entry(group, None, self.me, int(self._now()), kind, text, outbox_id=outbox)
            await self._append([entry])
            self.view.scroll_end(animate=False)

    def _target(self, ref: int | None, *, mine: bool, what: str) -> tuple[str, tuple[int, int]]:
        if ref is not None:
            found = self.numbers.find(ref)
            if found is None:
                raise CommandError(f"there is no message #{ref} on screen")
            return found
        group = self._group()
        for item in reversed(self.view.items()):
            entry = item.entry
            if entry.message_id is None or entry.unreadable or entry.recalled:
                continue
            if (entry.sender == self.me) == mine:
                return group, entry.message_id
        whose = "of yours " if mine else "from someone else "
        raise CommandError(f"no message {whose}in {group} to {what}; name one as #N")

    def _urgent_target(self, ref: int | None) -> tuple[str, tuple[int, int]]:
        if ref is not None:
            group, target = self._target(ref, mine=False, what="acknowledge")
            if self.client.store.unacknowledged(self._topic(group), target) is None:
                raise CommandError(f"#{ref} is not an urgent notice: there is nothing to ack")
            return group, target
        group = self._group()
        waiting = self.client.store.awaiting_ack(self._topic(group), self.me)
        if not waiting:
            raise CommandError(f"no urgent notice in {group} waits for your acknowledgement")
        return group, waiting[-1]

    def _react_target(self, ref: int | None) -> tuple[str, tuple[int, int]]:
        """#N, else the picked message, else the latest one in the open group."""
        if ref is not None:
            return self._target(ref, mine=False, what="react to")
        group = self._group()
        picked = self._picked()
        candidates = [picked] if picked is not None else []
        candidates += [item.entry for item in reversed(self.view.items())]
        for entry in candidates:
            if entry.message_id is not None and not entry.unreadable and not entry.recalled:
                return group, entry.message_id
        raise CommandError(f"no message in {group} to react to")

    async def _show_who(self) -> None:
        """The members and their presence; the line changes as people come and go."""
        group = self._group()
        roster = self.client.session.rosters.current(self._topic(group))
        self._who = await self._note(self.who_text(group))
        if roster is not None and self.client.state is TransportState.CONNECTED:
            # Their devices' presence is retained: it arrives at once and updates the line.
            self.run_worker(
                self._watch_presence(roster.members),
                name="meshchat[chat].presence",
                group="presence",
                exit_on_error=False,
            )

    async def _watch_presence(self, members: tuple[str, ...]) -> None:
        try:
            await self.client.watch_presence(members)
        except MeshchatError as exc:
            self.notify(f"presence is not available: {exc}", severity="warning", markup=False)

    async def _join(self, group: str) -> None:
        if group in self.client.groups:
            await self.open_group(group)
            return
        self._membership("join", group)

    def _membership(self, op: str, group: str) -> None:
        """Ask the directory to join or leave a group, without holding up the screen."""
        if op == "leave" and group not in self.client.groups:
            raise CommandError(f"{self.me} is not in {group}: there is nothing to leave")
        if self.client.state is not TransportState.CONNECTED:
            raise CommandError(f"offline: /{op} needs the directory; try again when connected")
        self.run_worker(
            self._change_membership(op, group),
            name="meshchat[chat].membership",
            group="dir",
            exit_on_error=False,
        )

    async def _change_membership(self, op: str, group: str) -> None:
        change = self.client.join if op == "join" else self.client.leave
        try:
            groups = await change(group)
        except MeshchatError as exc:
            self.notify(str(exc), title=f"/{op} {group}: not done", severity="error", markup=False)
            await self._note(f"/{op} {group} was refused: {exc}")
            return
        await self._set_groups(groups)
        if op == "join":
            if group in groups:
                await self.open_group(group)
            await self._note(f"You joined {group}.")
        else:
            await self._note(
                f"You left {group}. Its keys rotate before the next message: you cannot read "
                "what is said there from now on."
            )

    def _search(self, command: Command) -> None:
        now = self._now()
        since = None if command.since is None else now - command.since
        until = None if command.until is None else now - command.until
        try:
            found = self.client.store.search(command.text, since=since, until=until)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        results = [(_path(m.group_topic), m) for m in found]
        screen = SearchScreen(command.text, results, now=now, tz=self._tz)
        self.push_screen(screen, self._open_result)

    def _open_result(self, result: tuple[str, StoredMessage] | None) -> None:
        if result is not None:
            self.call_later(self._jump, *result)

    async def _jump(self, group: str, message: StoredMessage) -> None:
        if group not in self.group_list.groups:
            self.notify(
                f"{group} is no longer one of your groups", severity="warning", markup=False
            )
            return
        if group != self.current:
            await self.open_group(group)
        while message.message_id not in self._shown and self._more:
            await self._load_older()
        item = self._shown.get(message.message_id)
        if item is not None:
            view = self.view
            view.release_anchor()
            view.index = view.children.index(item)
            view.focus()

    # ----------------------------------------------------------------------------- actions

    async def action_next_group(self, step: int = 1) -> None:
        """Open the next group in the list."""
        groups = self.group_list.groups
        if not groups:
            return
        here = groups.index(self.current) if self.current in groups else -1
        await self.open_group(groups[(here + step) % len(groups)])

    async def action_previous_group(self) -> None:
        """Open the previous group in the list."""
        await self.action_next_group(-1)

    async def action_next_unread(self) -> None:
        """Open the next group with unread messages, mentions or urgent notices."""
        listed = self.group_list
        groups = listed.groups
        here = groups.index(self.current) if self.current in groups else -1
        for step in range(1, len(groups) + 1):
            group = groups[(here + step) % len(groups)]
            item = listed.item(group)
            if item is not None and (item.unread or item.mentions or item.urgent):
                if group != self.current:
                    await self.open_group(group)
                return
        self.notify("Nothing unread.")

    def action_search(self) -> None:
        """Start a search in the composer."""
        composer = self.composer
        composer.value = "/search "
        composer.cursor_position = len(composer.value)
        composer.focus()

    async def action_ack(self) -> None:
        """Acknowledge the latest urgent notice waiting for us."""
        try:
            await self.run_command(Command("ack"))
        except (CommandError, MeshchatError) as exc:
            self.notify(str(exc), title="not done", severity="warning", markup=False)

    async def action_older(self) -> None:
        """Scroll up a page; at the top, load older messages from this device's store."""
        view = self.view
        view.release_anchor()
        if view.scroll_y > 0:
            view.scroll_page_up(animate=False)
            return
        first = next(iter(view.items()), None)
        if await self._load_older() and first is not None:
            view.call_after_refresh(view.scroll_to_widget, first, animate=False, top=True)

    def action_newer(self) -> None:
        """Scroll down a page."""
        self.view.scroll_page_down(animate=False)

    def action_help(self) -> None:
        """Show every key and command."""
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(KEYS))

    def action_pick(self) -> None:
        """Move to the message list to pick a message."""
        view = self.view
        if view.items():
            view.focus()
            if view.index is None:
                view.index = len(view.children) - 1

    def action_write(self) -> None:
        """Back to the composer."""
        self.composer.focus()

    def _picked(self) -> Entry | None:
        child = self.view.highlighted_child
        if isinstance(child, MessageItem) and child.entry.number is not None:
            return child.entry
        return None

    def action_prefill(self, command: str) -> None:
        """Start a command about the picked message in the composer."""
        entry = self._picked()
        if entry is None:
            return
        composer = self.composer
        composer.value = f"/{command} #{entry.number} "
        if command == "edit" and not entry.recalled:
            composer.value += entry.body
        composer.cursor_position = len(composer.value)
        composer.focus()

    async def action_run(self, command: str) -> None:
        """Recall or acknowledge the picked message."""
        entry = self._picked()
        if entry is None:
            return
        try:
            await self.run_command(Command(command, ref=entry.number))
        except (CommandError, MeshchatError) as exc:
            self.notify(str(exc), title="not done", severity="error", markup=False)

    @on(ListView.Selected, "#groups")
    async def _group_chosen(self, event: ListView.Selected) -> None:
        if isinstance(event.item, GroupItem) and event.item.group != self.current:
            await self.open_group(event.item.group)
        self.composer.focus()

    @on(ListView.Selected, "#messages")
    def _message_chosen(self) -> None:
        self.action_prefill("reply")


def _path(topic: str) -> str:
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return topic
    return parsed.path if isinstance(parsed, GroupTopic) else topic
