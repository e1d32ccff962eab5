"""One device's E2EE session: rosters, key records, chains, rotation, key requests, sans-IO.

`DeviceSession` is what a client feeds with everything that arrives (retained rosters and key
records, group messages, its inbox) and asks to encrypt; it answers with events to show and
envelopes to publish (`Step`). It does no IO: the client library owns the MQTT connection and
saves what changed after every step (`take_changes`, restored with `from_parts`); a device
keeps the whole state as one blob (`to_bytes`).

The rules it carries out (DESIGN.md section 5):

- Send only with a current, unexpired roster that lists this user. Before the next send, rotate
  (a new chain, distributed to every current device of every member) when a member left, one of a
  member's devices left its signed device list, the group policy changed, the chain is worn out
  (1000 messages or 7 days), or this device restarted: an outbound chain is never restored from
  a state file, so an index is never used twice.
- Adds do not rotate: a new member's devices, and a member's new device, get the current
  position of the sender's chain only.
- A message whose chain is unknown waits (bounded) for its distribution. When a distribution
  arrives at a later position than waiting messages, the session asks the chain's sender for the
  earlier keys (a key request). The sender shares them from the first message sent after the
  requester joined (the roster's ``issued_at``) and answers ``withheld`` for the rest: "sent
  before you joined", "you are not a member", "the sender no longer has this key".
- A distribution is accepted only from a current device of a current member of the group,
  signed by that device; a re-sent distribution at a later position never replaces an earlier
  one. Groups whose roster asks for compliance get one more copy per chain, sealed to the org
  compliance key and published on the group topic, where the archiver keeps it.
- Replays: an identical redelivery is dropped silently; a different envelope for a (chain,
  index) already read is a `ReplayAlarm`; re-reading history never alarms.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from meshchat.e2ee.chain import (
    ChainShare,
    InboundChain,
    OutboundChain,
    advance,
)
from meshchat.e2ee.distribution import open_distribution, seal_distribution
from meshchat.e2ee.keys import BoxKeyPair, SigningKeyPair
from meshchat.e2ee.pairwise import PairKind, WithheldReason, open_pairwise, seal_pairwise
from meshchat.e2ee.plaintext import Inner, decode_inner, encode_inner
from meshchat.e2ee.records import DeviceKeys, IdentityChangedError, KeyRecord, KeyRecordError
from meshchat.e2ee.roster import Roster, RosterError
from meshchat.e2ee.trust import OrgTrust
from meshchat.envelope import Distribution, GroupMessage, Sealed, Signed, decode, encode
from meshchat.errors import (
    DecryptError,
    DuplicateMessageError,
    E2EEError,
    EnvelopeError,
    ReplayError,
)
from meshchat.topics import InboxTopic

__all__ = [
    "COMPLIANCE_RECIPIENT",
    "MAX_PENDING",
    "MAX_READ_CHAINS",
    "MAX_RETIRED",
    "Decrypted",
    "DeviceSession",
    "Direct",
    "Event",
    "Outgoing",
    "Refused",
    "ReplayAlarm",
    "SessionChanges",
    "Step",
    "Undecryptable",
    "Waiting",
]

COMPLIANCE_RECIPIENT: Final = "compliance"
"""The recipient name a chain's compliance copy is sealed for."""
MAX_PENDING: Final = 5000
"""Messages waiting for a key, over all chains; the oldest give up first."""
MAX_PENDING_INBOX: Final = 1000
"""Inbox payloads waiting for a roster or key record."""
MAX_SENT_CHAINS: Final = 64
"""Own retired chains per group kept to answer key requests."""
MAX_RETIRED: Final = 20_000
"""Forgotten chains remembered by id only (a few dozen bytes each), so a replayed distribution
cannot bring one back and push out a chain still in use; the oldest ids go first."""
MAX_READ_CHAINS: Final = MAX_SENT_CHAINS
"""Chains of one sender device per group a reader keeps (their seen sets and skipped keys);
the oldest is forgotten when a newer one arrives. Its sender keeps no more to answer for."""
MAX_ANSWERED: Final = 10_000


@dataclass(frozen=True, slots=True)
class SessionChanges:
    """What to save of a session's state (`DeviceSession.take_changes`).

    Attributes:
        parts: the parts to write, by name.
        deleted: the names of saved parts to remove (own chains retired).
        whole: `parts` is the whole state: any other part saved before is stale; remove it.
    """

    parts: dict[str, bytes]
    deleted: frozenset[str]
    whole: bool


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An envelope to publish (QoS 1)."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Decrypted:
    """A group message read: sender user and device, id (chain, index), content."""

    group_topic: str
    sender: str
    device: str
    message_id: tuple[int, int]
    inner: Inner
    history: bool = False


@dataclass(frozen=True, slots=True)
class Waiting:
    """A message arrived before its key; it is kept and read when the key comes."""

    group_topic: str
    message_id: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Undecryptable:
    """A message that will not be read, and why (shown instead of "unable to decrypt")."""

    group_topic: str
    message_id: tuple[int, int]
    reason: str
    code: str


@dataclass(frozen=True, slots=True)
class ReplayAlarm:
    """A different envelope claims a message id that was already read: someone replays."""

    group_topic: str
    message_id: tuple[int, int]
    device: str


