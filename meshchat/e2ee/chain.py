"""Group sender-key chains (DESIGN.md section 5): a BLAKE2b ratchet, XChaCha20-Poly1305, Ed25519.

Per (device, group) the sender keeps an `OutboundChain`; every member keeps an `InboundChain` per
sender chain it was given. For message ``i`` of a chain::

    ck[i+1]           = BLAKE2b-256(key=ck[i], 0x02)
    mk[i] || nonce[i] = BLAKE2b-448(key=ck[i], 0x01)
    body              = guard(4) || XChaCha20-Poly1305(mk[i], nonce[i] XOR guard, plaintext, aad)
    aad               = "mc-grp-aad1" || header byte || group id || chain id || index
    signature         = Ed25519(chain signing key, "mc-grp-sig1" || group id || signed part)

The group id is a hash of the group's topic, so a message replayed onto another group's topic
fails. Receivers verify the signature before decrypting, and advance their ratchet only after the
message authenticated. Every KDF and signature is domain-separated by a personalisation string.
Sans-IO: no sockets, no files, no asyncio.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass, field
from typing import Final, Self

import nacl.bindings
import nacl.exceptions
import nacl.signing

from meshchat.envelope import GUARD_LEN, GroupMessage
from meshchat.errors import DecryptError, DuplicateMessageError, ReplayError

__all__ = [
    "MAX_CHAIN_AGE",
    "MAX_CHAIN_MESSAGES",
    "MAX_FORWARD_JUMP",
    "MAX_SKIPPED_KEYS",
    "ChainShare",
    "InboundChain",
    "OutboundChain",
    "advance",
    "group_id",
]

MAX_CHAIN_MESSAGES: Final = 1000
"""Rotate after this many messages."""
MAX_CHAIN_AGE: Final = 7 * 24 * 3600
"""Rotate after this many seconds."""
MAX_FORWARD_JUMP: Final = 2 * MAX_CHAIN_MESSAGES
"""A receiver refuses to ratchet further than this past its position in one step."""
MAX_SKIPPED_KEYS: Final = 2 * MAX_CHAIN_MESSAGES
"""Keys of messages not yet arrived (out of order) kept per chain; the oldest go first."""

_CK_PERSON: Final = b"mc-chain-ck1"
_MK_PERSON: Final = b"mc-chain-mk1"
_GROUP_PERSON: Final = b"mc-group-id1"
_SIG_DOMAIN: Final = b"mc-grp-sig1"
_AAD_DOMAIN: Final = b"mc-grp-aad1"
_DIGEST_PERSON: Final = b"mc-env-digest1"
_KEY_LEN: Final = 32
_NONCE_LEN: Final = 24
_MAX_U32: Final = 2**32 - 1


@functools.lru_cache(maxsize=4096)
def group_id(group_topic: str) -> bytes:
    """The 32-byte id of a group, bound into every message's AAD and signature."""
    return hashlib.blake2b(
        group_topic.encode("utf-8"), digest_size=32, person=_GROUP_PERSON
    ).digest()


def _next_chain_key(chain_key: bytes) -> bytes:
    return hashlib.blake2b(b"\x02", key=chain_key, digest_size=_KEY_LEN, person=_CK_PERSON).digest()


def advance(chain_key: bytes, steps: int) -> bytes:
    """The chain key `steps` positions after `chain_key`."""
    for _ in range(steps):
        chain_key = _next_chain_key(chain_key)
    return chain_key


def _message_key(chain_key: bytes) -> bytes:
    """The message key and nonce: 32 + 24 bytes."""
    return hashlib.blake2b(
        b"\x01", key=chain_key, digest_size=_KEY_LEN + _NONCE_LEN, person=_MK_PERSON
    ).digest()


def _aad(header: bytes, gid: bytes, chain_id: int, index: int) -> bytes:
    return _AAD_DOMAIN + header + gid + struct.pack(">II", chain_id, index)


def _signed_bytes(gid: bytes, signed_part: bytes) -> bytes:
    return _SIG_DOMAIN + gid + signed_part


def _guarded_nonce(nonce: bytes, guard: bytes) -> bytes:
    mixed = int.from_bytes(nonce[:GUARD_LEN]) ^ int.from_bytes(guard)
    return mixed.to_bytes(GUARD_LEN) + nonce[GUARD_LEN:]


def _digest(envelope: GroupMessage, signed_part: bytes | None = None) -> bytes:
    """A short hash of the whole envelope: tells a redelivery from a replay."""
    part = envelope.signed_part() if signed_part is None else signed_part
    return hashlib.blake2b(part + envelope.sig, digest_size=16, person=_DIGEST_PERSON).digest()


@dataclass(frozen=True, slots=True)
class ChainShare:
    """What a member needs to read a chain from a position on: sent in a distribution."""

    chain_id: int
    index: int
    chain_key: bytes = field(repr=False)
    verify_key: bytes


