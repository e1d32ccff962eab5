"""An auditor reads an archive export with the org compliance key: who said what, and when.

`audit_export` takes an export (`meshchat.archive.read_export`: key records, compliance copies
and group envelopes, already checked for integrity) and the compliance key's secret (unsealed
from ``DATA/keys`` with the root passphrase), verifies every key record against the org's trust
bundle, opens the compliance copies, and decrypts and verifies every group message it can. A
message of a chain without a compliance copy, or one that fails authentication, is listed as
not readable, with the reason. This is the only place outside the clients where archived
ciphertext turns into text; it runs on the auditor's machine and prints, it never stores.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshchat.archive.export import ExportHeader, ExportLine
from meshchat.archive.records import TopicKind
from meshchat.e2ee import (
    BoxKeyPair,
    ComplianceReader,
    Decrypted,
    Inner,
    KeyRecord,
    KeyRecordError,
    OrgTrust,
    Refused,
    Undecryptable,
)
from meshchat.envelope import EnvelopeType, Signed, decode
from meshchat.errors import ConfigError, EnvelopeError

__all__ = ["AuditReport", "AuditedMessage", "audit_export", "inner_fields"]


@dataclass(frozen=True, slots=True)
class AuditedMessage:
    """One group message as the auditor sees it.

    Attributes:
        received_at: when the archiver received it (unix seconds).
        chain_id: the sender's chain.
        index: the message's index in that chain.
        readable: whether it was decrypted and verified.
        user: the sending user (readable messages).
        device: the sending device (readable messages).
        kind: the message kind, e.g. ``text`` (readable messages).
        sent_at: the sender's own timestamp (readable messages).
        fields: the kind's fields (readable messages).
        reason: why it is not readable.
    """

    received_at: float
    chain_id: int
    index: int
    readable: bool
    user: str | None = None
    device: str | None = None
    kind: str | None = None
    sent_at: int | None = None
    fields: tuple[object, ...] = ()
    reason: str | None = field(default=None)

    def as_dict(self) -> dict[str, object]:
        """JSON-able values (bytes in base64, message references as pairs)."""
        return {
            "received_at": self.received_at,
            "chain_id": self.chain_id,
            "index": self.index,
            "readable": self.readable,
            "user": self.user,
            "device": self.device,
            "kind": self.kind,
            "sent_at": self.sent_at,
            "fields": inner_fields(self.fields),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class AuditReport:
    """Everything an export held, read with the compliance key."""

    header: ExportHeader
    messages: list[AuditedMessage]
    refused: list[str]
    """Key records and compliance copies that did not verify, and why."""

    @property
    def readable(self) -> int:
        """How many messages were read."""
        return sum(1 for message in self.messages if message.readable)


def inner_fields(fields: Sequence[object]) -> list[object]:
    """A message's fields as JSON values: bytes in base64, tuples as lists."""
    out: list[object] = []
    for value in fields:
        if isinstance(value, bytes):
            out.append(base64.b64encode(value).decode("ascii"))
        elif isinstance(value, tuple | list):
            out.append(inner_fields(value))
        else:
            out.append(value)
    return out


def _key_records(lines: Sequence[ExportLine]) -> list[tuple[str, Signed, int]]:
    """Key records as (user, envelope, version), oldest version first per user."""
    found: list[tuple[str, Signed, int]] = []
    for line in lines:
        if line.kind is not TopicKind.KEY:
            continue
        envelope = decode(line.payload)
        if not isinstance(envelope, Signed):
            continue
        try:
            version = KeyRecord.decode(envelope.payload).version
        except (EnvelopeError, KeyRecordError):
            version = -1
        found.append((line.topic.rsplit("/", 1)[1], envelope, version))
    return sorted(found, key=lambda item: (item[0], item[2]))


def _audited(line: ExportLine, event: Decrypted | Undecryptable | Refused) -> AuditedMessage:
    assert line.chain_id is not None
    assert line.index is not None
    match event:
        case Decrypted(sender=user, device=device, inner=Inner() as inner):
            return AuditedMessage(
                line.received_at,
                line.chain_id,
                line.index,
                readable=True,
                user=user,
                device=device,
                kind=inner.kind.name.lower(),
                sent_at=inner.ts,
                fields=inner.fields,
            )
        case Undecryptable(reason=reason) | Refused(reason=reason):
            return AuditedMessage(
                line.received_at, line.chain_id, line.index, readable=False, reason=reason
            )


def audit_export(
    header: ExportHeader, lines: Sequence[ExportLine], trust: OrgTrust, secret: BoxKeyPair
) -> AuditReport:
    """Read an export with the org's compliance key.

    Args:
        header: the export's header.
        lines: its envelopes (checked).
        trust: the org's trust bundle.
        secret: the org compliance key.

    Raises:
        ConfigError: the export belongs to another org.
        TrustError: the org keeps no compliance key, or `secret` is not it.
    """
    if header.org != trust.org:
        raise ConfigError(f"the export is of org {header.org!r}, the keys are of {trust.org!r}")
    reader = ComplianceReader(trust, secret)
    refused: list[str] = []
    for user, envelope, _ in _key_records(lines):
        try:
            reader.add_key_record(user, envelope)
        except (KeyRecordError, EnvelopeError) as exc:
            refused.append(f"key record of {user}: {exc}")
    for line in lines:
        if line.kind is TopicKind.GROUP and line.etype is EnvelopeType.DIST:
            event = reader.read(line.topic, line.payload, copies_only=True)
            if isinstance(event, Refused):
                refused.append(f"{event.what}: {event.reason}")
    messages: list[AuditedMessage] = []
    for line in lines:
        if line.kind is not TopicKind.GROUP or line.etype is not EnvelopeType.GROUP:
            continue
        event = reader.read(line.topic, line.payload)
        if isinstance(event, Decrypted | Undecryptable | Refused):
            messages.append(_audited(line, event))
    return AuditReport(header, messages, refused)
