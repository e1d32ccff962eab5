"""The chat app's picture of a group: entries built from the local store, and paging back.

Nothing here draws or waits: the app asks for entries, the widgets render them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Final

from rich.console import Group, RenderableType
from rich.markdown import Markdown
from rich.text import Text

from meshchat.client.dispatch import LedgerOrder
from meshchat.client.events import Message
from meshchat.client.presence import Seen
from meshchat.client.store import ClientStore, StoredMessage
from meshchat.device import OrderState
from meshchat.e2ee import Kind, decode_inner
from meshchat.errors import MeshchatError

__all__ = [
    "SHOWN",
    "Entry",
    "Numbers",
    "entries_of",
    "entry_of",
    "older",
    "order_line",
    "render_entry",
    "who_line",
]

SHOWN: Final = frozenset(
    {Kind.TEXT, Kind.REPLY, Kind.URGENT, Kind.FILE, Kind.WORKORDER, Kind.NOTICE}
)
"""Kinds that are a line of their own; the others change a line (edit, recall, react, ack)
or are bookkeeping (receipts, file chunks)."""
PAGE: Final = 500
_SUMMARY: Final = 40
_MARKUP: Final = re.compile(r"[*_`~]+|^#+ |^> ", re.MULTILINE)
"""Markdown's emphasis and block marks, dropped from one-line summaries."""
_COLOURS: Final = ("cyan", "green", "magenta", "yellow", "blue", "bright_cyan", "bright_green")


@dataclass(slots=True)
class Entry:
    """One line of the message view: a message, an unreadable one, or a note from the app.

    Attributes:
        group: the group (``dept/name``).
        message_id: the message's id; None for a message not sealed yet, and for notes.
        number: the short number (``#N``) commands use to name it.
        reply_to: for a reply, who wrote what it replies to, in short.
        missing: for an urgent notice, who has not acknowledged it (None: unknown).
        unreadable: why the message cannot be read (then nothing else is known).
        note: a line from the app itself (``/who``, ``/join``), never sent.
        outbox_id: for the user's own message, its outbox id while it waits to go out.
    """

    group: str
    message_id: tuple[int, int] | None
    sender: str = ""
    ts: int = 0
    kind: Kind = Kind.TEXT
    body: str = ""
    number: int | None = None
    edited: bool = False
    recalled: bool = False
    reply_to: str = ""
    reactions: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] | None = None
    unreadable: str = ""
    note: str = ""
    outbox_id: int | None = None

    def waits_for(self, user: str) -> bool:
        """Whether this is an urgent notice `user` still has to acknowledge."""
        return (
            self.kind is Kind.URGENT
            and not self.recalled
            and self.missing is not None
            and user in self.missing
        )


class Numbers:
    """Short numbers (``#N``) for messages, handed out as the app first shows them."""

    def __init__(self) -> None:
        """Start at #1."""
        self._numbers: dict[tuple[str, tuple[int, int]], int] = {}
        self._messages: list[tuple[str, tuple[int, int]]] = []

    def number(self, group: str, message_id: tuple[int, int]) -> int:
        """The message's number (a new one the first time)."""
        key = (group, message_id)
        found = self._numbers.get(key)
        if found is None:
            self._messages.append(key)
            found = self._numbers[key] = len(self._messages)
        return found

    def find(self, number: int) -> tuple[str, tuple[int, int]] | None:
        """(group, message id) of a number, if it was handed out."""
        if 1 <= number <= len(self._messages):
            return self._messages[number - 1]
        return None


def entry_of(
    store: ClientStore, group: str, topic: str, stored: StoredMessage, numbers: Numbers
) -> Entry:
    """The entry of a stored message, with its edits, recall, reactions and acknowledgements."""
    (entry,) = entries_of(store, group, topic, [stored], numbers)
    return entry


def entries_of(
    store: ClientStore,
    group: str,
    topic: str,
    messages: Sequence[StoredMessage],
    numbers: Numbers,
) -> list[Entry]:
    """The entries of stored messages (`entry_of`), in a few queries however many there are.

    What the entries need beyond the messages themselves (reactions, what the replies reply to,
    who has not acknowledged the urgent notices) is read for all of them at once.
    """
    events = [_event(group, stored) for stored in messages]
    ids = [stored.message_id for stored in messages]
    reactions = store.reactions_by_id(topic, ids)
    targets = {e.target for e in events if e.kind is Kind.REPLY and e.target is not None}
    originals = store.messages_by_id(topic, targets) if targets else {}
    urgent = [e.message_id for e in events if e.kind is Kind.URGENT]
    missing = store.unacknowledged_by_id(topic, urgent) if urgent else {}
    entries = []
    for stored, event in zip(messages, events, strict=True):
        entry = Entry(
            group,
            stored.message_id,
            stored.sender,
            stored.ts,
            event.kind,
            stored.body,
            numbers.number(group, stored.message_id),
            edited=stored.edited_at is not None,
            recalled=stored.recalled,
            reactions=reactions.get(stored.message_id, {}),
        )
        fields, target = event.fields, event.target
        if event.kind is Kind.REPLY and target is not None:
            original = originals.get(target)
            if original is None:
                entry.reply_to = "a message not on this device"
            else:
                number = numbers.number(group, target)
                text = "(recalled)" if original.recalled else _summary(original.body)
                entry.reply_to = f"#{number} {original.sender}: {text}"
        elif event.kind is Kind.FILE and len(fields) > 1:
            entry.body = f"file **{stored.body}** ({fields[1]} bytes)"
        elif event.kind is Kind.WORKORDER and len(fields) > 1:
            entry.body = f"work order **{stored.body}**: {fields[1]}"
        if event.kind is Kind.URGENT:
            entry.missing = missing.get(stored.message_id)
        entries.append(entry)
    return entries


