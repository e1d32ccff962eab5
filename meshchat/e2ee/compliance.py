"""Reading archived messages with the org compliance key, and only with it.

In a group whose policy asks for it, every new chain is also sealed to the org compliance key
(a `Distribution` for the recipient ``compliance``, published on the group topic, where the
archiver keeps it with the messages). An auditor who holds the compliance key's secret feeds the
archived envelopes of a group, with the key records of the org, to a `ComplianceReader` and gets
the plaintext; without that secret the copies open for no one. Sans-IO.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from meshchat.e2ee.chain import InboundChain
from meshchat.e2ee.distribution import open_distribution
from meshchat.e2ee.keys import BoxKeyPair
from meshchat.e2ee.plaintext import decode_inner
from meshchat.e2ee.records import IdentityChangedError, KeyRecordError
from meshchat.e2ee.session import COMPLIANCE_RECIPIENT, Decrypted, Event, Refused, Undecryptable
from meshchat.e2ee.trust import OrgTrust, TrustError
from meshchat.envelope import Distribution, GroupMessage, Signed, decode
from meshchat.errors import DecryptError, DuplicateMessageError, EnvelopeError, TopicError
from meshchat.topics import GroupTopic, KeyTopic, parse_topic

__all__ = ["ComplianceReader"]


class ComplianceReader:
    """Decrypts archived group messages with the org compliance key."""

    def __init__(self, trust: OrgTrust, secret: BoxKeyPair) -> None:
        """Check that `secret` is the compliance key the org root certified.

        Raises:
            TrustError: the org keeps no compliance key, or `secret` is not it.
        """
        if trust.compliance is None:
            msg = f"org {trust.org} has no compliance key"
            raise TrustError(msg)
        if not hmac.compare_digest(secret.public, trust.compliance.public):
            msg = "this is not the org's compliance key"
            raise TrustError(msg)
        self.trust = trust
        self._secret = secret
        self._keys = trust.key_directory()
        self._devices: dict[str, tuple[str, bytes]] = {}
        self._chains: dict[tuple[str, int], InboundChain] = {}

    def add_key_record(self, user: str, envelope: Signed) -> None:
        """Learn a user's devices; devices that later left the list stay known for old chains.

        Raises:
            KeyRecordError: the record does not verify.
            EnvelopeError: malformed.
        """
        try:
            record = self._keys.accept(envelope, arrived_on_user=user)
        except IdentityChangedError:
            record = self._keys.repin(envelope, arrived_on_user=user)
        for device in record.devices:
            self._devices[device.name] = (record.user, device.signing)

    def read_all(self, entries: Iterable[tuple[str, bytes]]) -> list[Event]:
        """Read archived (topic, payload) pairs: key records and compliance copies first."""
        items = list(entries)
        events: list[Event] = []
        for topic, payload in items:
            try:
                parsed = parse_topic(topic)
            except TopicError as exc:
                events.append(Refused(f"entry on {topic!r}", str(exc)))
                continue
            if isinstance(parsed, KeyTopic):
                try:
                    envelope = decode(payload)
                    if isinstance(envelope, Signed):
                        self.add_key_record(parsed.user, envelope)
                    else:
                        events.append(Refused(f"key record on {topic}", "not a signed record"))
                except (KeyRecordError, EnvelopeError) as exc:
                    events.append(Refused(f"key record on {topic}", str(exc)))
        for topic, payload in items:
            event = self.read(topic, payload, copies_only=True)
            if event is not None:
                events.append(event)
        for topic, payload in items:
            event = self.read(topic, payload)
            if event is not None:
                events.append(event)
        return events

    def read(self, topic: str, payload: bytes, *, copies_only: bool = False) -> Event | None:
        """Read one archived envelope of a group topic (None: nothing to show)."""
        try:
            if not isinstance(parse_topic(topic), GroupTopic):
                return None
            envelope = decode(payload)
        except (TopicError, EnvelopeError) as exc:
            return Refused(f"entry on {topic!r}", str(exc))
        if isinstance(envelope, Distribution):
            return self._copy(topic, envelope)
        if copies_only or not isinstance(envelope, GroupMessage):
            return None
        return self._message(topic, envelope)

    def _message(self, topic: str, envelope: GroupMessage) -> Event | None:
        message_id = (envelope.chain_id, envelope.index)
        chain = self._chains.get((topic, envelope.chain_id))
        if chain is None:
            return Undecryptable(
                topic, message_id, "no compliance copy of this chain was archived", "no-copy"
            )
        try:
            inner = decode_inner(chain.decrypt(topic, envelope, history=True))
        except DuplicateMessageError:
            return None
        except DecryptError as exc:
            return Undecryptable(topic, message_id, str(exc), exc.reason)
        except EnvelopeError as exc:
            return Undecryptable(topic, message_id, str(exc), "malformed")
        user = self._devices.get(chain.sender, ("?", b""))[0]
        return Decrypted(topic, user, chain.sender, message_id, inner, history=True)

    def _copy(self, topic: str, envelope: Distribution) -> Event | None:
        known = self._devices.get(envelope.sender)
        if known is None:
            return Refused(
                f"compliance copy from {envelope.sender}", "no key record of that device"
            )
        try:
            received = open_distribution(
                envelope,
                org=self.trust.org,
                recipient=COMPLIANCE_RECIPIENT,
                box_key=self._secret,
                sender_key=known[1],
            )
        except (DecryptError, EnvelopeError) as exc:
            return Refused(f"compliance copy from {envelope.sender}", str(exc))
        if received.group_topic != topic:
            return Refused(
                f"compliance copy from {envelope.sender}",
                f"it names {received.group_topic} but was archived on {topic}",
            )
        key = (topic, received.share.chain_id)
        if key not in self._chains:
            self._chains[key] = InboundChain.from_share(received.share, sender=envelope.sender)
        return None