@dataclass(slots=True)
class OutboundChain:
    """The sending side of one chain. Persist it (`to_bytes`) before every send's publish."""

    chain_id: int
    index: int
    chain_key: bytes = field(repr=False)
    signing_seed: bytes = field(repr=False)
    created_at: float
    _signer: tuple[bytes, nacl.signing.SigningKey] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def _signing_key(self) -> nacl.signing.SigningKey:
        """The signing key object, built once per seed (building it costs a third of a send)."""
        if self._signer is None or self._signer[0] != self.signing_seed:
            self._signer = (self.signing_seed, nacl.signing.SigningKey(self.signing_seed))
        return self._signer[1]

    @classmethod
    def new(cls, *, now: float) -> Self:
        """A fresh chain: random id, chain key and signing key, index 0."""
        return cls(
            chain_id=secrets.randbelow(_MAX_U32) + 1,
            index=0,
            chain_key=secrets.token_bytes(_KEY_LEN),
            signing_seed=secrets.token_bytes(_KEY_LEN),
            created_at=now,
        )

    @property
    def verify_key(self) -> bytes:
        """The public half of the chain's signing key."""
        return bytes(self._signing_key().verify_key)

    def share(self) -> ChainShare:
        """The current position, for a member joining now (adds get no earlier messages)."""
        return ChainShare(self.chain_id, self.index, self.chain_key, self.verify_key)

    def needs_rotation(self, *, now: float) -> bool:
        """Whether the chain is worn out (1000 messages or 7 days)."""
        return self.index >= MAX_CHAIN_MESSAGES or now - self.created_at >= MAX_CHAIN_AGE

    def encrypt(self, group_topic: str, plaintext: bytes) -> GroupMessage:
        """Encrypt and sign one message for `group_topic`, and advance the chain.

        Raises:
            ValueError: the chain's 32-bit index space is used up (rotate long before).
        """
        if self.index > _MAX_U32:
            msg = "chain exhausted: rotate"
            raise ValueError(msg)
        gid = group_id(group_topic)
        keys = _message_key(self.chain_key)
        guard = secrets.token_bytes(GUARD_LEN)
        header = GroupMessage.header()
        ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext,
            _aad(header, gid, self.chain_id, self.index),
            _guarded_nonce(keys[_KEY_LEN:], guard),
            keys[:_KEY_LEN],
        )
        unsigned = GroupMessage(self.chain_id, self.index, guard + ciphertext, bytes(64))
        signature = self._signing_key().sign(_signed_bytes(gid, unsigned.signed_part()))
        envelope = GroupMessage(self.chain_id, self.index, guard + ciphertext, signature.signature)
        self.chain_key = _next_chain_key(self.chain_key)
        self.index += 1
        return envelope


