"""The chat app's widgets: group list, message view, link status and banner, help and search."""

from __future__ import annotations

from datetime import tzinfo
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.visual import VisualType
from textual.widgets import Input, Label, ListItem, ListView, Static

from cli.chatapp.commands import COMMANDS
from cli.chatapp.model import Entry, render_entry, when
from meshchat.client import StoredMessage, TransportState

__all__ = [
    "Composer",
    "GroupItem",
    "GroupList",
    "HelpScreen",
    "LinkBanner",
    "LinkStatus",
    "MessageItem",
    "MessageView",
    "SearchScreen",
]

SIDEBAR_TEXT = 20
"""Columns of text in a group list line (the sidebar is 24 wide)."""


class GroupItem(ListItem):
    """One group in the list, with its unread, mention and urgent counts."""

    def __init__(self, group: str) -> None:
        """A line for `group` (``dept/name``)."""
        self._label = Label()
        super().__init__(self._label, classes="group")
        self.group = group
        self.unread = 0
        self.mentions = 0
        self.urgent = 0
        self.show()

    def show(self) -> None:
        """Redraw the line after a count changed."""
        badges = Text()
        if self.urgent:
            badges.append(f" !{self.urgent}", style="bold red")
        if self.mentions:
            badges.append(f" @{self.mentions}", style="bold yellow")
        if self.unread:
            badges.append(f" {self.unread}", style="bold")
        room = SIDEBAR_TEXT - len(badges.plain)
        name = self.group if len(self.group) <= room else self.group[: room - 1] + "…"
        line = Text(name, style="bold" if self.unread else "")
        line.append(" " * (room - len(name)))
        line.append_text(badges)
        self._label.update(line)
        self.set_class(bool(self.unread or self.mentions or self.urgent), "-unread")


class GroupList(ListView):
    """The user's groups; selecting one opens it."""

    def item(self, group: str) -> GroupItem | None:
        """The line of a group."""
        for child in self.children:
            if isinstance(child, GroupItem) and child.group == group:
                return child
        return None

    @property
    def groups(self) -> list[str]:
        """The groups listed, in order."""
        return [child.group for child in self.children if isinstance(child, GroupItem)]


class MessageItem(ListItem):
    """One entry of the message view; redrawn in place when the message changes."""

    def __init__(self, entry: Entry, *, me: str, now: float, tz: tzinfo | None) -> None:
        """A line for `entry`, as `me` sees it."""
        self._body = Static()
        super().__init__(self._body, classes="message")
        self.entry = entry
        self._me, self._now, self._tz = me, now, tz
        self.show()

    @property
    def body(self) -> VisualType:
        """What the line shows (available before the line is mounted)."""
        return self._body.content

    def show(self, entry: Entry | None = None, *, now: float | None = None) -> None:
        """Redraw, with a new version of the entry if given."""
        if entry is not None:
            self.entry = entry
        if now is not None:
            self._now = now
        self._body.update(render_entry(self.entry, me=self._me, now=self._now, tz=self._tz))
        self.set_class(self.entry.waits_for(self._me), "-urgent")
        self.set_class(bool(self.entry.unreadable or self.entry.note), "-note")
        self.set_class(self.entry.outbox_id is not None, "-queued")


class MessageView(ListView):
    """The messages of the open group, oldest at the top; older ones load on demand."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "app.prefill('reply')", "Reply"),
        Binding("e", "app.prefill('edit')", "Edit"),
        Binding("x", "app.run('recall')", "Recall"),
        Binding("a", "app.run('ack')", "Acknowledge"),
        Binding("plus", "app.prefill('react')", "React"),
        Binding("escape,i", "app.write", "Write"),
    ]

    def items(self) -> list[MessageItem]:
        """The message lines, top to bottom."""
        return [child for child in self.children if isinstance(child, MessageItem)]


class Composer(Input):
    """Where messages and commands are typed; Esc moves to the messages to pick one."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pick", "Pick a message", show=False),
    ]


