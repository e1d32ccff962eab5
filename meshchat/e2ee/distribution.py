"""Chain distributions: hand a chain's current position to each recipient device, fast.

A rekey of a 1,000-device group must cost at most 60 ms of CPU and 230 bytes per recipient
(DESIGN.md section 8). A SealedBox and a signature per recipient cost about 85 ms there, so a
rekey is sealed as one batch:

- one ephemeral X25519 key ``E`` per rekey;
- one *statement* ``[group path, chain id, index, chain verify key, E public]``, signed once by
  the sending device's Ed25519 key (domain ``mc-dist1``); the path is ``dept/group``, the org is
  the one whose inbox topic carried the copy (leaving ``mc/{org}/`` out saves bytes per copy);
- per recipient ``R``: the chain key encrypted with XChaCha20-Poly1305 under
  ``BLAKE2b(X25519(E, R) || E || R)``, with the statement and the recipient's name as AAD.

Like a SealedBox, only the holder of ``R``'s secret key can read its copy, and the ephemeral key
is forgotten after the batch; the signature over ``E`` proves the sender made every copy, so no
one can substitute a chain key. Sans-IO.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgpack
import nacl.bindings
import nacl.exceptions
import nacl.public

from meshchat.e2ee.chain import ChainShare
from meshchat.e2ee.keys import BoxKeyPair, SigningKeyPair, verify
from meshchat.envelope import MAX_STATEMENT_LEN, Distribution
from meshchat.errors import DecryptError, EnvelopeError, TopicError
from meshchat.topics import GroupTopic, parse_topic
from meshchat.wire import unpack

__all__ = ["ReceivedShare", "open_distribution", "seal_distribution"]

_DOMAIN: Final = b"mc-dist1"
_KEY_PERSON: Final = b"mc-dist-key1"
_AAD_DOMAIN: Final = b"mc-dist-aad1"
_NONCE: Final = bytes(24)
"""Every recipient key is used for exactly one encryption, so a fixed nonce is safe."""


@dataclass(frozen=True, slots=True)
class ReceivedShare:
    """A verified distribution: which group's chain, from which device, from which position."""

    group_topic: str
    sender: str
    share: ChainShare


def _recipient_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return hashlib.blake2b(
        shared + ephemeral + recipient, digest_size=32, person=_KEY_PERSON
    ).digest()


def _aad(statement: bytes, recipient: str) -> bytes:
    return _AAD_DOMAIN + statement + b"\x00" + recipient.encode("utf-8")


def seal_distribution(
    *,
    sender: str,
    device_key: SigningKeyPair,
    group_topic: str,
    share: ChainShare,
    recipients: Mapping[str, bytes],
) -> dict[str, Distribution]:
    """One `Distribution` envelope per recipient device for a chain position.

    Args:
        sender: the sending device's name.
        device_key: the sending device's Ed25519 key.
        group_topic: the group the chain belongs to.
        share: the chain position to hand out.
        recipients: recipient device names and their X25519 public keys.

    Raises:
        TopicError: `group_topic` is not a group topic.
    """
    group = parse_topic(group_topic)
    if not isinstance(group, GroupTopic):
        raise TopicError(f"{group_topic!r} is not a group topic", part="topic", value=group_topic)
    ephemeral = nacl.public.PrivateKey.generate()
    ephemeral_public = bytes(ephemeral.public_key)
    statement: bytes = msgpack.packb(
        [group.path, share.chain_id, share.index, share.verify_key, ephemeral_public],
        use_bin_type=True,
    )
    signature = device_key.sign(_DOMAIN, statement)
    copies: dict[str, Distribution] = {}
    for name, public in recipients.items():
        shared = nacl.bindings.crypto_box_beforenm(public, bytes(ephemeral))
        key = _recipient_key(shared, ephemeral_public, public)
        sealed = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            share.chain_key, _aad(statement, name), _NONCE, key
        )
        copies[name] = Distribution(sender, statement, sealed, signature)
    return copies


def _parse_statement(statement: bytes) -> tuple[str, int, int, bytes, bytes]:
    fields = unpack(
        statement, "distribution statement", max_str=MAX_STATEMENT_LEN, max_bin=64, max_array=5
    )
    match fields:
        case [str(topic), int(chain_id), int(index), bytes(vk), bytes(epk)] if (
            0 < chain_id < 2**32
            and 0 <= index < 2**32
            and len(vk) == 32
            and len(epk) == 32
            and not isinstance(chain_id, bool)
            and not isinstance(index, bool)
        ):
            return topic, chain_id, index, vk, epk
    raise EnvelopeError("distribution statement has the wrong fields")


def open_distribution(
    envelope: Distribution,
    *,
    org: str,
    recipient: str,
    box_key: BoxKeyPair,
    sender_key: bytes,
) -> ReceivedShare:
    """Verify a distribution and recover the chain position it carries.

    Args:
        envelope: what arrived in this device's inbox.
        org: the org of that inbox (the statement names the group within it).
        recipient: this device's name.
        box_key: this device's X25519 key.
        sender_key: the Ed25519 public key of `envelope.sender`, from its verified key record.

    Raises:
        DecryptError: bad signature, or the copy is not for this device or was altered.
        EnvelopeError: the statement is malformed.
    """
    if not verify(sender_key, _DOMAIN, envelope.statement, envelope.sig):
        raise DecryptError(
            f"distribution from {envelope.sender} has a bad signature", reason="bad-signature"
        )
    path, chain_id, index, verify_key, ephemeral_public = _parse_statement(envelope.statement)
    topic = f"mc/{org}/{path}"
    try:
        if path.count("/") != 1 or not isinstance(parse_topic(topic), GroupTopic):
            raise EnvelopeError(f"distribution names {path!r}, which is not a group")
    except TopicError as exc:
        raise EnvelopeError(f"distribution names a bad group: {exc}") from exc
    shared = nacl.bindings.crypto_box_beforenm(ephemeral_public, box_key.secret)
    key = _recipient_key(shared, ephemeral_public, box_key.public)
    try:
        chain_key = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            envelope.key, _aad(envelope.statement, recipient), _NONCE, key
        )
    except nacl.exceptions.CryptoError as exc:
        raise DecryptError(
            f"distribution from {envelope.sender} is not for {recipient} or was altered",
            reason="bad-ciphertext",
        ) from exc
    return ReceivedShare(topic, envelope.sender, ChainShare(chain_id, index, chain_key, verify_key))
