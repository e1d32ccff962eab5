"""Signed rosters: who is in a group, versioned, hash-linked, expiring, from a scoped signer.

Rosters are published retained on ``.../_r``, so clients never trust the broker for membership:
each roster is signed by a key the org root certified for a topic prefix (the directory's key
for the whole org, the geofence worker's for ``mc/{org}/sites/`` only). A client keeps, per
group, the newest roster it accepted and refuses:

- a signer it has no certificate for, or a group outside the signer's scope;
- a lower epoch (rollback), or the same epoch with different content;
- the next epoch when it does not link to the roster before it (``prev`` is that roster's hash);
- and it refuses to *send* while the newest roster has expired.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgpack

from meshchat.e2ee.keys import SigningKeyPair, verify
from meshchat.envelope import Signed
from meshchat.errors import E2EEError, EnvelopeError, TopicError
from meshchat.topics import GroupTopic, parse_topic, validate_name
from meshchat.wire import unpack

__all__ = [
    "GENESIS_HASH",
    "Roster",
    "RosterError",
    "RosterTracker",
    "SignerCert",
    "certify_signer",
    "sign_roster",
    "verify_signer",
]

GENESIS_HASH: Final = bytes(32)
_ROSTER_DOMAIN: Final = b"mc-roster1"
_CERT_DOMAIN: Final = b"mc-dir-cert1"
_HASH_PERSON: Final = b"mc-roster-h1"
MAX_MEMBERS: Final = 100_000


class RosterError(E2EEError):
    """A roster was refused (the message says which rule it broke)."""


@dataclass(frozen=True, slots=True)
class Roster:
    """The members of one group at one epoch, and the group policy senders must follow.

    Attributes:
        group_topic: the group.
        epoch: increases by one with every change.
        prev: the hash of the previous epoch's roster (`GENESIS_HASH` for the first).
        expires_at: unix seconds; no one sends on an expired roster.
        members: user names.
        issued_at: when the signer made it (unix seconds): a member's "joined at" for
            key requests.
        policy: the group policy's version; a change makes every sender rotate.
        compliance: whether each new chain is also sealed to the org compliance key.
        announcement: only `announcers` may post (an announcement channel).
        announcers: members whose role may post announcements and mention ``@all``.
    """

    group_topic: str
    epoch: int
    prev: bytes
    expires_at: int
    members: tuple[str, ...]
    issued_at: int = 0
    policy: int = 0
    compliance: bool = False
    announcement: bool = False
    announcers: tuple[str, ...] = ()

    def encode(self) -> bytes:
        """Canonical bytes (members sorted), what the signer signs and the hash covers."""
        packed: bytes = msgpack.packb(
            [
                self.group_topic,
                self.epoch,
                self.prev,
                self.expires_at,
                sorted(self.members),
                self.issued_at,
                self.policy,
                self.compliance,
                self.announcement,
                sorted(self.announcers),
            ],
            use_bin_type=True,
        )
        return packed

    @property
    def hash(self) -> bytes:
        """The link the next epoch's roster carries as ``prev``."""
        return hashlib.blake2b(self.encode(), digest_size=32, person=_HASH_PERSON).digest()

    @classmethod
    def decode(cls, payload: bytes) -> Roster:
        """Parse and check a roster payload.

        Raises:
            EnvelopeError: malformed.
        """
        fields = unpack(payload, "roster", max_array=MAX_MEMBERS, max_str=256, max_bin=32)
        match fields:
            case [
                str(topic),
                int(epoch),
                bytes(prev),
                int(expires),
                list(members),
                int(issued),
                int(policy),
                bool(compliance),
                bool(announcement),
                list(announcers),
            ] if len(prev) == 32 and all(
                type(n) is int and 0 <= n < 2**63 for n in (epoch, expires, issued, policy)
            ):
                try:
                    if not isinstance(parse_topic(topic), GroupTopic):
                        raise EnvelopeError(f"roster names {topic!r}, which is not a group")
                    names = tuple(validate_name(m, "member name") for m in members)
                    if len(set(names)) != len(names):
                        raise EnvelopeError("roster lists a member twice")
                    posters = tuple(validate_name(a, "announcer name") for a in announcers)
                    if not set(posters) <= set(names) or len(set(posters)) != len(posters):
                        raise EnvelopeError("roster announcers must be distinct members")
                except TopicError as exc:
                    raise EnvelopeError(f"roster is invalid: {exc}") from exc
                roster = cls(
                    topic,
                    epoch,
                    prev,
                    expires,
                    names,
                    issued,
                    policy,
                    compliance,
                    announcement,
                    posters,
                )
                if roster.encode() != payload:
                    raise EnvelopeError("roster is not in canonical form")
                return roster
        raise EnvelopeError("roster has the wrong fields")


