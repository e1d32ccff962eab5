"""What the archiver keeps of one MQTT message: header columns read from topic and envelope.

`classify` turns an untrusted (topic, payload) into a `Record` or raises `Rejected`. It reads
only what every envelope shows in the clear (type, chain id and index, the sending device's
name, the group a chain distribution names); it never holds or needs a key. Sans-IO.

What is archived, by topic (DESIGN.md section 3):

- ``mc/{org}/{dept}/{group}``: group messages (``GROUP``) and the per-chain compliance copies
  (``DIST`` sealed to the org compliance key, published on the group topic);
- ``mc/{org}/_k/{user}``: signed key records (``SIGNED``), needed to verify senders at audit
  time; an emptied retained record (a revoked user) has nothing to keep;
- ``mc/{org}/_d/{device}``: the device's inbox history: chain distributions (``DIST``) and
  sealed pairwise payloads (``SEALED``: key requests, ``withheld`` replies, direct messages), so
  a device whose broker session was lost or overflowed can fetch the keys it needs to read group
  history. Only the device's owner gets them back.

Everything else (presence, telemetry, rosters, other orgs) is ignored, not counted as bad.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from dataclasses import dataclass
from typing import Final

from meshchat.envelope import (
    MAX_ENVELOPE_LEN,
    MAX_STATEMENT_LEN,
    Distribution,
    Envelope,
    EnvelopeType,
    GroupMessage,
    Sealed,
    Signed,
    Telemetry,
    decode,
)
from meshchat.errors import EnvelopeError, MeshchatError, TopicError
from meshchat.topics import GroupTopic, InboxTopic, KeyTopic, parse_topic
from meshchat.wire import unpack

__all__ = [
    "ACCEPTED",
    "Record",
    "RejectReason",
    "Rejected",
    "TopicKind",
    "classify",
    "digest",
    "dist_chain",
]

_MAX_U32: Final = 2**32 - 1


class TopicKind(enum.StrEnum):
    """Which part of the topic tree an archived envelope came from."""

    GROUP = "group"
    KEY = "key"
    INBOX = "inbox"


ACCEPTED: Final[dict[TopicKind, frozenset[EnvelopeType]]] = {
    TopicKind.GROUP: frozenset({EnvelopeType.GROUP, EnvelopeType.DIST}),
    TopicKind.KEY: frozenset({EnvelopeType.SIGNED}),
    # Signed: the geofence worker's notices ("you joined the plant-3 channel").
    TopicKind.INBOX: frozenset({EnvelopeType.SEALED, EnvelopeType.DIST, EnvelopeType.SIGNED}),
}
"""The envelope types each kind of topic carries; anything else there is refused."""


class RejectReason(enum.StrEnum):
    """Why a message was not archived."""

    IGNORED = "ignored"
    """Not an archived topic (presence, another org, ...), or an emptied retained record."""
    MALFORMED = "malformed"
    """Not a valid envelope: bad bytes, oversize, or a type that does not belong on the topic."""


class Rejected(MeshchatError):  # noqa: N818  # a verdict, not a failure of the archiver
    """A message the archiver does not keep, and why (no payload byte in the message)."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        """Create the verdict."""
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Record:
    """One envelope to archive, with its header columns.

    Attributes:
        topic: the MQTT topic it arrived on.
        kind: group, key record or inbox.
        group_path: ``dept/group`` of a group topic, else None.
        name: the user of a key record, the device of an inbox, else None.
        etype: the envelope type.
        chain_id: the chain of a group message or chain distribution.
        chain_index: the message's index in its chain, or the position a distribution hands out.
        sender: the sending device a distribution or sealed payload names in the clear.
        received_at: when the archiver received it (unix seconds).
        size: the payload's length in bytes.
        digest: SHA-256 of the payload.
        payload: the envelope bytes as they arrived.
    """

    topic: str
    kind: TopicKind
    group_path: str | None
    name: str | None
    etype: EnvelopeType
    chain_id: int | None
    chain_index: int | None
    sender: str | None
    received_at: float
    size: int
    digest: bytes
    payload: bytes

    def row(self) -> tuple[object, ...]:
        """The values of an ``envelopes`` row, in `meshchat.archive.store.COLUMNS` order."""
        return (
            self.topic,
            self.kind.value,
            self.group_path,
            self.name,
            int(self.etype),
            self.chain_id,
            self.chain_index,
            self.sender,
            self.received_at,
            self.size,
            self.digest,
            self.payload,
        )


def digest(payload: bytes) -> bytes:
    """The digest that identifies a payload (SHA-256)."""
    return hashlib.sha256(payload).digest()


def dist_chain(envelope: Distribution) -> tuple[str, int, int]:
    """The group path, chain id and position a chain distribution's statement names.

    The statement is public (``[group path, chain id, index, chain verify key, ephemeral
    key]``); the chain key itself is sealed and stays so.

    Raises:
        EnvelopeError: the statement is malformed.
    """
    fields = unpack(
        envelope.statement,
        "distribution statement",
        max_str=MAX_STATEMENT_LEN,
        max_bin=64,
        max_array=5,
    )
    match fields:
        case [str(path), int(chain_id), int(index), bytes(), bytes()] if (
            type(chain_id) is int
            and type(index) is int
            and 0 < chain_id <= _MAX_U32
            and 0 <= index <= _MAX_U32
        ):
            return path, chain_id, index
    raise EnvelopeError("distribution statement has the wrong fields")


def _decode(payload: bytes, kind: TopicKind, topic: str) -> tuple[Envelope, EnvelopeType]:
    """The envelope and its type, or a refusal when it does not belong on the topic."""
    try:
        envelope = decode(payload)
    except EnvelopeError as exc:
        raise Rejected(RejectReason.MALFORMED, f"not a valid envelope: {exc}") from exc
    etype = _etype(envelope)
    if etype not in ACCEPTED[kind]:
        raise Rejected(
            RejectReason.MALFORMED,
            f"a {etype.name.lower()} envelope does not belong on {kind.value} topic {topic}",
        )
    return envelope, etype


def _etype(envelope: Envelope) -> EnvelopeType:
    match envelope:
        case GroupMessage():
            return EnvelopeType.GROUP
        case Sealed():
            return EnvelopeType.SEALED
        case Signed():
            return EnvelopeType.SIGNED
        case Distribution():
            return EnvelopeType.DIST
        case Telemetry():
            return EnvelopeType.TELEMETRY


@functools.lru_cache(maxsize=4096)
def _where(topic: str, org: str) -> tuple[TopicKind, str | None, str | None]:
    """The kind of an archived topic, its group path and its user or device name.

    Cached: a site has a few hundred topics, and parsing one costs a third of `classify`.
    A refusal is an exception, which is not cached.
    """
    try:
        parsed = parse_topic(topic)
    except TopicError as exc:
        raise Rejected(RejectReason.IGNORED, f"not an archived topic: {exc}") from exc
    where: tuple[TopicKind, str | None, str | None]
    match parsed:
        case GroupTopic():
            where = (TopicKind.GROUP, parsed.path, None)
        case KeyTopic(user=user):
            where = (TopicKind.KEY, None, user)
        case InboxTopic(device=device):
            where = (TopicKind.INBOX, None, device)
        case _:
            raise Rejected(RejectReason.IGNORED, f"{topic} is not an archived topic")
    if parsed.org != org:
        raise Rejected(RejectReason.IGNORED, f"{topic} belongs to another org")
    return where


def _header(
    envelope: Envelope, topic: str, group_path: str | None
) -> tuple[int | None, int | None, str | None]:
    """Chain id, index (or position) and sending device an envelope shows in the clear."""
    match envelope:
        case GroupMessage():
            return envelope.chain_id, envelope.index, None
        case Distribution():
            try:
                path, chain_id, chain_index = dist_chain(envelope)
            except EnvelopeError as exc:
                raise Rejected(RejectReason.MALFORMED, str(exc)) from exc
            if group_path is not None and path != group_path:
                raise Rejected(
                    RejectReason.MALFORMED,
                    f"a compliance copy on {topic} names another group ({path[:70]!r})",
                )
            return chain_id, chain_index, envelope.sender
        case Sealed():
            return None, None, envelope.sender
        case Signed():
            return None, None, envelope.signer
        case Telemetry():  # never accepted on an archived topic; nothing in the clear
            return None, None, None


def classify(topic: str, payload: bytes, *, org: str, received_at: float) -> Record:
    """Read the header columns of one message, or refuse it.

    Args:
        topic: the topic it arrived on (untrusted).
        payload: the payload (untrusted).
        org: the org this archiver serves; other orgs' topics are ignored.
        received_at: when it arrived (unix seconds).

    Raises:
        Rejected: not archived: ignored (not an archived topic) or malformed (with why).
    """
    kind, group_path, name = _where(topic, org)
    if not payload and kind is TopicKind.KEY:
        raise Rejected(RejectReason.IGNORED, f"the retained key record on {topic} was cleared")
    if len(payload) > MAX_ENVELOPE_LEN:
        raise Rejected(
            RejectReason.MALFORMED,
            f"a payload of {len(payload)} bytes is over the envelope limit of {MAX_ENVELOPE_LEN}",
        )
    envelope, etype = _decode(payload, kind, topic)
    chain_id, chain_index, sender = _header(envelope, topic, group_path)
    return Record(
        topic=topic,
        kind=kind,
        group_path=group_path,
        name=name,
        etype=etype,
        chain_id=chain_id,
        chain_index=chain_index,
        sender=sender,
        received_at=received_at,
        size=len(payload),
        digest=digest(payload),
        payload=bytes(payload),
    )
