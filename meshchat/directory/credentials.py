"""Password hashes (argon2id) and device tokens; comparisons are constant-time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

import nacl.exceptions
import nacl.pwhash

__all__ = ["hash_password", "hash_token", "new_token", "verify_password", "verify_token"]

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
