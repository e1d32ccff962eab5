"""The receive path: route what arrives, feed it to the session, keep and report what it yields.

Every step the device session takes (a message, a roster, a key record, a page of history, the
client's own sealed message) goes through `Receiver.apply`: decrypted messages are kept in the
store and reported, the session's answers are published, and its state is saved.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import Callable
from typing import Final

from meshchat.client._membership import group_path
from meshchat.client._orders import WorkOrders
from meshchat.client._receipts import Receipts
from meshchat.client._saved import saving
from meshchat.client._services import Services
from meshchat.client._shared import Shared
from meshchat.client._watching import Watching
from meshchat.client.events import (
    AckStatus,
    Alarm,
    Mention,
    Message,
    SiteNotice,
    Unreadable,
)
from meshchat.e2ee import (
    Decrypted,
    Direct,
    Kind,
    OrgTrust,
    Refused,
    ReplayAlarm,
    Step,
    Undecryptable,
    Waiting,
    encode_inner,
)
from meshchat.e2ee.notice import NoticeError, verify_notice
from meshchat.envelope import Signed, decode
from meshchat.errors import EnvelopeError, MeshchatError, TopicError
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

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face

logger = logging.getLogger(__name__)

_MENTION: Final = re.compile(r"(?<![\w@])@([a-z0-9][a-z0-9-]{0,31})\b", re.IGNORECASE)


class Receiver:
    """Takes every message the transport delivers, and every step the session takes."""

    def __init__(
        self,
        shared: Shared,
        *,
        trust: OrgTrust,
        services: Services,
        watching: Watching,
        orders: WorkOrders,
        receipts: Receipts,
        roster_changed: asyncio.Event,
        recall_window: Callable[[], int],
    ) -> None:
        """Prepare; `recall_window` reads the client's setting (`Client.recall_window`)."""
        self._user, self._device, self._trust = shared.user, shared.device, trust
        self._session, self._store, self._transport = shared.session, shared.store, shared.transport
        self._emit = shared.emit
        self._outbox_changed, self._records_changed = shared.outbox_changed, shared.records_changed
        self._roster_changed = roster_changed
        self._services, self._watching = services, watching
        self._orders, self._receipts = orders, receipts
        self._recall_window = recall_window
        self.kept = 0
        """Messages kept so far (new to the store), a counter for history fetches."""

    async def run(self) -> None:
        """Handle every message the transport delivers, until cancelled."""
        async for message in self._transport.messages():
            try:
                self.dispatch(message.topic, message.payload)
            except (MeshchatError, sqlite3.Error) as exc:
                # Never stop reading: one bad message, or a store that another process holds
                # locked for too long, must not silence the client.
                logger.warning("could not handle a message on %s: %s", message.topic, exc)

    def dispatch(self, topic: str, payload: bytes) -> None:
        """Hand a message to whatever its topic is for."""
        try:
            parsed = parse_topic(topic)
        except TopicError:
            return
        match parsed:
            case RosterTopic():
                if payload:
                    self.apply(self._session.on_roster(parsed.group_topic.topic, payload))
                    self._outbox_changed.set()
                    self._roster_changed.set()
            case KeyTopic(user=user):
                if payload:
                    self.apply(self._session.on_key_record(user, payload))
                    self._records_changed.set()
            case InboxTopic():
                self._inbox(payload)
            case GroupTopic():
                self.apply(self._session.on_group_message(parsed.topic, payload))
            case ServiceTopic(reply=True):
                self._services.on_reply(payload)
            case TelemetryTopic() | PresenceTopic():
                self._watching.on_message(parsed, payload)

    def _inbox(self, payload: bytes) -> None:
        if _is_signed(payload):
            self._notice(payload)
        else:
            self.apply(self._session.on_inbox(payload))

    def _notice(self, payload: bytes) -> None:
        """A signed notice from a service (the geofence: "You joined the plant-3 channel")."""
        try:
            notice = verify_notice(self._trust, payload, device=self._device)
        except (NoticeError, EnvelopeError) as exc:
            self._emit(Alarm("a notice in this device's inbox", str(exc)))
            return
        self._emit(SiteNotice(group_path(notice.group_topic), notice.kind.value, notice.text))

    def apply(self, step: Step) -> None:
        """Keep what a step produced with the session state (one commit), then publish."""
        with saving(self._store, self._session):
            for event in step.events:
                self._record(event)
        for item in step.outgoing:
            self._transport.publish_nowait(item.topic, item.payload, retain=item.retain)

    def _record(self, event: object) -> None:
        match event:
            case Decrypted():
                self._keep(event)
            case Undecryptable() if self._store.has_message(event.group_topic, event.message_id):
                pass  # read before (a late copy of it, on a chain since forgotten): nothing new
            case Undecryptable():
                path = group_path(event.group_topic)
                self._store.add_notice(
                    event.group_topic, event.message_id, reason=event.reason, code=event.code
                )
                self._emit(Unreadable(path, event.message_id, event.reason, event.code))
            case ReplayAlarm():
                self._emit(
                    Alarm(
                        f"message {event.message_id} in {group_path(event.group_topic)}",
                        f"replayed with different content (claimed by {event.device})",
                    )
                )
            case Refused():
                logger.warning("refused %s: %s", event.what, event.reason)
                self._emit(Alarm(event.what, event.reason))
            case Direct() if event.inner.kind is Kind.TELEMETRY_KEY:
                self._watching.fleet.take_key(event.device, event.inner)
            case Direct():
                self._orders.take(event)
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
        new = self._store.add_message(
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
        self.kept += 1
        path = group_path(topic)
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
        original = self._store.message(topic, target)
        if original is None or original.sender != sender:
            return None
        return target if ts - original.ts <= self._recall_window() else None

    def _follow_up(self, event: Decrypted, path: str) -> None:
        """What a kind means beyond the message itself: reactions, receipts, acks, mentions."""
        inner, topic, sender = event.inner, event.group_topic, event.sender
        match inner.kind:
            case Kind.REACT:
                emoji = str(inner.fields[0])
                self._store.add_reaction(topic, _ref(inner.fields[1]), user=sender, emoji=emoji)
            case Kind.RECEIPT:
                kind, refs = inner.fields
                assert isinstance(kind, int)
                assert isinstance(refs, tuple)
                for ref in refs:
                    self._store.add_receipt(topic, _ref(ref), user=sender, kind=kind, at=inner.ts)
            case Kind.ACK:
                target = _ref(inner.fields[0])
                if self._store.add_ack(topic, target, user=sender, at=inner.ts):
                    missing = self._store.unacknowledged(topic, target)
                    if missing is not None:
                        self._emit(AckStatus(path, target, tuple(missing)))
            case Kind.URGENT:
                roster = self._session.rosters.current(topic)
                members = roster.members if roster else ()
                expected = [m for m in members if m != sender]
                self._store.add_urgent(topic, event.message_id, expected=expected)
        if inner.kind in {Kind.TEXT, Kind.REPLY, Kind.URGENT} and sender != self._user:
            self._receipts.note_delivered(topic, event.message_id)
            if self._mentions_me(topic, sender, str(inner.fields[0])):
                self._emit(Mention(path, event.message_id, sender, str(inner.fields[0])))

    def _mentions_me(self, topic: str, sender: str, text: str) -> bool:
        names = {match.lower() for match in _MENTION.findall(text)}
        if self._user in names:
            return True
        roster = self._session.rosters.current(topic)
        return "all" in names and roster is not None and sender in roster.announcers


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
