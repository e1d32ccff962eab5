"""Chain distributions: only the intended device can open its copy, and nothing can be forged."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from meshchat.e2ee import (
    BoxKeyPair,
    OutboundChain,
    SigningKeyPair,
    open_distribution,
    seal_distribution,
    sign,
    verify,
)
from meshchat.e2ee.chain import InboundChain
from meshchat.envelope import Distribution, decode, encode
from meshchat.errors import DecryptError, EnvelopeError, TopicError

GROUP = "mc/acme/ops/line1"
NOW = 1_800_000_000.0


@dataclasses.dataclass
class Device:
    name: str
    signing: SigningKeyPair = dataclasses.field(default_factory=SigningKeyPair.generate)
    box: BoxKeyPair = dataclasses.field(default_factory=BoxKeyPair.generate)


ALICE, BOB, CAROL = Device("alice-phone"), Device("bob-laptop"), Device("carol-phone")


def distribute(chain: OutboundChain, *recipients: Device) -> dict[str, Distribution]:
    return seal_distribution(
        sender=ALICE.name,
        device_key=ALICE.signing,
        group_topic=GROUP,
        share=chain.share(),
        recipients={device.name: device.box.public for device in recipients},
    )


def test_each_recipient_opens_its_copy_and_reads_the_chain() -> None:
    chain = OutboundChain.new(now=NOW)
    copies = distribute(chain, BOB, CAROL)
    message = chain.encrypt(GROUP, b"hello both")
    for device in (BOB, CAROL):
        wire = encode(copies[device.name])  # through the wire format, as over MQTT
        envelope = decode(wire)
        assert isinstance(envelope, Distribution)
        received = open_distribution(
            envelope,
            org="acme",
            recipient=device.name,
            box_key=device.box,
            sender_key=ALICE.signing.public,
        )
        assert (received.group_topic, received.sender) == (GROUP, ALICE.name)
        assert GROUP.encode() not in copies[device.name].statement  # the org is implied
        reader = InboundChain.from_share(received.share, sender=received.sender)
        assert reader.decrypt(GROUP, message) == b"hello both"


def test_copy_is_within_the_per_recipient_byte_budget() -> None:
    # The benchmark's case: an 11-character sender on a 23-character group topic.
    copies = seal_distribution(
        sender="alice-phone",
        device_key=ALICE.signing,
        group_topic="mc/acme/ops/night-shift",
        share=OutboundChain.new(now=NOW).share(),
        recipients={BOB.name: BOB.box.public},
    )
    assert len(encode(copies[BOB.name])) <= 230


def test_a_copy_for_bob_is_useless_to_carol() -> None:
    copies = distribute(OutboundChain.new(now=NOW), BOB, CAROL)
    with pytest.raises(DecryptError) as caught:
        open_distribution(
            copies[BOB.name],
            org="acme",
            recipient=CAROL.name,
            box_key=CAROL.box,
            sender_key=ALICE.signing.public,
        )
    assert caught.value.reason == "bad-ciphertext"
    # Even relabelled as hers (the name is bound into the AAD, the key into the ECDH).
    with pytest.raises(DecryptError):
        open_distribution(
            copies[BOB.name],
            org="acme",
            recipient=BOB.name,
            box_key=CAROL.box,
            sender_key=ALICE.signing.public,
        )


def test_forged_and_altered_distributions_are_refused() -> None:
    copy = distribute(OutboundChain.new(now=NOW), BOB)[BOB.name]
    mallory = SigningKeyPair.generate()

    def opened(envelope: Distribution, sender_key: bytes = ALICE.signing.public) -> None:
        open_distribution(
            envelope, org="acme", recipient=BOB.name, box_key=BOB.box, sender_key=sender_key
        )

    with pytest.raises(DecryptError, match="bad signature"):
        opened(copy, sender_key=mallory.public)  # claims alice, verified against another key
    statement = msgpack.unpackb(copy.statement)
    statement[1] ^= 1  # another chain id
    altered = dataclasses.replace(copy, statement=msgpack.packb(statement))
    with pytest.raises(DecryptError, match="bad signature"):
        opened(altered)
    tampered_key = dataclasses.replace(copy, key=bytes([copy.key[0] ^ 1]) + copy.key[1:])
    with pytest.raises(DecryptError, match="not for bob-laptop or was altered"):
        opened(tampered_key)
    # Mallory signs her own statement about alice's device: still refused (wrong key).
    resigned = dataclasses.replace(copy, sig=mallory.sign(b"mc-dist1", copy.statement))
    with pytest.raises(DecryptError):
        opened(resigned)
    unsigned = dataclasses.replace(copy, sig=bytes(64))
    with pytest.raises(DecryptError):
        opened(unsigned)


def test_statement_must_name_a_group() -> None:
    copy = distribute(OutboundChain.new(now=NOW), BOB)[BOB.name]
    fields = msgpack.unpackb(copy.statement)
    fields[0] = "_k/alice"
    statement = msgpack.packb(fields)
    forged = dataclasses.replace(
        copy, statement=statement, sig=ALICE.signing.sign(b"mc-dist1", statement)
    )
    with pytest.raises(EnvelopeError, match="not a group"):
        open_distribution(
            forged, org="acme", recipient=BOB.name, box_key=BOB.box, sender_key=ALICE.signing.public
        )
    with pytest.raises(TopicError):
        seal_distribution(
            sender=ALICE.name,
            device_key=ALICE.signing,
            group_topic="mc/acme/_d/bob-laptop",
            share=OutboundChain.new(now=NOW).share(),
            recipients={},
        )


def test_signatures_are_domain_separated() -> None:
    key = SigningKeyPair.generate()
    signature = key.sign(b"mc-roster1", b"payload")
    assert verify(key.public, b"mc-roster1", b"payload", signature)
    assert not verify(key.public, b"mc-dist1", b"payload", signature)
    assert not verify(key.public, b"mc-roster1", b"payload!", signature)
    with pytest.raises(ValueError, match="unknown signature domain"):
        sign(key.seed, b"mc-made-up", b"payload")
    assert "seed" not in repr(key)