@dataclass(frozen=True, slots=True)
class SignerCert:
    """The org root's word that `public` may sign rosters for topics under `scope`."""

    name: str
    public: bytes
    scope: str
    sig: bytes

    def message(self) -> bytes:
        """What the root signs."""
        packed: bytes = msgpack.packb([self.name, self.public, self.scope], use_bin_type=True)
        return packed


def certify_signer(root: SigningKeyPair, name: str, public: bytes, scope: str) -> SignerCert:
    """The root certifies a roster signer for a topic prefix (``mc/acme/``, ``mc/acme/sites/``)."""
    validate_name(name, "signer name")
    if not scope.startswith("mc/") or not scope.endswith("/"):
        msg = f"scope {scope!r} must be a topic prefix such as mc/acme/ or mc/acme/sites/"
        raise ValueError(msg)
    unsigned = SignerCert(name, public, scope, b"")
    return SignerCert(name, public, scope, root.sign(_CERT_DOMAIN, unsigned.message()))


def verify_signer(root_public: bytes, cert: SignerCert) -> bool:
    """Whether the root made `cert`."""
    return verify(root_public, _CERT_DOMAIN, cert.message(), cert.sig)


def sign_roster(roster: Roster, signer: SigningKeyPair, name: str) -> Signed:
    """The `Signed` envelope to publish, retained, on the group's roster topic."""
    payload = roster.encode()
    return Signed(name, payload, signer.sign(_ROSTER_DOMAIN, payload))


class RosterTracker:
    """The newest accepted roster per group, and the rules for accepting the next one."""

    def __init__(self, root_public: bytes, signers: Mapping[str, SignerCert]) -> None:
        """Trust roster signers whose certificates the org root signed."""
        self._root = root_public
        self._signers = dict(signers)
        self._current: dict[str, Roster] = {}

    def current(self, group_topic: str) -> Roster | None:
        """The newest roster accepted for a group."""
        return self._current.get(group_topic)

    @property
    def rosters(self) -> Mapping[str, Roster]:
        """The newest accepted roster of every group (persist them with the device's state)."""
        return dict(self._current)

    def restore(self, roster: Roster) -> None:
        """Load a roster this device accepted earlier (from its own state file)."""
        self._current[roster.group_topic] = roster

    def accept(self, envelope: Signed, *, arrived_on: str) -> Roster:
        """Check a roster that arrived on the roster topic of `arrived_on` and keep it.

        Returns:
            The roster now current (the same one again for an identical redelivery).

        Raises:
            RosterError: unknown or out-of-scope signer, bad signature, another group,
                rollback, same epoch with other content, or a broken link.
            EnvelopeError: the payload is malformed.
        """
        cert = self._signers.get(envelope.signer)
        if cert is None or not verify_signer(self._root, cert):
            raise RosterError(f"roster signer {envelope.signer!r} is not certified by the org root")
        if not verify(cert.public, _ROSTER_DOMAIN, envelope.payload, envelope.sig):
            raise RosterError(f"roster signed as {envelope.signer} has a bad signature")
        roster = Roster.decode(envelope.payload)
        if roster.group_topic != arrived_on:
            raise RosterError(f"a roster of {roster.group_topic} arrived for {arrived_on}: refused")
        if not roster.group_topic.startswith(cert.scope):
            raise RosterError(
                f"{envelope.signer} may sign rosters under {cert.scope} only, not "
                f"{roster.group_topic}"
            )
        current = self._current.get(roster.group_topic)
        if current is not None:
            if roster.epoch < current.epoch:
                raise RosterError(
                    f"roster epoch {roster.epoch} of {roster.group_topic} is older than the "
                    f"accepted epoch {current.epoch}: rollback refused"
                )
            if roster.epoch == current.epoch:
                if hmac.compare_digest(roster.hash, current.hash):
                    return current
                raise RosterError(f"two different rosters claim epoch {roster.epoch}")
            if roster.epoch == current.epoch + 1 and not hmac.compare_digest(
                roster.prev, current.hash
            ):
                raise RosterError(
                    f"roster epoch {roster.epoch} does not link to epoch {current.epoch}"
                )
        self._current[roster.group_topic] = roster
        return roster

    def may_send(self, group_topic: str, *, now: float) -> bool:
        """Whether the newest roster is present and unexpired (never send on a stale one)."""
        roster = self._current.get(group_topic)
        return roster is not None and now < roster.expires_at