class LinkStatus(Static):
    """The link's state and the outbox, always on screen (bottom of the sidebar)."""

    def show(self, state: TransportState, queued: int, urgent: int, waiting: str = "") -> None:
        """Redraw with the current numbers."""
        text = Text()
        match state:
            case TransportState.CONNECTED:
                text.append("● connected", style="bold green")
            case TransportState.CONNECTING | TransportState.NEW:
                text.append("◌ connecting…", style="bold yellow")
            case _:
                text.append("✕ offline", style="bold red")
        text.append(f"\n{queued} queued", style="yellow" if queued else "dim")
        if waiting:
            text.append(f"\n{waiting}", style="dim")
        if urgent:
            text.append(f"\n! {urgent} to acknowledge", style="bold red")
        self.update(text)


class LinkBanner(Static):
    """A banner across the screen while the link is down."""

    def show(self, state: TransportState, queued: int, reason: str = "") -> None:
        """Show or hide the banner for the link's state."""
        offline = state not in {TransportState.CONNECTED, TransportState.NEW}
        self.display = offline
        if not offline:
            return
        what = "connecting" if state is TransportState.CONNECTING else "OFFLINE"
        waiting = f"{queued} message{'' if queued == 1 else 's'} queued"
        self.update(
            Text(
                f"{what} · {waiting} · keep typing: messages go out when the link returns"
                + (f" · {reason}" if reason else "")
            )
        )


class HelpScreen(ModalScreen[None]):
    """Every key and command, on one screen."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,f1,question_mark", "dismiss", "Close"),
    ]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        """List `keys` as (key, what it does), then the composer's commands."""
        super().__init__()
        self._keys = keys

    def compose(self) -> ComposeResult:
        """A table of keys and one of commands."""
        keys = Table.grid(padding=(0, 2))
        for key, what in self._keys:
            keys.add_row(Text(key, style="bold"), what)
        commands = Table.grid(padding=(0, 2))
        for usage, what in COMMANDS.values():
            commands.add_row(Text(usage, style="bold"), what)
        with VerticalScroll(id="help"):
            yield Static(Text("Keys (Esc closes this help)", style="bold underline"))
            yield Static(keys)
            yield Static(Text("Commands, typed in the composer", style="bold underline"))
            yield Static(commands)

    async def action_dismiss(self, result: None = None) -> None:
        """Close the help."""
        self.dismiss(result)


class SearchScreen(ModalScreen[tuple[str, StoredMessage] | None]):
    """Search results; Enter opens the message's group, Esc closes."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(
        self,
        words: str,
        found: list[tuple[str, StoredMessage]],
        *,
        now: float,
        tz: tzinfo | None,
    ) -> None:
        """Show `found` as (group, message), oldest first."""
        super().__init__()
        self.words = words
        self.found = found
        self._now, self._tz = now, tz

    def compose(self) -> ComposeResult:
        """A title and the results."""
        count = len(self.found)
        with Vertical(id="search"):
            yield Static(
                Text(
                    f"{count} message{'' if count == 1 else 's'} with {self.words!r}",
                    style="bold",
                ),
                id="search-title",
            )
            items = [self._line(group, message) for group, message in self.found]
            yield ListView(*items, id="results")
            yield Static(Text("Enter opens the group, Esc closes.", style="dim"))

    def _line(self, group: str, message: StoredMessage) -> ListItem:
        text = Text()
        text.append(f"{group} ", style="bold")
        text.append(when(message.ts, now=self._now, tz=self._tz) + " ", style="dim")
        text.append(f"{message.sender}: ", style="bold")
        text.append(" ".join(message.body.split()))
        return ListItem(Label(text))

    def on_mount(self) -> None:
        """Start on the newest result."""
        results = self.query_one("#results", ListView)
        results.focus()
        if self.found:
            results.index = len(self.found) - 1

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        """Open the chosen result's group."""
        event.stop()
        self.dismiss(self.found[event.index])

    def action_close(self) -> None:
        """Close without choosing."""
        self.dismiss(None)

    @property
    def texts(self) -> list[str]:
        """The results' texts (what a test or a screen reader wants)."""
        return [message.body for _, message in self.found]