@dataclass(slots=True)
class InboundChain:
    """The receiving side of one sender's chain in one group."""

    chain_id: int
    sender: str
    verify_key: bytes
    index: int
    chain_key: bytes = field(repr=False)
    skipped: dict[int, bytes] = field(default_factory=dict, repr=False)
    seen: dict[int, bytes] = field(default_factory=dict, repr=False)
    start_index: int = -1
    start_key: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        """Check the key lengths; the first position this device was given is where reading started.

        Raises:
            ValueError: a key of the wrong length (a corrupt state file or share).
        """
        if len(self.verify_key) != nacl.bindings.crypto_sign_PUBLICKEYBYTES:
            raise ValueError(f"chain {self.chain_id}'s verify key is {len(self.verify_key)} bytes")
        if len(self.chain_key) != _KEY_LEN:
            raise ValueError(f"chain {self.chain_id}'s chain key is {len(self.chain_key)} bytes")
        if self.start_index < 0:
            self.start_index, self.start_key = self.index, self.chain_key

    @classmethod
    def from_share(cls, share: ChainShare, *, sender: str) -> Self:
        """Start reading a chain at the position a distribution gave."""
        return cls(share.chain_id, sender, share.verify_key, share.index, share.chain_key)

    def extend_back(self, share: ChainShare) -> bool:
        """Take an earlier position of this chain (a key request's answer); never a later one.

        A share at or after the first position this device holds adds nothing and changes
        nothing: a re-sent distribution never replaces what the chain already knows. An earlier
        share must ratchet forward to exactly the key held at the first position.

        Returns:
            Whether earlier messages became readable.

        Raises:
            DecryptError: the share does not belong to this chain (another verify key, or its key
                does not ratchet to the one held), or reaches back too far.
        """
        if share.chain_id != self.chain_id or not hmac.compare_digest(
            share.verify_key, self.verify_key
        ):
            raise DecryptError(
                f"a share for chain {share.chain_id} does not match the chain held",
                reason="inconsistent-share",
            )
        if share.index >= self.start_index:
            return False
        gap = self.start_index - share.index
        if gap > MAX_SKIPPED_KEYS:
            raise DecryptError(
                f"a share reaches back {gap} messages; at most {MAX_SKIPPED_KEYS} are kept",
                reason="too-far-back",
            )
        chain_key = share.chain_key
        earlier: dict[int, bytes] = {}
        for position in range(share.index, self.start_index):
            earlier[position] = _message_key(chain_key)
            chain_key = _next_chain_key(chain_key)
        if not hmac.compare_digest(chain_key, self.start_key):
            raise DecryptError(
                f"a share for chain {share.chain_id} does not ratchet to the key held",
                reason="inconsistent-share",
            )
        self.skipped.update(earlier)
        while len(self.skipped) > MAX_SKIPPED_KEYS:
            del self.skipped[max(self.skipped)]
        self.start_index, self.start_key = share.index, share.chain_key
        return True

    def _verify(self, gid: bytes, envelope: GroupMessage, signed_part: bytes) -> None:
        try:
            nacl.bindings.crypto_sign_open(
                envelope.sig + _signed_bytes(gid, signed_part), self.verify_key
            )
        except nacl.exceptions.BadSignatureError as exc:
            raise DecryptError(
                f"message {envelope.chain_id}:{envelope.index} from {self.sender} has a bad "
                "signature (forged, altered, or sent to another group)",
                reason="bad-signature",
            ) from exc

    def _keys_for(self, index: int) -> tuple[bytes, bytes, dict[int, bytes]]:
        """(mk||nonce, chain key after it, keys skipped on the way) without touching state."""
        if index < self.index:
            keys = self.skipped.get(index)
            if keys is None:
                raise DecryptError(
                    f"the key of message {self.chain_id}:{index} is not available here "
                    "(sent before this device joined, or already read)",
                    reason="key-unavailable",
                )
            return keys, self.chain_key, {}
        if index - self.index > MAX_FORWARD_JUMP:
            raise DecryptError(
                f"message {self.chain_id}:{index} is {index - self.index} steps ahead; "
                f"at most {MAX_FORWARD_JUMP} are followed",
                reason="too-far-ahead",
            )
        chain_key = self.chain_key
        new_skipped: dict[int, bytes] = {}
        for position in range(self.index, index):
            new_skipped[position] = _message_key(chain_key)
            chain_key = _next_chain_key(chain_key)
        return _message_key(chain_key), _next_chain_key(chain_key), new_skipped

    def decrypt(self, group_topic: str, envelope: GroupMessage, *, history: bool = False) -> bytes:
        """Verify, then decrypt one message; the state changes only if it authenticated.

        Args:
            group_topic: the topic the message arrived on (binds it to its group).
            envelope: the decoded envelope.
            history: a re-read (from the archive): an already-read message is a duplicate, never
                an alarm.

        Raises:
            DuplicateMessageError: an identical envelope was read before (QoS 1 redelivery).
            ReplayError: a different envelope for a (chain, index) already read.
            DecryptError: wrong chain, bad signature, altered ciphertext, key unavailable.
        """
        if envelope.chain_id != self.chain_id:
            raise DecryptError("message belongs to another chain", reason="unknown-chain")
        gid = group_id(group_topic)
        signed_part = envelope.signed_part()
        self._verify(gid, envelope, signed_part)
        digest = _digest(envelope, signed_part)
        previous = self.seen.get(envelope.index)
        if previous is not None:
            if history or hmac.compare_digest(previous, digest):
                raise DuplicateMessageError(f"message {envelope.chain_id}:{envelope.index} again")
            raise ReplayError(
                f"a different message claims {envelope.chain_id}:{envelope.index} from "
                f"{self.sender}, which was already read"
            )
        keys, next_key, new_skipped = self._keys_for(envelope.index)
        guard, sealed = envelope.body[:GUARD_LEN], envelope.body[GUARD_LEN:]
        try:
            plaintext: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed,
                _aad(GroupMessage.header(), gid, envelope.chain_id, envelope.index),
                _guarded_nonce(keys[_KEY_LEN:], guard),
                keys[:_KEY_LEN],
            )
        except nacl.exceptions.CryptoError as exc:
            raise DecryptError(
                f"message {envelope.chain_id}:{envelope.index} failed authentication",
                reason="bad-ciphertext",
            ) from exc
        # Authenticated: now commit.
        if envelope.index >= self.index:
            self.skipped.update(new_skipped)
            self.chain_key = next_key
            self.index = envelope.index + 1
            while len(self.skipped) > MAX_SKIPPED_KEYS:
                del self.skipped[min(self.skipped)]
        else:
            del self.skipped[envelope.index]
        self.seen[envelope.index] = digest
        return plaintext
