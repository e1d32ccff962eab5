"""A small org for E2EE session tests: keys, signed records and rosters, and an in-memory net.

`Org` plays the directory (it signs rosters and key records with real keys); `Net` plays the
broker: it delivers group messages to every device of the group's current members and inbox
payloads to their device, in order, and can hold back or drop what it carries.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from meshchat.e2ee import (
    GENESIS_HASH,
    BoxKeyPair,
    Decrypted,
    DeviceKeys,
    DeviceSession,
    Event,
    Inner,
    KeyRecord,
    Kind,
    OrgTrust,
    Outgoing,
    Roster,
    SigningKeyPair,
    Step,
    certify_identity,
    make_trust,
    sign_key_record,
    sign_roster,
)
from meshchat.envelope import Signed
from meshchat.topics import InboxTopic, parse_topic

E = TypeVar("E", bound=Event)

ORG = "acme"
LINE1 = "mc/acme/ops/line1"
LINE2 = "mc/acme/ops/line2"
NOW = 1_800_000_000
DAY = 24 * 3600


def text(body: str, ts: int = NOW) -> Inner:
    return Inner(Kind.TEXT, ts, (body,))


@dataclass
class Device:
    name: str
    user: str
    signing: SigningKeyPair = field(default_factory=SigningKeyPair.generate)
    box: BoxKeyPair = field(default_factory=BoxKeyPair.generate)

    @property
    def keys(self) -> DeviceKeys:
        return DeviceKeys(self.name, self.signing.public, self.box.public)


class Org:
    """Root, directory and compliance keys; users with identity keys; signed rosters."""

    def __init__(self, *, compliance: bool = True) -> None:
        self.root = SigningKeyPair.generate()
        self.directory = SigningKeyPair.generate()
        self.geofence = SigningKeyPair.generate()
        self.compliance = BoxKeyPair.generate()
        self.trust: OrgTrust = make_trust(
            ORG,
            self.root,
            directory=self.directory,
            scoped={"geofence": (self.geofence, f"mc/{ORG}/sites/")},
            compliance=self.compliance if compliance else None,
        )
        self.identities: dict[str, SigningKeyPair] = {}
        self.devices: dict[str, list[Device]] = {}
        self.versions: dict[str, int] = {}
        self.rosters: dict[str, Roster] = {}

    def add_user(self, user: str, *device_names: str) -> list[Device]:
        self.identities[user] = SigningKeyPair.generate()
        self.devices[user] = [Device(name, user) for name in device_names]
        return self.devices[user]

    def record(self, user: str) -> Signed:
        self.versions[user] = self.versions.get(user, 0) + 1
        identity = self.identities[user]
        record = KeyRecord(
            user,
            self.versions[user],
            identity.public,
            certify_identity(self.directory, user, identity.public),
            tuple(d.keys for d in self.devices[user]),
        )
        return sign_key_record(record, identity)

    def roster(
        self,
        group: str,
        *members: str,
        issued_at: int = NOW,
        expires_at: int = NOW + 7 * DAY,
        policy: int = 0,
        compliance: bool = False,
        announcement: bool = False,
        announcers: tuple[str, ...] = (),
    ) -> Signed:
        before = self.rosters.get(group)
        roster = Roster(
            group,
            before.epoch + 1 if before else 1,
            before.hash if before else GENESIS_HASH,
            expires_at,
            tuple(members),
            issued_at,
            policy,
            compliance,
            announcement,
            announcers,
        )
        self.rosters[group] = roster
        return sign_roster(roster, self.directory, "dir")

    def session(self, device: Device) -> DeviceSession:
        return DeviceSession(
            trust=self.trust,
            user=device.user,
            device=device.name,
            signing=device.signing,
            box=device.box,
        )


@dataclass
class Net:
    """Delivers what sessions publish: group messages to members' devices, inboxes in order."""

    org: Org
    sessions: dict[str, DeviceSession] = field(default_factory=dict)
    events: dict[str, list[Event]] = field(default_factory=dict)
    queue: deque[Outgoing] = field(default_factory=deque)
    held: list[Outgoing] = field(default_factory=list)
    published: list[Outgoing] = field(default_factory=list)
    hold_inbox_of: set[str] = field(default_factory=set)

    def join(self, device: Device) -> DeviceSession:
        session = self.org.session(device)
        self.sessions[device.name] = session
        self.events[device.name] = []
        return session

    def take(self, device: str, step: Step) -> None:
        self.events[device].extend(step.events)
        self.queue.extend(step.outgoing)

    def broadcast_record(self, user: str) -> None:
        envelope = self.org.record(user)
        for name, session in self.sessions.items():
            self.take(name, session.on_key_record(user, envelope))
        self.run()

    def broadcast_roster(self, group: str, *members: str, **options: object) -> None:
        envelope = self.org.roster(group, *members, **options)  # type: ignore[arg-type]
        self.deliver_roster(group, envelope, self.sessions)

    def deliver_roster(self, group: str, envelope: Signed, devices: Iterable[str]) -> None:
        for name in devices:
            self.take(name, self.sessions[name].on_roster(group, envelope))
        self.run()

    def send(self, device: str, group: str, body: str, *, now: float = NOW) -> Outgoing:
        """Encrypt and publish; returns the group message (last of what was published)."""
        outgoing = self.sessions[device].encrypt(group, text(body), now=now)
        self.queue.extend(outgoing)
        self.run()
        return outgoing[-1]

    def members_devices(self, group: str) -> list[str]:
        roster = self.org.rosters[group]
        return [
            d.name
            for user in roster.members
            for d in self.org.devices.get(user, [])
            if d.name in self.sessions
        ]

    def run(self) -> None:
        while self.queue:
            item = self.queue.popleft()
            self.published.append(item)
            parsed = parse_topic(item.topic)
            if isinstance(parsed, InboxTopic):
                if parsed.device in self.hold_inbox_of:
                    self.held.append(item)
                elif parsed.device in self.sessions:
                    self.take(parsed.device, self.sessions[parsed.device].on_inbox(item.payload))
                continue
            for name in self.members_devices(item.topic):
                self.take(name, self.sessions[name].on_group_message(item.topic, item.payload))

    def release(self) -> None:
        held, self.held = self.held, []
        self.hold_inbox_of.clear()
        self.queue.extend(held)
        self.run()

    def texts(self, device: str) -> list[str]:
        return [str(e.inner.fields[0]) for e in self.events[device] if isinstance(e, Decrypted)]

    def of(self, device: str, kind: type[E]) -> list[E]:
        return [e for e in self.events[device] if isinstance(e, kind)]