@dataclass(frozen=True, slots=True)
class Direct:
    """A direct (pairwise) message."""

    sender: str
    device: str
    inner: Inner


@dataclass(frozen=True, slots=True)
class Refused:
    """Something security-relevant was refused (a forged roster, an identity key change, ...)."""

    what: str
    reason: str


Event = Decrypted | Waiting | Undecryptable | ReplayAlarm | Direct | Refused


@dataclass(slots=True)
class Step:
    """What one input produced: events for the user, envelopes to publish."""

    events: list[Event] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)

    def extend(self, other: Step) -> None:
        """Append another step's results."""
        self.events.extend(other.events)
        self.outgoing.extend(other.outgoing)


@dataclass(slots=True)
class SentChain:
    """An own chain, current or retired: enough to answer key requests for it."""

    group_topic: str
    chain_id: int
    verify_key: bytes
    start_key: bytes = field(repr=False)
    sent_at: list[int] = field(default_factory=list)

    def share_at(self, index: int) -> ChainShare:
        """The chain's position `index`."""
        return ChainShare(self.chain_id, index, advance(self.start_key, index), self.verify_key)


class DeviceSession:
    """The E2EE state of one device of one user, driven by what arrives and what is sent."""

    def __init__(
        self,
        *,
        trust: OrgTrust,
        user: str,
        device: str,
        signing: SigningKeyPair,
        box: BoxKeyPair,
    ) -> None:
        """A fresh session: no rosters, records or chains yet.

        Args:
            trust: the org's verified trust bundle.
            user: this device's user.
            device: this device's name (its inbox is ``mc/{org}/_d/{device}``).
            signing: this device's Ed25519 key.
            box: this device's X25519 key.
        """
        self.trust = trust
        self.org = trust.org
        self.user = user
        self.device = device
        self.signing = signing
        self.box = box
        self.rosters = trust.roster_tracker()
        self.keys = trust.key_directory()
        self._since: dict[str, dict[str, int]] = {}
        self._outbound: dict[str, OutboundChain] = {}
        self._rotate: set[str] = set()
        self._sent: dict[tuple[str, int], SentChain] = {}
        self._inbound: dict[tuple[str, int], InboundChain] = {}
        self._pending: OrderedDict[tuple[str, int, int], tuple[bytes, bool]] = OrderedDict()
        self._pending_inbox: list[bytes] = []
        self._requested: dict[tuple[str, int], int] = {}
        self._answered: OrderedDict[tuple[str, str, int, int], None] = OrderedDict()
        self._revoked: set[str] = set()
        # What changed since `take_changes` last ran (everything, for a session never saved).
        self._all_changed = True
        self._changed: set[str] = set()
        self._changed_chains: set[tuple[str, int]] = set()
        self._changed_sent: set[tuple[str, int]] = set()
        self._deleted: set[str] = set()
        self._retired: OrderedDict[tuple[str, int], None] = OrderedDict()

    # ---------------------------------------------------------------- inputs: rosters, records

    def on_roster(self, group_topic: str, envelope: Signed | bytes) -> Step:
        """A roster (payload or decoded envelope) arrived on `group_topic`'s roster topic.

        Removals and policy changes mark the group for rotation before the next send; added
        members' devices get the current position of this device's chain.
        """
        step = Step()
        before = self.rosters.current(group_topic)
        try:
            roster = self.rosters.accept(_signed(envelope), arrived_on=group_topic)
        except (RosterError, EnvelopeError) as exc:
            step.events.append(Refused(f"roster of {group_topic}", str(exc)))
            return step
        if before is not None and roster == before:
            return step
        self._changed.add(ROSTERS_PART)
        since = self._since.setdefault(group_topic, {})
        if before is None:
            for member in roster.members:
                since.setdefault(member, 0)
            added: set[str] = set()
        else:
            added = set(roster.members) - set(before.members)
            removed = set(before.members) - set(roster.members)
            for member in added:
                since[member] = roster.issued_at
            for member in removed:
                since.pop(member, None)
            if removed or roster.policy != before.policy or roster.compliance != before.compliance:
                self._rotate.add(group_topic)
        if self.user not in roster.members:
            self._outbound.pop(group_topic, None)
        elif added:
            step.outgoing.extend(self._share_current(group_topic, self.keys.devices_of(added)))
        step.extend(self._retry_inbox())
        return step

    def on_key_record(self, user: str, envelope: Signed | bytes) -> Step:
        """A key record arrived on ``_k/{user}``.

        A device that left the list makes every group the user is in rotate; a new device gets
        the current position of this device's chains in those groups.
        """
        step = Step()
        before = self.keys.record(user)
        try:
            record = self.keys.accept(_signed(envelope), arrived_on_user=user)
        except IdentityChangedError as exc:
            step.events.append(Refused(f"key record of {user}", str(exc)))
            return step
        except (KeyRecordError, EnvelopeError) as exc:
            step.events.append(Refused(f"key record of {user}", str(exc)))
            return step
        if before == record:
            return step  # the retained record again (every reconnect): nothing changed
        self._changed.add(RECORDS_PART)
        old = {d.name: d for d in before.devices} if before else {}
        new = {d.name: d for d in record.devices}
        gone = [name for name, keys in old.items() if new.get(name) != keys]
        arrived = [keys for name, keys in new.items() if old.get(name) != keys]
        self._revoked.update(name for name in gone if name not in new)
        self._revoked.difference_update(new)
        for group_topic in self._groups_of(user):
            if gone:
                self._rotate.add(group_topic)
            if arrived:
                step.outgoing.extend(self._share_current(group_topic, arrived))
        step.extend(self._retry_inbox())
        return step

    def _groups_of(self, user: str) -> list[str]:
        return [topic for topic, roster in self.rosters.rosters.items() if user in roster.members]

    # ---------------------------------------------------------------------------- sending

    def may_send(self, group_topic: str, *, now: float) -> str | None:
        """None when this device may send to the group now, else why not (one line)."""
        roster = self.rosters.current(group_topic)
        if roster is None:
            return f"no roster of {group_topic} has arrived yet"
        if now >= roster.expires_at:
            return f"the roster of {group_topic} expired; waiting for a fresh one"
        if self.user not in roster.members:
            return f"{self.user} is not a member of {group_topic}"
        if roster.announcement and self.user not in roster.announcers:
            allowed = ", ".join(roster.announcers) or "nobody"
            return f"{group_topic} is an announcement channel: only {allowed} may post"
        return None

    def encrypt(self, group_topic: str, inner: Inner, *, now: float) -> list[Outgoing]:
        """Encrypt one message, rotating first when due; returns what to publish, in order.

        Distributions of a new chain come first, then its compliance copy, then the message.

        Raises:
            RosterError: no current roster, it expired, or this user is not a member.
        """
        why_not = self.may_send(group_topic, now=now)
        if why_not is not None:
            raise RosterError(f"cannot send: {why_not}")
        outgoing: list[Outgoing] = []
        chain = self._outbound.get(group_topic)
        if chain is None or group_topic in self._rotate or chain.needs_rotation(now=now):
            chain = self._new_chain(group_topic, now, outgoing)
        envelope = chain.encrypt(group_topic, encode_inner(inner))
        self._sent[(group_topic, chain.chain_id)].sent_at.append(int(now))
        self._changed_sent.add((group_topic, chain.chain_id))
        outgoing.append(Outgoing(group_topic, encode(envelope)))
        return outgoing

    def _new_chain(self, group_topic: str, now: float, outgoing: list[Outgoing]) -> OutboundChain:
        roster = self.rosters.current(group_topic)
        assert roster is not None
        chain = OutboundChain.new(now=now)
        while (group_topic, chain.chain_id) in self._sent:
            chain = OutboundChain.new(now=now)
        share = chain.share()
        self._outbound[group_topic] = chain
        self._rotate.discard(group_topic)
        self._sent[(group_topic, chain.chain_id)] = SentChain(
            group_topic, chain.chain_id, share.verify_key, share.chain_key
        )
        self._changed_sent.add((group_topic, chain.chain_id))
        self._retire_old_chains(group_topic)
        # Own messages come back on the subscription: read them like anyone's.
        self._inbound[(group_topic, chain.chain_id)] = InboundChain.from_share(
            share, sender=self.device
        )
        self._changed_chains.add((group_topic, chain.chain_id))
        self._retire_read_chains(group_topic, self.device)
        outgoing.extend(self._distribute(group_topic, share, self.keys.devices_of(roster.members)))
        if roster.compliance and self.trust.compliance is not None:
            copy = seal_distribution(
                sender=self.device,
                device_key=self.signing,
                group_topic=group_topic,
                share=share,
                recipients={COMPLIANCE_RECIPIENT: self.trust.compliance.public},
            )[COMPLIANCE_RECIPIENT]
            outgoing.append(Outgoing(group_topic, encode(copy)))
        return chain

    def _retire_old_chains(self, group_topic: str) -> None:
        mine = [key for key in self._sent if key[0] == group_topic]
        for key in mine[:-MAX_SENT_CHAINS]:
            del self._sent[key]
            self._changed_sent.discard(key)
            self._deleted.add(sent_part(*key))

    def _retire_read_chains(self, group_topic: str, sender: str) -> None:
        """Forget the oldest chains of one sender in a group beyond `MAX_READ_CHAINS`."""
        self._retire(
            [
                key
                for key, c in self._inbound.items()
                if key[0] == group_topic and c.sender == sender
            ]
        )

    def _retire_all_read_chains(self) -> None:
        """`_retire_read_chains` for every sender and group at once (one pass over the chains)."""
        by_sender: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for key, chain in self._inbound.items():
            by_sender.setdefault((key[0], chain.sender), []).append(key)
        for keys in by_sender.values():
            self._retire(keys)

    def _retire(self, theirs: list[tuple[str, int]]) -> None:
        """Forget the oldest of one sender's chains in one group (`theirs`, oldest first)."""
        for key in theirs[:-MAX_READ_CHAINS]:
            del self._inbound[key]
            self._requested.pop(key, None)
            self._changed_chains.discard(key)
            self._deleted.add(chain_part(*key))
            self._retired[key] = None
            self._changed.add(RETIRED_PART)
            # What waited for the chain's earlier keys never will be read now.
            for waiting in [k for k in self._pending if k[:2] == key]:
                del self._pending[waiting]
        while len(self._retired) > MAX_RETIRED:
            self._retired.popitem(last=False)

    def _distribute(
        self, group_topic: str, share: ChainShare, devices: Iterable[DeviceKeys]
    ) -> list[Outgoing]:
        recipients = {d.name: d.box for d in devices if d.name != self.device}
        if not recipients:
            return []
        copies = seal_distribution(
            sender=self.device,
            device_key=self.signing,
            group_topic=group_topic,
            share=share,
            recipients=recipients,
        )
        return [
            Outgoing(InboxTopic(self.org, name).topic, encode(copy))
            for name, copy in copies.items()
        ]

    def _share_current(self, group_topic: str, devices: Iterable[DeviceKeys]) -> list[Outgoing]:
        """Adds do not rotate: new devices get the current position of this device's chain."""
        chain = self._outbound.get(group_topic)
        if chain is None or group_topic in self._rotate:
            return []
        return self._distribute(group_topic, chain.share(), devices)

    # -------------------------------------------------------------------------- receiving

    def on_group_message(self, group_topic: str, payload: bytes, *, history: bool = False) -> Step:
        """A group message arrived (live, or re-read from the archive with `history`)."""
        step = Step()
        try:
            envelope = decode(payload)
        except EnvelopeError as exc:
            step.events.append(Refused(f"message on {group_topic}", str(exc)))
            return step
        if isinstance(envelope, Distribution):
            return step  # a compliance copy, kept by the archiver; not for members
        if not isinstance(envelope, GroupMessage):
            step.events.append(Refused(f"message on {group_topic}", "not a group message envelope"))
            return step
        return self._read(group_topic, envelope, payload, history=history)

    def _read(
        self,
        group_topic: str,
        envelope: GroupMessage,
        payload: bytes,
        *,
        history: bool,
    ) -> Step:
        step = Step()
        message_id = (envelope.chain_id, envelope.index)
        chain = self._inbound.get((group_topic, envelope.chain_id))
        if chain is None:
            step.events.append(self._unknown_chain(group_topic, envelope, payload, history))
            return step
        try:
            plaintext = chain.decrypt(group_topic, envelope, history=history)
            # Read: the chain moved on (a refused message leaves it as it was).
            self._changed_chains.add((group_topic, envelope.chain_id))
            inner = decode_inner(plaintext)
        except DuplicateMessageError:
            return step
        except ReplayError:
            step.events.append(ReplayAlarm(group_topic, message_id, chain.sender))
            return step
        except DecryptError as exc:
            if exc.reason == "key-unavailable" and envelope.index < chain.start_index:
                self._wait(group_topic, envelope, payload, history)
                step.events.append(Waiting(group_topic, message_id))
                step.outgoing.extend(self._request(group_topic, chain, envelope.index))
            else:
                step.events.append(Undecryptable(group_topic, message_id, str(exc), exc.reason))
            return step
        except EnvelopeError as exc:
            step.events.append(Undecryptable(group_topic, message_id, str(exc), "malformed"))
            return step
        owner = self.keys.owner(chain.sender)
        sender = self.user if chain.sender == self.device else owner[0] if owner else "?"
        step.events.append(Decrypted(group_topic, sender, chain.sender, message_id, inner, history))
        return step

    def _unknown_chain(
        self, group_topic: str, envelope: GroupMessage, payload: bytes, history: bool
    ) -> Event:
        """A message of a chain this device holds no key for: it waits, or was forgotten."""
        message_id = (envelope.chain_id, envelope.index)
        if (group_topic, envelope.chain_id) in self._retired:
            return Undecryptable(
                group_topic,
                message_id,
                f"its chain is older than the {MAX_READ_CHAINS} newest of its sender's chains "
                "this device keeps",
                "forgotten",
            )
        self._wait(group_topic, envelope, payload, history)
        return Waiting(group_topic, message_id)

    def _wait(
        self, group_topic: str, envelope: GroupMessage, payload: bytes, history: bool
    ) -> None:
        self._pending[(group_topic, envelope.chain_id, envelope.index)] = (payload, history)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def _request(self, group_topic: str, chain: InboundChain, index: int) -> list[Outgoing]:
        """Ask the chain's sender for keys from `index` on (once per lower bound)."""
        asked = self._requested.get((group_topic, chain.chain_id))
        if asked is not None and asked <= index:
            return []
        owner = self.keys.owner(chain.sender)
        if owner is None:
            return []
        self._requested[(group_topic, chain.chain_id)] = index
        sealed = seal_pairwise(
            sender=self.device,
            sender_key=self.signing,
            recipient=chain.sender,
            recipient_box=owner[1].box,
            kind=PairKind.KEY_REQUEST,
            fields=(group_topic, chain.chain_id, index),
        )
        return [Outgoing(InboxTopic(self.org, chain.sender).topic, encode(sealed))]

    # ------------------------------------------------------------------------------ inbox

    def on_inbox(self, payload: bytes) -> Step:
        """Something arrived in this device's inbox: a distribution or a pairwise payload."""
        step = Step()
        try:
            envelope = decode(payload)
        except EnvelopeError as exc:
            step.events.append(Refused("inbox payload", str(exc)))
            return step
        if isinstance(envelope, Distribution):
            return self._install(envelope, payload)
        if isinstance(envelope, Sealed):
            return self._pairwise(envelope, payload)
        step.events.append(Refused("inbox payload", "not a distribution or a sealed payload"))
        return step

    def _park(self, payload: bytes) -> None:
        """Keep an inbox payload until the roster or key record it needs arrives."""
        if payload not in self._pending_inbox:
            self._pending_inbox.append(payload)
            del self._pending_inbox[:-MAX_PENDING_INBOX]

    def _retry_inbox(self) -> Step:
        step = Step()
        parked, self._pending_inbox = self._pending_inbox, []
        for payload in parked:
            step.extend(self.on_inbox(payload))
        return step

    def _unknown_sender(self, sender: str, payload: bytes, what: str) -> Step:
        """A payload from a device no current key record lists: revoked, or not known yet."""
        step = Step()
        if sender in self._revoked:
            step.events.append(Refused(f"{what} from {sender}", f"device {sender} was revoked"))
        else:
            self._park(payload)
        return step

    def _install(self, envelope: Distribution, payload: bytes) -> Step:
        step = Step()
        owner = self.keys.owner(envelope.sender)
        if owner is None:
            return self._unknown_sender(envelope.sender, payload, "distribution")
        user, keys = owner
        try:
            received = open_distribution(
                envelope,
                org=self.org,
                recipient=self.device,
                box_key=self.box,
                sender_key=keys.signing,
            )
        except (DecryptError, EnvelopeError) as exc:
            step.events.append(Refused(f"distribution from {envelope.sender}", str(exc)))
            return step
        group_topic = received.group_topic
        roster = self.rosters.current(group_topic)
        if roster is None:
            self._park(payload)
            return step
        reason = (
            self._take_share(group_topic, envelope.sender, received.share)
            if user in roster.members
            else f"{user} is not a member of {group_topic}"
        )
        if reason is not None:
            step.events.append(Refused(f"distribution from {envelope.sender}", reason))
            return step
        return self._drain(group_topic, received.share.chain_id)

    def _take_share(self, group_topic: str, sender: str, share: ChainShare) -> str | None:
        """Install a verified share; None when taken, else why it was refused."""
        key = (group_topic, share.chain_id)
        if key in self._retired:
            return f"chain {share.chain_id} was forgotten here (a replayed distribution)"
        chain = self._inbound.get(key)
        if chain is None:
            self._inbound[key] = InboundChain.from_share(share, sender=sender)
            self._changed_chains.add(key)
            self._retire_read_chains(group_topic, sender)
            return None
        if chain.sender != sender:
            return f"chain {share.chain_id} belongs to {chain.sender}"
        try:
            if chain.extend_back(share):
                self._changed_chains.add(key)
        except DecryptError as exc:
            return str(exc)
        return None

    def _drain(self, group_topic: str, chain_id: int) -> Step:
        """Read the messages of a chain that were waiting for its key."""
        step = Step()
        waiting = sorted(
            (key, value)
            for key, value in self._pending.items()
            if key[0] == group_topic and key[1] == chain_id
        )
        for key, (payload, history) in waiting:
            del self._pending[key]
            step.extend(self.on_group_message(group_topic, payload, history=history))
        # Messages still waiting were re-queued by `_read`, which also asked for their keys.
        step.events = [
            event
            for event in step.events
            if not (isinstance(event, Waiting) and event.message_id[0] == chain_id)
        ]
        return step

    def _pairwise(self, envelope: Sealed, payload: bytes) -> Step:
        step = Step()
        owner = self.keys.owner(envelope.sender)
        if owner is None:
            return self._unknown_sender(envelope.sender, payload, "payload")
        user, keys = owner
        try:
            opened = open_pairwise(
                envelope, recipient=self.device, box_key=self.box, sender_key=keys.signing
            )
        except (DecryptError, EnvelopeError) as exc:
            step.events.append(Refused(f"payload from {envelope.sender}", str(exc)))
            return step
        match opened.kind, opened.fields:
            case PairKind.KEY_REQUEST, (str(group_topic), int(chain_id), int(first)):
                step.outgoing.extend(
                    self._answer(
                        user=user,
                        device=envelope.sender,
                        box=keys.box,
                        group_topic=group_topic,
                        chain_id=chain_id,
                        first=first,
                    )
                )
            case PairKind.WITHHELD, (
                str(group_topic),
                int(chain_id),
                int(first),
                int(end),
                str(reason),
            ):
                step.events.extend(
                    self._withheld(envelope.sender, group_topic, (chain_id, first, end), reason)
                )
            case PairKind.DIRECT, (bytes(raw),):
                try:
                    step.events.append(Direct(user, envelope.sender, decode_inner(raw)))
                except EnvelopeError as exc:
                    step.events.append(Refused(f"direct message from {user}", str(exc)))
        return step

    def _withheld(
        self, device: str, group_topic: str, span: tuple[int, int, int], reason: str
    ) -> list[Event]:
        chain_id, first, end = span
        chain = self._inbound.get((group_topic, chain_id))
        if chain is None or chain.sender != device:
            return []  # only the chain's own sender may say why its keys are withheld
        events: list[Event] = []
        for key in sorted(self._pending):
            if key[0] == group_topic and key[1] == chain_id and first <= key[2] < end:
                del self._pending[key]
                events.append(Undecryptable(group_topic, (chain_id, key[2]), reason, "withheld"))
        return events

    def _answer(
        self,
        *,
        user: str,
        device: str,
        box: bytes,
        group_topic: str,
        chain_id: int,
        first: int,
    ) -> list[Outgoing]:
        """Answer a key request: share what the requester is entitled to, withhold the rest."""
        marker = (device, group_topic, chain_id, first)
        if marker in self._answered:
            return []
        self._answered[marker] = None
        while len(self._answered) > MAX_ANSWERED:
            self._answered.popitem(last=False)
        roster = self.rosters.current(group_topic)
        if roster is None or user not in roster.members:
            return self._withhold(
                device=device,
                box=box,
                group_topic=group_topic,
                chain_id=chain_id,
                first=first,
                reason=WithheldReason.NOT_MEMBER,
            )
        sent = self._sent.get((group_topic, chain_id))
        if sent is None:
            return self._withhold(
                device=device,
                box=box,
                group_topic=group_topic,
                chain_id=chain_id,
                first=first,
                reason=WithheldReason.UNAVAILABLE,
            )
        if first >= len(sent.sent_at):
            return []  # nothing sent there yet
        joined = self._since.get(group_topic, {}).get(user, 0)
        entitled = next(
            (i for i in range(first, len(sent.sent_at)) if sent.sent_at[i] >= joined), None
        )
        outgoing: list[Outgoing] = []
        if entitled is None or entitled > first:
            end = len(sent.sent_at) if entitled is None else entitled
            outgoing.extend(
                self._withhold(
                    device=device,
                    box=box,
                    group_topic=group_topic,
                    chain_id=chain_id,
                    first=first,
                    reason=WithheldReason.BEFORE_JOIN,
                    end=end,
                )
            )
        if entitled is not None:
            share = sent.share_at(entitled)
            copies = seal_distribution(
                sender=self.device,
                device_key=self.signing,
                group_topic=group_topic,
                share=share,
                recipients={device: box},
            )
            outgoing.append(Outgoing(InboxTopic(self.org, device).topic, encode(copies[device])))
        return outgoing

    def _withhold(
        self,
        *,
        device: str,
        box: bytes,
        group_topic: str,
        chain_id: int,
        first: int,
        reason: WithheldReason,
        end: int = 2**32 - 1,
    ) -> list[Outgoing]:
        sealed = seal_pairwise(
            sender=self.device,
            sender_key=self.signing,
            recipient=device,
            recipient_box=box,
            kind=PairKind.WITHHELD,
            fields=(group_topic, chain_id, first, end, reason.value),
        )
        return [Outgoing(InboxTopic(self.org, device).topic, encode(sealed))]

    # ----------------------------------------------------------------------------- direct

    def seal_direct(self, user: str, inner: Inner) -> list[Outgoing]:
        """A direct message to every current device of `user` (and this user's other devices).

        Raises:
            E2EEError: no key record of `user` has arrived.
        """
        record = self.keys.record(user)
        if record is None:
            raise E2EEError(f"no key record of {user} has arrived yet")
        devices = list(record.devices)
        own = self.keys.record(self.user)
        if own is not None and user != self.user:
            devices.extend(own.devices)
        raw = encode_inner(inner)
        return [
            Outgoing(
                InboxTopic(self.org, device.name).topic,
                encode(
                    seal_pairwise(
                        sender=self.device,
                        sender_key=self.signing,
                        recipient=device.name,
                        recipient_box=device.box,
                        kind=PairKind.DIRECT,
                        fields=(raw,),
                    )
                ),
            )
            for device in devices
            if device.name != self.device
        ]

    # ------------------------------------------------------------------------ inspection

    @property
    def pending(self) -> int:
        """How many messages wait for a key."""
        return len(self._pending)

    def outbound_chain(self, group_topic: str) -> tuple[int, int] | None:
        """(chain id, next index) of this device's current chain in a group."""
        chain = self._outbound.get(group_topic)
        return None if chain is None else (chain.chain_id, chain.index)

    def rotation_due(self, group_topic: str) -> bool:
        """Whether the next send to the group starts a new chain."""
        return group_topic in self._rotate or group_topic not in self._outbound

    # ----------------------------------------------------------------------- persistence

    def to_bytes(self) -> bytes:
        """The session's state, to keep in the device's key store (it holds chain keys).

        Outbound chains are saved only as what answers key requests: a restored session
        always starts a new chain before it sends, so no index is ever used twice.
        """
        return _pack(
            _full_state(
                [_PARTS_VERSION, self.user, self.device, *self._core_state()],
                self._records_state(),
                self._rosters_state(),
                [_sent_state(sent) for sent in self._sent.values()],
                [self._chain_state(key, chain) for key, chain in self._inbound.items()],
            )
        )

    def take_changes(self) -> SessionChanges:
        """What changed in the state since the last call, to save (`from_parts`).

        A long-running client saves after every step. The whole state grows with every chain
        it ever read (each keeps its seen set) and every chain it sent on (each keeps its send
        times), so it saves in parts instead: the small core always, key records and rosters
        when they changed, and only the chains a step touched. The first call after creating a
        session or `from_bytes`, and the first after `mark_all_changed`, returns the whole
        state. Part names are ``core``, ``records``, ``rosters``, ``chain:GROUP:CHAIN_ID``
        (chains read) and ``sent:GROUP:CHAIN_ID`` (own chains, kept to answer key requests).

        If saving the changes fails, call `mark_all_changed` so the next save is whole.
        """
        whole = self._all_changed
        core = [_PARTS_VERSION, self.user, self.device, *self._core_state()]
        parts: dict[str, bytes] = {CORE_PART: _pack(core)}
        if whole or RECORDS_PART in self._changed:
            parts[RECORDS_PART] = _pack(self._records_state())
        if whole or ROSTERS_PART in self._changed:
            parts[ROSTERS_PART] = _pack(self._rosters_state())
        if whole or RETIRED_PART in self._changed:
            parts[RETIRED_PART] = _pack([[g, c] for g, c in self._retired])
        # Parts in the order their chains arrived (oldest first), as `from_parts` gets them
        # back: which chains retire first depends on it.
        for key in _in_order(self._inbound, None if whole else self._changed_chains):
            parts[chain_part(*key)] = _pack(self._chain_state(key, self._inbound[key]))
        for key in _in_order(self._sent, None if whole else self._changed_sent):
            parts[sent_part(*key)] = _pack(_sent_state(self._sent[key]))
        changes = SessionChanges(parts, frozenset(() if whole else self._deleted), whole=whole)
        self._all_changed = False
        self._changed.clear()
        self._changed_chains.clear()
        self._changed_sent.clear()
        self._deleted.clear()
        return changes

    def restore_retired(self, keys: Iterable[tuple[str, int]]) -> None:
        """Remember chains forgotten before a restart (`from_parts` calls it)."""
        for key in keys:
            self._retired[key] = None

    def mark_all_changed(self) -> None:
        """Make the next `take_changes` return the whole state (after a save that failed)."""
        self._all_changed = True

    def _records_state(self) -> list[object]:
        return [
            [[user, key] for user, key in self.keys.pins.items()],
            [record.encode() for record in self.keys.records.values()],
        ]

    def _rosters_state(self) -> list[object]:
        return [
            [roster.encode() for roster in self.rosters.rosters.values()],
            [[group, list(since.items())] for group, since in self._since.items()],
        ]

    def _core_state(self) -> list[object]:
        """Rotate, pending, pending inbox, requested, revoked: small, saved every time."""
        return [
            sorted(self._rotate),
            [
                [g, c, i, payload, history]
                for (g, c, i), (payload, history) in self._pending.items()
            ],
            list(self._pending_inbox),
            [[g, c, i] for (g, c), i in self._requested.items()],
            sorted(self._revoked),
        ]

    @staticmethod
    def _chain_state(key: tuple[str, int], c: InboundChain) -> list[object]:
        return [
            key[0],
            c.chain_id,
            c.sender,
            c.verify_key,
            c.index,
            c.chain_key,
            c.start_index,
            c.start_key,
            list(c.skipped.items()),
            list(c.seen.items()),
        ]

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        trust: OrgTrust,
        signing: SigningKeyPair,
        box: BoxKeyPair,
    ) -> DeviceSession:
        """Restore a session saved with `to_bytes`.

        Raises:
            E2EEError: the state is corrupt or belongs to another format version.
        """
        state = _unpack_state(data)
        if not isinstance(state, list) or not state or state[0] != _STATE_VERSION:
            msg = "the saved session state is from another version of meshchat"
            raise E2EEError(msg)
        return cls._from_state(state, trust=trust, signing=signing, box=box, changed=True)

    @classmethod
    def from_parts(
        cls,
        parts: Mapping[str, bytes],
        *,
        trust: OrgTrust,
        signing: SigningKeyPair,
        box: BoxKeyPair,
    ) -> DeviceSession:
        """Restore a session saved in parts (`take_changes`); nothing counts as changed after.

        Args:
            parts: the parts by name, each chain's in the order it was first saved.
            trust: the org's trust bundle.
            signing: this device's signing key.
            box: this device's box key.

        Raises:
            E2EEError: a part is missing or corrupt, or from another format version.
        """
        if CORE_PART not in parts:
            raise E2EEError("the saved session state has no core part")
        core = _unpack_state(parts[CORE_PART])
        if not isinstance(core, list) or not core or core[0] != _PARTS_VERSION:
            msg = "the saved session state is from another version of meshchat"
            raise E2EEError(msg)
        records = _unpack_state(parts.get(RECORDS_PART, _EMPTY_PAIR))
        rosters = _unpack_state(parts.get(ROSTERS_PART, _EMPTY_PAIR))
        chains = [_unpack_state(v) for n, v in parts.items() if n.startswith(_CHAIN_PREFIX)]
        sent = [_unpack_state(v) for n, v in parts.items() if n.startswith(_SENT_PREFIX)]
        state = _full_state(core, records, rosters, sent, chains)
        session = cls._from_state(state, trust=trust, signing=signing, box=box, changed=False)
        retired = _unpack_state(parts.get(RETIRED_PART, b"\x90"))
        if not isinstance(retired, list):
            raise E2EEError("the saved session state is corrupt: its forgotten chains")
        try:
            session.restore_retired((str(g), int(c)) for g, c in retired)
        except (TypeError, ValueError) as exc:
            msg = f"the saved session state is corrupt: {exc}"
            raise E2EEError(msg) from exc
        return session

    @classmethod
    def _from_state(
        cls,
        state: list[Any],
        *,
        trust: OrgTrust,
        signing: SigningKeyPair,
        box: BoxKeyPair,
        changed: bool,
    ) -> DeviceSession:
        """The session a `to_bytes` layout describes; `changed`: save every part next time."""
        try:
            (
                _version,
                user,
                device,
                pins,
                records,
                rosters,
                since,
                rotate,
                sent,
                inbound,
                pending,
                pending_inbox,
                requested,
                revoked,
            ) = state
            session = cls(trust=trust, user=user, device=device, signing=signing, box=box)
            session.keys.restore_pins({u: bytes(k) for u, k in pins})
            for payload in records:
                session.keys.restore(KeyRecord.decode(payload))
            for payload in rosters:
                session.rosters.restore(Roster.decode(payload))
            session._since = {g: {u: int(t) for u, t in members} for g, members in since}
            session._rotate = set(rotate)
            for group, chain_id, verify_key, start_key, sent_at in sent:
                session._sent[(group, chain_id)] = SentChain(
                    group, chain_id, verify_key, start_key, list(sent_at)
                )
            for (
                group,
                chain_id,
                sender,
                verify_key,
                index,
                chain_key,
                start_index,
                start_key,
                skipped,
                seen,
            ) in inbound:
                session._inbound[(group, chain_id)] = InboundChain(
                    chain_id,
                    sender,
                    verify_key,
                    index,
                    chain_key,
                    dict(skipped),
                    dict(seen),
                    start_index,
                    start_key,
                )
            for group, chain_id, index, payload, history in pending:
                session._pending[(group, chain_id, index)] = (payload, bool(history))
            session._pending_inbox = list(pending_inbox)
            session._requested = {(g, c): i for g, c, i in requested}
            session._revoked = set(revoked)
            session._all_changed = changed
            # A state saved before chains were retired may hold more than a reader keeps.
            session._retire_all_read_chains()
        except (ValueError, TypeError, EnvelopeError) as exc:
            msg = f"the saved session state is corrupt: {exc}"
            raise E2EEError(msg) from exc
        return session


