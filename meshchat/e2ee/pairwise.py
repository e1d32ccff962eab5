"""The pairwise channel: payloads sealed to one device and signed by the sending device.

Used for key requests, ``withheld`` replies and direct messages. The payload is sealed with a
SealedBox to the recipient's X25519 key; the `Sealed` envelope's signature (domain ``mc-pair1``)
covers the sender's name and the ciphertext, and the sealed payload names sender and recipient
again, so a relay can neither re-sign someone else's payload as its own nor redirect it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import msgpack
import nacl.exceptions
import nacl.public

from meshchat.e2ee.keys import BoxKeyPair, SigningKeyPair, verify
from meshchat.envelope import MAX_SEALED_LEN, SIG_LEN, Sealed
from meshchat.errors import DecryptError, EnvelopeError
from meshchat.wire import unpack

__all__ = ["PairKind", "Pairwise", "WithheldReason", "open_pairwise", "seal_pairwise"]

_DOMAIN: Final = b"mc-pair1"


class PairKind(enum.IntEnum):
    """What a pairwise payload is."""

    KEY_REQUEST = 0
    """fields: group topic, chain id, first index wanted"""
    WITHHELD = 1
    """fields: group topic, chain id, first index, end index (exclusive), reason"""
    DIRECT = 2
    """fields: an encoded inner message (`meshchat.e2ee.plaintext`)"""


class WithheldReason(enum.StrEnum):
    """Why a key was not shared: shown to the user instead of "unable to decrypt"."""

    BEFORE_JOIN = "sent before you joined"
    NOT_MEMBER = "you are not a member"
    UNAVAILABLE = "the sender no longer has this key"


_FIELD_TYPES: Final = {
    PairKind.KEY_REQUEST: (str, int, int),
    PairKind.WITHHELD: (str, int, int, int, str),
    PairKind.DIRECT: (bytes,),
}


@dataclass(frozen=True, slots=True)
class Pairwise:
    """An opened pairwise payload."""

    kind: PairKind
    sender: str
    recipient: str
    fields: tuple[object, ...]


def seal_pairwise(
    *,
    sender: str,
    sender_key: SigningKeyPair,
    recipient: str,
    recipient_box: bytes,
    kind: PairKind,
    fields: tuple[object, ...],
) -> Sealed:
    """Seal a payload to one device and sign it as `sender`.

    Raises:
        EnvelopeError: the fields do not fit the kind.
    """
    _check_fields(kind, fields)
    inner: bytes = msgpack.packb([kind, sender, recipient, *fields], use_bin_type=True)
    sealed = nacl.public.SealedBox(nacl.public.PublicKey(recipient_box)).encrypt(inner)
    unsigned = Sealed(sender, bytes(sealed), bytes(SIG_LEN))
    return Sealed(sender, unsigned.sealed, sender_key.sign(_DOMAIN, unsigned.signed_part()))


def _check_fields(kind: PairKind, fields: tuple[object, ...]) -> None:
    types = _FIELD_TYPES[kind]
    if len(fields) != len(types) or not all(
        isinstance(value, expected) and not isinstance(value, bool)
        for value, expected in zip(fields, types, strict=True)
    ):
        raise EnvelopeError(f"{kind.name.lower()} payload has the wrong fields")
    if kind is PairKind.WITHHELD and fields[4] not in {r.value for r in WithheldReason}:
        raise EnvelopeError(f"withheld reason {fields[4]!r} is unknown")


def open_pairwise(
    envelope: Sealed, *, recipient: str, box_key: BoxKeyPair, sender_key: bytes
) -> Pairwise:
    """Verify and open a pairwise payload addressed to this device.

    Args:
        envelope: what arrived in this device's inbox.
        recipient: this device's name.
        box_key: this device's X25519 key.
        sender_key: the Ed25519 key of `envelope.sender`, from its verified key record.

    Raises:
        DecryptError: bad signature, not sealed to this device, or names another sender or
            recipient inside.
        EnvelopeError: the payload is malformed.
    """
    if not verify(sender_key, _DOMAIN, envelope.signed_part(), envelope.sig):
        raise DecryptError(
            f"pairwise payload from {envelope.sender} has a bad signature", reason="bad-signature"
        )
    try:
        inner = nacl.public.SealedBox(nacl.public.PrivateKey(box_key.secret)).decrypt(
            envelope.sealed
        )
    except nacl.exceptions.CryptoError as exc:
        raise DecryptError(
            f"pairwise payload from {envelope.sender} is not sealed to {recipient}",
            reason="bad-ciphertext",
        ) from exc
    items = unpack(
        inner, "pairwise payload", max_str=MAX_SEALED_LEN, max_bin=MAX_SEALED_LEN, max_array=9
    )
    match items:
        case [int(raw_kind), str(inner_sender), str(inner_recipient), *fields] if raw_kind in set(
            PairKind
        ):
            kind = PairKind(raw_kind)
        case _:
            raise EnvelopeError("pairwise payload has the wrong shape")
    if inner_sender != envelope.sender or inner_recipient != recipient:
        raise DecryptError(
            f"pairwise payload was written by {inner_sender} for {inner_recipient}, but arrived "
            f"from {envelope.sender} for {recipient}",
            reason="misdirected",
        )
    _check_fields(kind, tuple(fields))
    return Pairwise(kind, inner_sender, inner_recipient, tuple(fields))
