"""The client benchmark's E2EE org: real keys, and key records and rosters signed with them.

`E2EEOrg` builds an org the way ``tests/e2ee/org.py`` does: an org root, the directory's key
certified by it, an identity key per user certified by the directory, each user's key record
signed by its identity key, rosters signed by the directory. In the benchmark each device is its
own user. `KeyMaterial` is what a worker's sessions start from, in place of the directory
service (which Mosquitto does not run): the trust bundle, the group's roster and key records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Self

from meshchat.e2ee import (
    DIRECTORY_SIGNER,
    GENESIS_HASH,
    BoxKeyPair,
    DeviceKeys,
    DeviceSession,
    KeyRecord,
    OrgTrust,
    Roster,
    SigningKeyPair,
    certify_identity,
    make_trust,
    sign_key_record,
    sign_roster,
)
from meshchat.envelope import encode

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Device", "E2EEOrg", "KeyMaterial"]

_ROSTER_TTL: Final = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Device:
    """A device's secret keys; in this benchmark each device is its own user, of the same name."""

    name: str
    seed: bytes = field(repr=False)
    box: bytes = field(repr=False)

    @classmethod
    def generate(cls, name: str) -> Self:
        """Fresh Ed25519 and X25519 keys."""
        return cls(name, SigningKeyPair.generate().seed, BoxKeyPair.generate().secret)

    def public(self) -> DeviceKeys:
        """What the device's key record lists."""
        return DeviceKeys(self.name, SigningKeyPair(self.seed).public, BoxKeyPair(self.box).public)

    def session(self, trust: OrgTrust) -> DeviceSession:
        """A fresh E2EE session of this device."""
        return DeviceSession(
            trust=trust,
            user=self.name,
            device=self.name,
            signing=SigningKeyPair(self.seed),
            box=BoxKeyPair(self.box),
        )


class E2EEOrg:
    """An org with real keys, as ``tests/e2ee/org.py`` builds one: it signs records and rosters.

    The root certifies the directory's key; the directory certifies each user's identity key;
    each identity key signs its user's key record (one device); the directory signs rosters.
    """

    def __init__(self, org: str) -> None:
        """Fresh root and directory keys for `org`."""
        root = SigningKeyPair.generate()
        self._directory = SigningKeyPair.generate()
        self.org = org
        self.trust = make_trust(org, root, directory=self._directory)
        self._devices: dict[str, Device] = {}
        self._records: dict[str, bytes] = {}

    def device(self, name: str) -> Device:
        """The device (and user) `name`, with keys made on first use."""
        if name not in self._devices:
            self._devices[name] = Device.generate(name)
        return self._devices[name]

    def record(self, name: str) -> bytes:
        """The signed key record of user `name`, listing its one device."""
        if name not in self._records:
            identity = SigningKeyPair.generate()
            record = KeyRecord(
                name,
                1,
                identity.public,
                certify_identity(self._directory, name, identity.public),
                (self.device(name).public(),),
            )
            self._records[name] = encode(sign_key_record(record, identity))
        return self._records[name]

    def roster(self, group_topic: str, members: Sequence[str], now: float) -> bytes:
        """A signed first-epoch roster of the group, valid for a week from `now`."""
        roster = Roster(
            group_topic,
            1,
            GENESIS_HASH,
            int(now) + _ROSTER_TTL,
            tuple(sorted(members)),
            int(now) - 1,
        )
        return encode(sign_roster(roster, self._directory, DIRECTORY_SIGNER))

    def keys(self, group_topic: str, members: Sequence[str], known: Sequence[str]) -> KeyMaterial:
        """What a worker's sessions start from: trust, the roster and the records of `known`."""
        return KeyMaterial(
            trust=self.trust.encode(),
            group_topic=group_topic,
            roster=self.roster(group_topic, members, time.time()),
            records=tuple((name, self.record(name)) for name in known),
        )


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """What the directory would have published: the trust bundle, a roster, key records."""

    trust: bytes
    group_topic: str
    roster: bytes
    records: tuple[tuple[str, bytes], ...]

    def sessions(self, devices: Sequence[Device]) -> list[DeviceSession]:
        """A session per device, with the roster and the records fed in; refusals raise."""
        trust = OrgTrust.decode(self.trust)
        sessions = []
        for device in devices:
            session = device.session(trust)
            steps = [session.on_key_record(user, payload) for user, payload in self.records]
            steps.append(session.on_roster(self.group_topic, self.roster))
            refused = [e for step in steps for e in step.events]
            if refused:
                raise RuntimeError(f"{device.name} refused its keys: {refused[0]}")
            sessions.append(session)
        return sessions
