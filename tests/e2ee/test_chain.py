"""Sender-key chains: messages decrypt for members, and nothing forged, altered or replayed does."""

from __future__ import annotations

import copy
import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.e2ee import (
    MAX_CHAIN_AGE,
    MAX_CHAIN_MESSAGES,
    MAX_FORWARD_JUMP,
    MAX_SKIPPED_KEYS,
    InboundChain,
    OutboundChain,
)
from meshchat.envelope import GroupMessage, decode, encode
from meshchat.errors import (
    DecryptError,
    DuplicateMessageError,
    EnvelopeError,
    ReplayError,
)

GROUP = "mc/acme/ops/line1"
OTHER = "mc/acme/ops/line2"
NOW = 1_800_000_000.0


def pair() -> tuple[OutboundChain, InboundChain]:
    alice = OutboundChain.new(now=NOW)
    return alice, InboundChain.from_share(alice.share(), sender="alice-phone")


def state(chain: InboundChain) -> tuple[object, ...]:
    return (chain.index, chain.chain_key, dict(chain.skipped), dict(chain.seen))


def test_round_trip_in_order() -> None:
    alice, bob = pair()
    for number in range(50):
        text = f"message {number}".encode()
        assert bob.decrypt(GROUP, alice.encrypt(GROUP, text)) == text
    assert bob.index == 50
    assert not bob.skipped


@settings(max_examples=50)
@given(st.permutations(list(range(20))))
def test_any_delivery_order_within_the_window(order: list[int]) -> None:
    alice, bob = pair()
    sent = [alice.encrypt(GROUP, f"m{i}".encode()) for i in range(20)]
    for i in order:
        assert bob.decrypt(GROUP, sent[i]) == f"m{i}".encode()
    assert not bob.skipped  # every skipped key was used once and forgotten


def test_redelivery_is_a_duplicate_and_a_different_envelope_is_an_alarm() -> None:
    alice, bob = pair()
    restored = copy.deepcopy(alice)  # the sender's state as a backup would bring it back
    first = alice.encrypt(GROUP, b"hello")
    bob.decrypt(GROUP, first)
    with pytest.raises(DuplicateMessageError):
        bob.decrypt(GROUP, first)
    other = restored.encrypt(GROUP, b"hello")  # same (chain, index), different envelope
    assert other.index == first.index
    with pytest.raises(ReplayError):
        bob.decrypt(GROUP, other)
    with pytest.raises(DuplicateMessageError):
        bob.decrypt(GROUP, other, history=True)  # re-reading history never alarms


def test_rollback_of_sender_state_never_reuses_a_nonce() -> None:
    alice, _ = pair()
    snapshot = copy.deepcopy(alice)
    first = alice.encrypt(GROUP, b"same text")
    second = snapshot.encrypt(GROUP, b"same text")  # the restored state reuses index 0
    assert first.index == second.index == 0
    # Different random guards give different nonces, so the ciphertexts differ entirely.
    assert first.body[:4] != second.body[:4]
    assert first.body[4:] != second.body[4:]


def test_every_single_byte_flip_is_rejected_and_changes_nothing() -> None:
    alice, bob = pair()
    bob.decrypt(GROUP, alice.encrypt(GROUP, b"warm-up"))
    wire = encode(alice.encrypt(GROUP, b"the message that matters"))
    before = state(bob)
    for position in range(len(wire)):
        for flip in (0x01, 0x80, 0xFF):
            mutated = bytearray(wire)
            mutated[position] ^= flip
            try:
                envelope = decode(bytes(mutated))
            except EnvelopeError:
                continue
            assert isinstance(envelope, GroupMessage)
            with pytest.raises(DecryptError):
                bob.decrypt(GROUP, envelope)
            assert state(bob) == before, f"state changed after a flip at byte {position}"
    envelope = decode(wire)
    assert isinstance(envelope, GroupMessage)
    assert bob.decrypt(GROUP, envelope) == b"the message that matters"


def test_message_replayed_onto_another_group_fails() -> None:
    alice, bob = pair()
    with pytest.raises(DecryptError) as caught:
        bob.decrypt(OTHER, alice.encrypt(GROUP, b"for line1 only"))
    assert caught.value.reason == "bad-signature"


