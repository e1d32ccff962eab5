"""The pairwise channel: key requests, withheld replies and direct messages between two devices."""

from __future__ import annotations

import dataclasses

import pytest

from meshchat.e2ee import (
    BoxKeyPair,
    Inner,
    Kind,
    PairKind,
    Pairwise,
    SigningKeyPair,
    WithheldReason,
    decode_inner,
    encode_inner,
    open_pairwise,
    seal_pairwise,
)
from meshchat.envelope import Sealed, decode, encode
from meshchat.errors import DecryptError, EnvelopeError

ALICE_SIGN, BOB_BOX, CAROL_BOX = (
    SigningKeyPair.generate(),
    BoxKeyPair.generate(),
    BoxKeyPair.generate(),
)
GROUP = "mc/acme/ops/line1"


def sealed(kind: PairKind, fields: tuple[object, ...], recipient: str = "bob-laptop") -> Sealed:
    envelope = seal_pairwise(
        sender="alice-phone",
        sender_key=ALICE_SIGN,
        recipient=recipient,
        recipient_box=BOB_BOX.public,
        kind=kind,
        fields=fields,
    )
    decoded = decode(encode(envelope))
    assert isinstance(decoded, Sealed)
    return decoded


def opened(
    envelope: Sealed, *, box: BoxKeyPair = BOB_BOX, sender_key: bytes | None = None
) -> Pairwise:
    return open_pairwise(
        envelope,
        recipient="bob-laptop",
        box_key=box,
        sender_key=sender_key or ALICE_SIGN.public,
    )


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (PairKind.KEY_REQUEST, (GROUP, 123, 0)),
        (PairKind.WITHHELD, (GROUP, 123, 0, 5, WithheldReason.BEFORE_JOIN.value)),
        (PairKind.DIRECT, (encode_inner(Inner(Kind.TEXT, 1_795_000_000, ("psst",))),)),
    ],
)
def test_each_kind_arrives_intact(kind: PairKind, fields: tuple[object, ...]) -> None:
    assert opened(sealed(kind, fields)) == Pairwise(kind, "alice-phone", "bob-laptop", fields)


def test_direct_message_carries_an_inner_message() -> None:
    inner = Inner(Kind.TEXT, 1_795_000_000, ("psst",))
    message = open_pairwise(
        sealed(PairKind.DIRECT, (encode_inner(inner),)),
        recipient="bob-laptop",
        box_key=BOB_BOX,
        sender_key=ALICE_SIGN.public,
    )
    payload = message.fields[0]
    assert isinstance(payload, bytes)
    assert decode_inner(payload) == inner


def test_only_the_recipient_can_open_it() -> None:
    with pytest.raises(DecryptError, match="not sealed to bob-laptop"):
        opened(sealed(PairKind.KEY_REQUEST, (GROUP, 1, 0)), box=CAROL_BOX)


def test_resigned_or_redirected_payloads_are_refused() -> None:
    original = sealed(PairKind.KEY_REQUEST, (GROUP, 1, 0))
    mallory = SigningKeyPair.generate()
    # Mallory signs alice's ciphertext as herself: the inner sender still says alice.
    stolen = dataclasses.replace(original, sender="mallory-phone")
    stolen = dataclasses.replace(stolen, sig=mallory.sign(b"mc-pair1", stolen.signed_part()))
    with pytest.raises(DecryptError, match="written by alice-phone"):
        opened(stolen, sender_key=mallory.public)
    with pytest.raises(DecryptError, match="bad signature"):
        opened(original, sender_key=mallory.public)
    # A payload written for carol's name, sealed to bob's key, is refused by bob.
    with pytest.raises(DecryptError, match="for carol-phone"):
        opened(sealed(PairKind.KEY_REQUEST, (GROUP, 1, 0), recipient="carol-phone"))


def test_bad_fields_are_refused_on_both_sides() -> None:
    with pytest.raises(EnvelopeError, match="wrong fields"):
        sealed(PairKind.KEY_REQUEST, (GROUP, "one", 0))
    with pytest.raises(EnvelopeError, match="reason 'because' is unknown"):
        sealed(PairKind.WITHHELD, (GROUP, 1, 0, 5, "because"))
