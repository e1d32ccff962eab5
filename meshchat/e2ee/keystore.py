"""The key store: the only module of `meshchat.e2ee` that touches files.

Secrets live in one private directory (mode 0700), each in its own file with mode 0600, written
atomically (temporary file, fsync, rename, fsync of the directory) so a crash leaves the old or
the new key, never half of one. A file that others may read is refused, not used. The org root
key is kept under a passphrase: argon2id (libsodium's moderate limits, 256 MiB) derives the key of a
SecretBox (XSalsa20-Poly1305).
"""

from __future__ import annotations

import os
import re
import stat
import struct
from pathlib import Path
from typing import Final

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from meshchat.errors import ConfigError, E2EEError
from meshchat.files import write_private

__all__ = ["KeyStore", "WrongPassphraseError"]

_NAME: Final = re.compile(r"\A[a-z0-9][a-z0-9.-]{0,63}\Z")
_SEALED_MAGIC: Final = b"MCK1"
_HEADER: Final = struct.Struct(">4s16sQQ")


class WrongPassphraseError(E2EEError):
    """The passphrase does not open the key."""


class KeyStore:
    """Secret files of one device profile (or of the org's keys) in one private directory."""

    def __init__(self, directory: Path) -> None:
        """Use `directory`, creating it private when missing.

        Raises:
            ConfigError: it cannot be created, or others may read or write it.
        """
        self.directory = directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"key store {directory} cannot be created: {exc.strerror}") from exc
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"key store {directory} is open to other users (mode {mode:o}); "
                f"run `chmod 700 {directory}`"
            )

    def _path(self, name: str) -> Path:
        if not _NAME.match(name):
            msg = f"key name {name!r} must be 1-64 characters of a-z, 0-9, '.' and '-'"
            raise ConfigError(msg)
        return self.directory / name

    def save(self, name: str, secret: bytes) -> None:
        """Write a secret atomically and durably, readable by this user only."""
        write_private(self._path(name), secret)

    def load(self, name: str) -> bytes | None:
        """A secret, or None when there is none.

        Raises:
            ConfigError: the file is readable by others (it is not used).
        """
        path = self._path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o077:
                raise ConfigError(
                    f"key file {path} is open to other users (mode {mode:o}); it was not used. "
                    f"Run `chmod 600 {path}` if you trust its content"
                )
            with os.fdopen(os.dup(fd), "rb") as file:
                return file.read()
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        """Remove a secret (no error when it is not there)."""
        self._path(name).unlink(missing_ok=True)

    def save_sealed(self, name: str, secret: bytes, passphrase: str) -> None:
        """Store a secret under a passphrase (argon2id with libsodium's moderate limits)."""
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        ops = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
        mem = nacl.pwhash.argon2id.MEMLIMIT_MODERATE
        key = nacl.pwhash.argon2id.kdf(
            nacl.secret.SecretBox.KEY_SIZE, passphrase.encode("utf-8"), salt, ops, mem
        )
        header = _HEADER.pack(_SEALED_MAGIC, salt, ops, mem)
        sealed = nacl.secret.SecretBox(key).encrypt(secret)
        self.save(name, header + bytes(sealed))

    def load_sealed(self, name: str, passphrase: str) -> bytes | None:
        """A secret stored with `save_sealed`, or None when there is none.

        Raises:
            WrongPassphraseError: the passphrase does not open it.
            ConfigError: the file is not a sealed key, or is open to others.
        """
        data = self.load(name)
        if data is None:
            return None
        if len(data) < _HEADER.size or data[:4] != _SEALED_MAGIC:
            raise ConfigError(f"{self.directory / name} is not a passphrase-protected key")
        _, salt, ops, mem = _HEADER.unpack_from(data)
        if (
            ops > nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE
            or mem > nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE
        ):
            raise ConfigError(f"{self.directory / name} asks for absurd argon2id limits")
        key = nacl.pwhash.argon2id.kdf(
            nacl.secret.SecretBox.KEY_SIZE, passphrase.encode("utf-8"), salt, ops, mem
        )
        try:
            return bytes(nacl.secret.SecretBox(key).decrypt(data[_HEADER.size :]))
        except nacl.exceptions.CryptoError as exc:
            raise WrongPassphraseError(f"the passphrase does not open {name}") from exc