def test_a_member_cannot_forge_messages_on_another_members_chain() -> None:
    alice, bob = pair()
    # Mallory is a member: she holds alice's chain key (as every reader does) but not the
    # chain's signing key, so she signs with a key of her own.
    mallory = copy.deepcopy(alice)
    mallory.signing_seed = OutboundChain.new(now=NOW).signing_seed
    forged = mallory.encrypt(GROUP, b"pay mallory")
    with pytest.raises(DecryptError) as caught:
        bob.decrypt(GROUP, forged)
    assert caught.value.reason == "bad-signature"
    assert bob.index == 0


def test_message_of_another_chain_is_refused() -> None:
    alice, bob = pair()
    carol = OutboundChain.new(now=NOW)
    with pytest.raises(DecryptError) as caught:
        bob.decrypt(GROUP, carol.encrypt(GROUP, b"x"))
    assert caught.value.reason == "unknown-chain"
    del alice


def test_late_joiner_reads_from_the_current_position_only() -> None:
    alice = OutboundChain.new(now=NOW)
    early = [alice.encrypt(GROUP, f"before {i}".encode()) for i in range(3)]
    dave = InboundChain.from_share(alice.share(), sender="alice-phone")
    later = alice.encrypt(GROUP, b"after joining")
    assert dave.decrypt(GROUP, later) == b"after joining"
    for envelope in early:
        with pytest.raises(DecryptError) as caught:
            dave.decrypt(GROUP, envelope)
        assert caught.value.reason == "key-unavailable"


def test_forward_jumps_and_skipped_keys_are_bounded() -> None:
    alice, bob = pair()
    alice.index = MAX_FORWARD_JUMP + 1
    for _ in range(MAX_FORWARD_JUMP + 1):
        alice.chain_key = _advance(alice.chain_key)
    with pytest.raises(DecryptError) as caught:
        bob.decrypt(GROUP, alice.encrypt(GROUP, b"too far"))
    assert caught.value.reason == "too-far-ahead"
    assert bob.index == 0

    alice2, bob2 = pair()
    sent = [alice2.encrypt(GROUP, b"x") for _ in range(MAX_SKIPPED_KEYS + 10)]
    bob2.decrypt(GROUP, sent[MAX_FORWARD_JUMP - 1])
    bob2.decrypt(GROUP, sent[-1])
    assert len(bob2.skipped) <= MAX_SKIPPED_KEYS
    with pytest.raises(DecryptError):  # the oldest skipped keys were dropped
        bob2.decrypt(GROUP, sent[0])


def _advance(chain_key: bytes) -> bytes:
    """The ratchet step, spelled out as DESIGN.md states it."""
    return hashlib.blake2b(b"\x02", key=chain_key, digest_size=32, person=b"mc-chain-ck1").digest()


def test_rotation_is_due_after_1000_messages_or_7_days() -> None:
    chain = OutboundChain.new(now=NOW)
    assert not chain.needs_rotation(now=NOW)
    assert chain.needs_rotation(now=NOW + MAX_CHAIN_AGE)
    chain.index = MAX_CHAIN_MESSAGES - 1
    assert not chain.needs_rotation(now=NOW)
    chain.encrypt(GROUP, b"x")
    assert chain.needs_rotation(now=NOW)


def test_ratchet_follows_the_documented_kdf() -> None:
    alice, bob = pair()
    ck0 = alice.chain_key
    alice.encrypt(GROUP, b"x")
    assert alice.chain_key == _advance(ck0)
    assert bob.chain_key == ck0


def test_random_mixed_traffic_never_corrupts_state() -> None:
    rng = random.Random(7)
    alice, bob = pair()
    sent = [alice.encrypt(GROUP, f"{i}".encode()) for i in range(200)]
    delivered = set()
    for _ in range(600):
        i = rng.randrange(len(sent))
        if i in delivered:
            with pytest.raises(DuplicateMessageError):
                bob.decrypt(GROUP, sent[i])
        else:
            assert bob.decrypt(GROUP, sent[i]) == f"{i}".encode()
            delivered.add(i)


@pytest.mark.parametrize(
    ("field", "length"), [("verify_key", 31), ("verify_key", 33), ("chain_key", 16)]
)
def test_a_chain_with_a_key_of_the_wrong_length_cannot_be_built(field: str, length: int) -> None:
    # Verification hands the verify key straight to libsodium, which reads 32 bytes: a chain
    # restored from a damaged state file must fail here, not read past the key.
    alice = OutboundChain.new(now=NOW)
    share = alice.share()
    keys = {"verify_key": share.verify_key, "chain_key": share.chain_key, field: bytes(length)}
    with pytest.raises(ValueError, match=field.replace("_", " ")):
        InboundChain(share.chain_id, "alice-phone", keys["verify_key"], 0, keys["chain_key"])
