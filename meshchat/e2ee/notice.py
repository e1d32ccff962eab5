"""Signed notices to one device's inbox ("You joined the plant-3 channel"), sans-IO.

When the geofence worker adds a user to a site channel or removes them, it tells each of the
user's devices in its inbox (``mc/{org}/_d/{device}``). Anyone in the org may write to an inbox,
so a client believes a notice only when it verifies against the org's trust bundle:

- it is a `Signed` envelope whose signer the org root certified (the geofence worker's roster
  key, certified for ``mc/{org}/sites/``, or the directory's key for the whole org), signed
  over the payload with the domain ``mc-notice1``, so no other signature passes as a notice;
- the group it speaks of lies within that signer's scope;
- it names the device whose inbox it arrived in, so it cannot be replayed into another one.

A notice is information for the person, never authority: membership is what the signed roster
says (the notice carries the roster epoch that made the change, so a client can wait for it).

Payload (msgpack array): ``["notice", 1, device, user, kind, group_topic, epoch, issued_at,
text]``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import msgpack

from meshchat.e2ee.keys import SigningKeyPair, verify
from meshchat.e2ee.trust import OrgTrust
from meshchat.envelope import Signed, decode
from meshchat.errors import E2EEError, EnvelopeError, TopicError
from meshchat.topics import GroupTopic, parse_topic, validate_name
from meshchat.wire import unpack

__all__ = [
    "MAX_NOTICE_TEXT",
    "NOTICE_DOMAIN",
    "Notice",
    "NoticeError",
    "NoticeKind",
    "sign_notice",
    "verify_notice",
]

NOTICE_DOMAIN: Final = b"mc-notice1"
MAX_NOTICE_TEXT: Final = 256
"""Characters of a notice's text."""
_TAG: Final = "notice"
_VERSION: Final = 1
_MAX_PAYLOAD: Final = 1024


class NoticeError(E2EEError):
    """A notice was refused (unknown signer, bad signature, out of scope, another device)."""


class NoticeKind(enum.StrEnum):
    """What happened to the user."""

    JOINED = "joined"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class Notice:
    """A notice for one device.

    Attributes:
        device: the device whose inbox it is for.
        user: the device's user.
        kind: joined or left.
        group_topic: the group (a site channel), ``mc/{org}/sites/{site}``.
        epoch: the roster epoch that made the change.
        issued_at: when it was made (unix seconds).
        text: what to show, e.g. "You joined the plant-3 channel".
    """

    device: str
    user: str
    kind: NoticeKind
    group_topic: str
    epoch: int
    issued_at: int
    text: str

    def __post_init__(self) -> None:
        """Check every field.

        Raises:
            EnvelopeError: a name, the group, a number or the text is invalid.
        """
        try:
            validate_name(self.device, "device name")
            validate_name(self.user, "user name")
            if not isinstance(parse_topic(self.group_topic), GroupTopic):
                raise EnvelopeError(f"a notice names {self.group_topic!r}, which is not a group")
        except TopicError as exc:
            raise EnvelopeError(f"notice is invalid: {exc}") from exc
        for what, value in (("epoch", self.epoch), ("issued_at", self.issued_at)):
            if type(value) is not int or not 0 <= value < 2**63:
                raise EnvelopeError(f"notice {what} must be an unsigned integer")
        if len(self.text) > MAX_NOTICE_TEXT:
            raise EnvelopeError(f"notice text must be at most {MAX_NOTICE_TEXT} characters")

    def encode(self) -> bytes:
        """The canonical payload, what the signer signs."""
        packed: bytes = msgpack.packb(
            [
                _TAG,
                _VERSION,
                self.device,
                self.user,
                self.kind.value,
                self.group_topic,
                self.epoch,
                self.issued_at,
                self.text,
            ],
            use_bin_type=True,
        )
        return packed

    @classmethod
    def decode(cls, payload: bytes) -> Notice:
        """Parse a notice payload.

        Raises:
            EnvelopeError: malformed, of another version, or not canonical.
        """
        if len(payload) > _MAX_PAYLOAD:
            raise EnvelopeError(f"notice is over {_MAX_PAYLOAD} bytes")
        fields = unpack(payload, "notice", max_str=_MAX_PAYLOAD, max_bin=0, max_array=16)
        match fields:
            case [
                str(tag),
                int(version),
                str(device),
                str(user),
                str(kind),
                str(group_topic),
                int(epoch),
                int(issued_at),
                str(text),
            ] if tag == _TAG and version == _VERSION and kind in NoticeKind.__members__.values():
                notice = cls(device, user, NoticeKind(kind), group_topic, epoch, issued_at, text)
                if notice.encode() != payload:
                    raise EnvelopeError("notice is not in canonical form")
                return notice
        raise EnvelopeError("notice has the wrong fields or version")


def sign_notice(notice: Notice, key: SigningKeyPair, signer: str) -> Signed:
    """The `Signed` envelope to publish to the notice's device inbox.

    Args:
        notice: the notice.
        key: a roster signer's key (the geofence worker's, for site channels).
        signer: the name the trust bundle certifies that key as (``geofence``).
    """
    payload = notice.encode()
    return Signed(signer, payload, key.sign(NOTICE_DOMAIN, payload))


def verify_notice(trust: OrgTrust, envelope: Signed | bytes, *, device: str) -> Notice:
    """Check a notice that arrived in `device`'s inbox and return it.

    Raises:
        NoticeError: the signer is not certified, the signature is bad, the group is outside
            the signer's scope, or the notice is for another device.
        EnvelopeError: the envelope or the payload is malformed.
    """
    signed = decode(envelope) if isinstance(envelope, bytes) else envelope
    if not isinstance(signed, Signed):
        raise EnvelopeError("a notice is a signed envelope")
    cert = trust.signer(signed.signer)
    if cert is None:
        raise NoticeError(f"notice signer {signed.signer!r} is not certified by the org root")
    if not verify(cert.public, NOTICE_DOMAIN, signed.payload, signed.sig):
        raise NoticeError(f"notice signed as {signed.signer} has a bad signature")
    notice = Notice.decode(signed.payload)
    if not notice.group_topic.startswith(cert.scope):
        raise NoticeError(
            f"{signed.signer} may speak of groups under {cert.scope} only, not {notice.group_topic}"
        )
    if notice.device != device:
        raise NoticeError(f"a notice for {notice.device} arrived in {device}'s inbox")
    return notice
