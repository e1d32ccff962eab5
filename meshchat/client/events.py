"""The events a `Client` reports, and one page of archived history.

`Client.events` yields messages read, messages that cannot be read (with the reason), alarms,
link, group and presence changes and work orders; `Client.fetch_history_page` returns a
`HistoryPage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from meshchat.client.dispatch import LedgerOrder
from meshchat.client.values import TransportState
from meshchat.e2ee import Kind

__all__ = [
    "AckStatus",
    "Alarm",
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

_TARGET_FIELD: Final = {Kind.REPLY: 1, Kind.EDIT: 1, Kind.REACT: 1, Kind.RECALL: 0, Kind.ACK: 0}
"""Where, in its fields, a kind about another message holds that message's id."""


@dataclass(frozen=True, slots=True)
class Message:
    """A message read in a group (or a direct message, then `group` is empty)."""

    group: str
    message_id: tuple[int, int]
    sender: str
    device: str
    kind: Kind
    ts: int
    fields: tuple[object, ...]
    history: bool = False

    @property
    def text(self) -> str:
        """The message's text (empty for kinds without one)."""
        first = self.fields[0] if self.fields else ""
        return first if isinstance(first, str) else ""

    @property
    def target(self) -> tuple[int, int] | None:
        """The (chain id, index) of the message a reply, edit, recall, reaction or ack is about.

        None for the other kinds, and for fields of the wrong shape.
        """
        at = _TARGET_FIELD.get(self.kind)
        if at is None or len(self.fields) <= at:
            return None
        match self.fields[at]:
            case (int(chain), int(index)):
                return (chain, index)
        return None


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A message that cannot be read, with the reason to show in its place."""

    group: str
    message_id: tuple[int, int]
    reason: str
    code: str


@dataclass(frozen=True, slots=True)
class Alarm:
    """Something was refused that the user should know about (forgery, replay, key change)."""

    what: str
    reason: str


@dataclass(frozen=True, slots=True)
class LinkChanged:
    """The link to the broker changed state; `queued` messages wait to go out."""

    state: TransportState
    queued: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Mention:
    """A message that mentions this user (or @all, from someone allowed to)."""

    group: str
    message_id: tuple[int, int]
    sender: str
    text: str


@dataclass(frozen=True, slots=True)
class AckStatus:
    """Someone acknowledged an urgent notice; `missing` have not yet."""

    group: str
    message_id: tuple[int, int]
    missing: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SiteNotice:
    """A verified notice from a service, e.g. "You joined the plant-3 channel"."""

    group: str
    kind: str
    text: str


@dataclass(frozen=True, slots=True)
class GroupsChanged:
    """The directory changed the groups this user is in."""

    groups: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OrderChanged:
    """A work order of this device was sent, received or answered; `order` is where it stands."""

    order: LedgerOrder


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    """A watched device (`watch_presence`) of `user` came online or went offline."""

    user: str
    device: str
    online: bool


ClientEvent = (
    Message
    | Unreadable
    | Alarm
    | LinkChanged
    | GroupsChanged
    | Mention
    | AckStatus
    | SiteNotice
    | OrderChanged
    | PresenceChanged
)


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of a group's history from the archiver (`Client.fetch_history_page`).

    Attributes:
        received: envelopes the page held.
        unseen: of those, how many this device had not read before (read now, waiting for
            their keys, or unreadable).
        new: messages read and kept here from it.
        cursor: what to pass for the next page; None when the archive holds nothing further.
    """

    received: int
    unseen: int
    new: int
    cursor: object
