"""Key pairs and domain-separated signatures (PyNaCl only).

Ed25519 keys sign, X25519 keys receive sealed payloads; the two are never derived from each
other. Every signature covers a domain string first, so a signature made for one purpose (a key
record, a roster, a distribution) can never be replayed as another.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Final, Self

import nacl.exceptions
import nacl.public
import nacl.signing

from meshchat.errors import E2EEError

__all__ = [
    "DOMAINS",
    "BoxKeyPair",
    "SigningKeyPair",
    "sign",
    "verify",
]

DOMAINS: Final = frozenset(
    {
        b"mc-dir-cert1",  # the root certifies the directory key
        b"mc-id-cert1",  # the directory certifies a user's identity key
        b"mc-devices1",  # an identity key signs its user's device list
        b"mc-roster1",  # a roster
        b"mc-dist1",  # a chain distribution
        b"mc-pair1",  # a pairwise payload (key request, withheld, direct message)
        b"mc-compliance1",  # the root certifies the org compliance key (X25519)
        b"mc-tlm-reader1",  # the geofence key certifies its telemetry reader key (X25519)
        b"mc-notice1",  # a roster signer's notice to one device's inbox (site joins, leaves)
    }
)
_SEED_LEN: Final = 32


def sign(seed: bytes, domain: bytes, message: bytes) -> bytes:
    """Ed25519 signature over ``domain || 0x00 || message``.

    Raises:
        ValueError: `domain` is not one of `DOMAINS`.
    """
    if domain not in DOMAINS:
        msg = f"unknown signature domain {domain!r}"
        raise ValueError(msg)
    signed = nacl.signing.SigningKey(seed).sign(domain + b"\x00" + message)
    return bytes(signed.signature)


def verify(public: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `public`'s over ``domain || 0x00 || message``."""
    if domain not in DOMAINS or len(public) != 32 or len(signature) != 64:
        return False
    try:
        nacl.signing.VerifyKey(public).verify(domain + b"\x00" + message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class SigningKeyPair:
    """An Ed25519 key: the seed is secret, the public key goes into records."""

    seed: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> Self:
        """A fresh random key."""
        return cls(secrets.token_bytes(_SEED_LEN))

    def __post_init__(self) -> None:
        """Check the seed length."""
        if len(self.seed) != _SEED_LEN:
            msg = "an Ed25519 seed is 32 bytes"
            raise E2EEError(msg)

    @property
    def public(self) -> bytes:
        """The 32-byte public key."""
        return bytes(nacl.signing.SigningKey(self.seed).verify_key)

    def sign(self, domain: bytes, message: bytes) -> bytes:
        """A domain-separated signature."""
        return sign(self.seed, domain, message)


@dataclass(frozen=True, slots=True)
class BoxKeyPair:
    """An X25519 key for payloads sealed to this device."""

    secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> Self:
        """A fresh random key."""
        return cls(bytes(nacl.public.PrivateKey.generate()))

    def __post_init__(self) -> None:
        """Check the key length."""
        if len(self.secret) != nacl.public.PrivateKey.SIZE:
            msg = "an X25519 secret key is 32 bytes"
            raise E2EEError(msg)

    @property
    def public(self) -> bytes:
        """The 32-byte public key."""
        return bytes(nacl.public.PrivateKey(self.secret).public_key)
