"""The key store: secrets in 0600 files, written atomically, refused when others may read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshchat.e2ee import KeyStore, WrongPassphraseError
from meshchat.errors import ConfigError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_are_private_files(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    store.save("device.sign", b"\x01" * 32)
    store.save("device.box", b"\x02" * 32)
    assert mode(tmp_path / "keys") == 0o700
    for name in ("device.sign", "device.box"):
        assert mode(tmp_path / "keys" / name) == 0o600
    assert store.load("device.sign") == b"\x01" * 32
    assert store.load("missing") is None
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["device.box", "device.sign"]


def test_overwrite_is_atomic_and_stays_private(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    store.save("chain", b"old")
    old_umask = os.umask(0)  # even a careless umask must not widen the file
    try:
        store.save("chain", b"new")
    finally:
        os.umask(old_umask)
    assert store.load("chain") == b"new"
    assert mode(tmp_path / "keys" / "chain") == 0o600


def test_files_open_to_others_are_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    store.save("device.sign", b"secret")
    (tmp_path / "keys" / "device.sign").chmod(0o644)
    with pytest.raises(ConfigError, match="open to other users"):
        store.load("device.sign")
    (tmp_path / "keys").chmod(0o755)
    with pytest.raises(ConfigError, match="chmod 700"):
        KeyStore(tmp_path / "keys")


def test_bad_names_are_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    for name in ("../escape", "", "UPPER", ".hidden"):
        with pytest.raises(ConfigError, match="key name"):
            store.save(name, b"x")


def test_passphrase_protected_root_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    store.save_sealed("org.root", b"\x07" * 32, "correct horse battery staple")
    raw = (tmp_path / "keys" / "org.root").read_bytes()
    assert b"\x07" * 32 not in raw
    assert store.load_sealed("org.root", "correct horse battery staple") == b"\x07" * 32
    with pytest.raises(WrongPassphraseError):
        store.load_sealed("org.root", "wrong")
    store.save("plain", b"x" * 80)
    with pytest.raises(ConfigError, match="not a passphrase-protected key"):
        store.load_sealed("plain", "any")