_STATE_VERSION: Final = 1
_PARTS_VERSION: Final = 1
CORE_PART: Final = "core"
RECORDS_PART: Final = "records"
ROSTERS_PART: Final = "rosters"
RETIRED_PART: Final = "retired"
_CHAIN_PREFIX: Final = "chain:"
_SENT_PREFIX: Final = "sent:"
_EMPTY_PAIR: Final = b"\x92\x90\x90"  # msgpack [[], []]


def sent_part(group_topic: str, chain_id: int) -> str:
    """The name of the saved part holding one of this device's own chains (send times)."""
    return f"{_SENT_PREFIX}{group_topic}:{chain_id}"


def chain_part(group_topic: str, chain_id: int) -> str:
    """The name of the saved part holding one inbound chain (`DeviceSession.take_changes`)."""
    return f"{_CHAIN_PREFIX}{group_topic}:{chain_id}"


def _full_state(
    core: object, records: object, rosters: object, sent: list[Any], chains: list[Any]
) -> list[Any]:
    """The `to_bytes` layout from the parts.

    That is: version, user, device, pins, records, rosters, since, rotate, sent, chains,
    pending, pending inbox, requested, revoked.

    Raises:
        E2EEError: a part does not have its layout.
    """
    if not (
        isinstance(core, list)
        and len(core) == 8
        and isinstance(records, list)
        and len(records) == 2
        and isinstance(rosters, list)
        and len(rosters) == 2
    ):
        raise E2EEError("the saved session state is corrupt: a part has the wrong layout")
    _version, user, device, rotate, *after = core
    return [_STATE_VERSION, user, device, *records, *rosters, rotate, sent, chains, *after]


def _in_order(
    held: Mapping[tuple[str, int], object], changed: set[tuple[str, int]] | None
) -> list[tuple[str, int]]:
    """The keys of `held` that `changed` names (all with None), in `held`'s order."""
    if changed is None:
        return list(held)
    if len(changed) <= 1:
        return [key for key in changed if key in held]
    return [key for key in held if key in changed]


def _sent_state(sent: SentChain) -> list[object]:
    return [sent.group_topic, sent.chain_id, sent.verify_key, sent.start_key, sent.sent_at]


def _pack(value: object) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _unpack_state(data: bytes) -> object:
    try:
        return msgpack.unpackb(data, raw=False, max_map_len=0)
    except (ValueError, msgpack.UnpackException) as exc:
        msg = f"the saved session state is corrupt: {exc}"
        raise E2EEError(msg) from exc


def _signed(envelope: Signed | bytes) -> Signed:
    if isinstance(envelope, Signed):
        return envelope
    decoded = decode(envelope)
    if not isinstance(decoded, Signed):
        msg = "expected a signed envelope"
        raise EnvelopeError(msg)
    return decoded