def _event(group: str, stored: StoredMessage) -> Message:
    """A stored message as the client reported it (its fields decoded again)."""
    try:
        fields = decode_inner(stored.fields).fields
    except (MeshchatError, ValueError):
        fields = ()
    return Message(
        group, stored.message_id, stored.sender, stored.device, Kind(stored.kind), stored.ts, fields
    )


def _summary(text: str) -> str:
    line = " ".join(_MARKUP.sub("", text).split())
    return line if len(line) <= _SUMMARY else line[: _SUMMARY - 1] + "…"


def older(
    store: ClientStore,
    topic: str,
    *,
    until_ts: int | None,
    seen: set[tuple[int, int]],
    want: int,
) -> tuple[list[StoredMessage], bool]:
    """Up to `want` shown messages not in `seen`, sent at or before `until_ts`, oldest first.

    Receipts, reactions and acks share the store with the messages (often outnumbering them),
    so the store is read back in pages until enough messages are found.

    Returns:
        The messages, and whether older ones may remain.
    """
    known = set(seen)
    found: list[StoredMessage] = []
    until = None if until_ts is None else until_ts + 1
    while len(found) < want:
        batch = store.history(topic, until=until, limit=PAGE)
        new = [m for m in batch if m.message_id not in known]
        known.update(m.message_id for m in batch)
        found = [m for m in new if m.kind in SHOWN] + found
        if len(batch) < PAGE:
            return found[-want:], len(found) > want
        # One second may hold more than a page: step past it rather than loop on it.
        until = batch[0].ts + 1 if new else batch[0].ts
    return found[-want:], True


def order_line(order: LedgerOrder) -> str:
    """A work order's line in the message view: where it went, what, and where it stands."""
    what = f": {_summary(order.text)}" if order.text else ""
    if order.direction == "out":
        head = f"work order {order.order_id} to {order.device} ({order.user}){what}"
    else:
        head = f"work order {order.order_id} from {order.user} ({order.device}){what}"
    state = {
        OrderState.SENT: "sent, waiting for an answer",
        OrderState.RECEIVED: "received: answer with `meshchat dispatch answer`",
    }.get(order.state, order.state.value)
    reason = f" ({order.reason})" if order.reason else ""
    return f"{head} · {state}{reason}"


def who_line(seen: Seen, *, announcer: bool, now: float, tz: tzinfo | None) -> str:
    """One member in `/who`: presence, and when they were last seen."""
    if seen.online:
        state = "● online"
    elif seen.online is None:
        state = "? no device yet (never logged in)" if not seen.devices else "? not known yet"
    elif seen.last_seen is not None:
        state = f"○ offline, last seen {when(seen.last_seen, now=now, tz=tz)}"
    else:
        state = "○ offline"
    role = " (may post announcements)" if announcer else ""
    return f"  {seen.user}{role}: {state}"


def colour_of(user: str) -> str:
    """A stable colour for a user's name."""
    digest = hashlib.blake2b(user.encode("utf-8"), digest_size=1).digest()
    return _COLOURS[digest[0] % len(_COLOURS)]


def when(ts: float, *, now: float, tz: tzinfo | None) -> str:
    """A message's time: the hour today, else the date too."""
    at = datetime.fromtimestamp(ts, tz).astimezone(tz)
    today = datetime.fromtimestamp(now, tz).astimezone(tz).date()
    return at.strftime("%H:%M") if at.date() == today else at.strftime("%d %b %H:%M")


def render_entry(entry: Entry, *, me: str, now: float, tz: tzinfo | None) -> RenderableType:
    """What the message view shows for an entry."""
    if entry.note:
        return Text(entry.note, style="italic")
    head = _head(entry, now=now, tz=tz)
    if entry.unreadable:
        return head
    parts: list[RenderableType] = [head]
    if entry.reply_to:
        parts.append(Text(f"↪ {entry.reply_to}", style="dim italic"))
    if entry.recalled:
        parts.append(Text("message recalled", style="dim italic"))
    else:
        parts.append(Markdown(entry.body or " "))
    if entry.reactions:
        line = "  ".join(f"{emoji} {', '.join(users)}" for emoji, users in entry.reactions.items())
        parts.append(Text(line, style="dim"))
    if entry.kind is Kind.URGENT and not entry.recalled:
        parts.append(_urgent_line(entry, me))
    return Group(*parts)


def _head(entry: Entry, *, now: float, tz: tzinfo | None) -> Text:
    """Number, time and sender; or, for a message that cannot be read, why."""
    head = Text()
    if entry.number is not None:
        head.append(f"#{entry.number} ", style="dim")
    if entry.ts:
        head.append(when(entry.ts, now=now, tz=tz) + " ", style="dim")
    if entry.unreadable:
        head.append("cannot be read: ", style="bold")
        head.append(entry.unreadable, style="italic")
        return head
    head.append(entry.sender, style=f"bold {colour_of(entry.sender)}")
    if entry.kind is Kind.URGENT:
        head.append(" URGENT", style="bold red")
    if entry.edited and not entry.recalled:
        head.append(" (edited)", style="dim")
    if entry.outbox_id is not None:
        head.append(" queued", style="yellow")
    return head


def _urgent_line(entry: Entry, me: str) -> Text:
    missing = entry.missing
    if entry.sender == me:
        if missing is None:
            return Text("waiting for the group's roster", style="dim")
        if not missing:
            return Text("✓ acknowledged by everyone", style="green")
        return Text(f"not acknowledged: {', '.join(missing)}", style="bold yellow")
    if entry.waits_for(me):
        return Text(f"please acknowledge: ctrl+o, or /ack #{entry.number}", style="bold red")
    return Text("✓ you acknowledged", style="green")
