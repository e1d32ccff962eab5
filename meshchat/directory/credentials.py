"""Password hashes (argon2id) and device tokens; comparisons are constant-time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final

import nacl.exceptions
import nacl.pwhash

__all__ = [
    "hash_password",
    "hash_token",
    "mosquitto_hash",
    "new_token",
    "verify_password",
    "verify_token",
]

_TOKEN_PERSON: Final = b"meshchat-token1"
MIN_PASSWORD_LEN: Final = 8
MAX_PASSWORD_LEN: Final = 1024


def hash_password(password: str) -> str:
    """An argon2id hash (libsodium's interactive limits) of a password.

    Raises:
        ValueError: the password is shorter than 8 or longer than 1024 characters.
    """
    if not MIN_PASSWORD_LEN <= len(password) <= MAX_PASSWORD_LEN:
        msg = f"a password must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters long"
        raise ValueError(msg)
    hashed: bytes = nacl.pwhash.argon2id.str(
        password.encode("utf-8"),
        opslimit=nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE,
        memlimit=nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE,
    )
    return hashed.decode("ascii")


def verify_password(stored: str | None, password: str) -> bool:
    """Whether `password` matches the stored argon2id hash (False when there is none)."""
    if not stored or len(password) > MAX_PASSWORD_LEN:
        return False
    try:
        return bool(nacl.pwhash.verify(stored.encode("ascii"), password.encode("utf-8")))
    except (nacl.exceptions.InvalidkeyError, nacl.exceptions.CryptoError, ValueError):
        return False


MOSQUITTO_PASSWORD_ITERATIONS: Final = 210_000
"""PBKDF2-SHA512 rounds for passwords in Mosquitto's password file (OWASP's 2023 figure)."""
MOSQUITTO_TOKEN_ITERATIONS: Final = 1_000
"""Tokens are 256-bit random: no dictionary to slow down, so few rounds keep connects cheap."""


def mosquitto_hash(secret: str, *, iterations: int = MOSQUITTO_PASSWORD_ITERATIONS) -> str:
    """The secret in Mosquitto's password-file format (``$7$``: PBKDF2-SHA512, 12-byte salt).

    An external Mosquitto cannot check argon2id, so the directory keeps this second hash for
    `meshchat deploy mosquitto`; it is never used by the embedded broker.
    """
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def new_token() -> str:
    """A fresh device token: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Tokens are high-entropy, so a keyed-free BLAKE2b hash is enough (and fast at connect)."""
    return hashlib.blake2b(token.encode("utf-8"), digest_size=32, person=_TOKEN_PERSON).hexdigest()


def verify_token(stored: str | None, token: str) -> bool:
    """Whether `token` matches the stored token hash."""
    if not stored or len(token) > MAX_PASSWORD_LEN:
        return False
    return hmac.compare_digest(stored, hash_token(token))
