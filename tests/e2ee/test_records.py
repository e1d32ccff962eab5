"""Key records: verified through root, directory and identity keys; identity pinned on first use."""

from __future__ import annotations

import dataclasses

import pytest

from meshchat.e2ee import (
    BoxKeyPair,
    DeviceKeys,
    IdentityChangedError,
    KeyDirectory,
    KeyRecord,
    KeyRecordError,
    SigningKeyPair,
    certify_identity,
    certify_signer,
    sign_key_record,
)
from meshchat.envelope import Signed, decode, encode
from meshchat.errors import EnvelopeError

ROOT = SigningKeyPair.generate()
DIRECTORY = SigningKeyPair.generate()
CERT = certify_signer(ROOT, "dir", DIRECTORY.public, "mc/acme/")


def device(name: str) -> DeviceKeys:
    return DeviceKeys(name, SigningKeyPair.generate().public, BoxKeyPair.generate().public)


def record_for(
    user: str,
    identity: SigningKeyPair,
    version: int,
    *devices: DeviceKeys,
    directory: SigningKeyPair = DIRECTORY,
) -> Signed:
    record = KeyRecord(
        user, version, identity.public, certify_identity(directory, user, identity.public), devices
    )
    envelope = decode(encode(sign_key_record(record, identity)))
    assert isinstance(envelope, Signed)
    return envelope


def test_record_is_verified_and_devices_are_listed() -> None:
    keys = KeyDirectory(ROOT.public, CERT, org="acme")
    alice = SigningKeyPair.generate()
    phone, laptop = device("alice-phone"), device("alice-laptop")
    accepted = keys.accept(record_for("alice", alice, 1, phone, laptop), arrived_on_user="alice")
    assert keys.device("alice", "alice-phone") == phone
    assert accepted.version == 1
    assert keys.pins == {"alice": alice.public}


def test_removed_device_disappears_with_the_next_version() -> None:
    keys = KeyDirectory(ROOT.public, CERT, org="acme")
    alice = SigningKeyPair.generate()
    phone, laptop = device("alice-phone"), device("alice-laptop")
    keys.accept(record_for("alice", alice, 1, phone, laptop), arrived_on_user="alice")
    keys.accept(record_for("alice", alice, 2, laptop), arrived_on_user="alice")
    assert keys.device("alice", "alice-phone") is None
    with pytest.raises(KeyRecordError, match="older than 2"):
        keys.accept(record_for("alice", alice, 1, phone, laptop), arrived_on_user="alice")


def test_rebinding_the_identity_key_is_reported_loudly() -> None:
    keys = KeyDirectory(ROOT.public, CERT, org="acme")
    original, replacement = SigningKeyPair.generate(), SigningKeyPair.generate()
    keys.accept(record_for("alice", original, 1, device("alice-phone")), arrived_on_user="alice")
    rebound = record_for("alice", replacement, 2, device("evil-phone"))
    with pytest.raises(IdentityChangedError) as caught:
        keys.accept(rebound, arrived_on_user="alice")
    assert caught.value.pinned == original.public
    assert keys.device("alice", "evil-phone") is None  # nothing of the new record was taken
    assert keys.repin(rebound, arrived_on_user="alice").identity == replacement.public


@pytest.mark.parametrize("flaw", ["wrong-directory", "wrong-identity-signature", "other-user"])
def test_forged_records_are_refused(flaw: str) -> None:
    keys = KeyDirectory(ROOT.public, CERT, org="acme")
    alice, mallory = SigningKeyPair.generate(), SigningKeyPair.generate()
    if flaw == "wrong-directory":
        envelope = record_for("alice", alice, 1, device("x"), directory=mallory)
    elif flaw == "wrong-identity-signature":
        good = record_for("alice", alice, 1, device("x"))
        envelope = dataclasses.replace(good, sig=mallory.sign(b"mc-devices1", good.payload))
    else:
        envelope = record_for("bob", alice, 1, device("x"))
    with pytest.raises(KeyRecordError):
        keys.accept(envelope, arrived_on_user="alice")
    assert keys.record("alice") is None


def test_directory_certificate_must_come_from_the_root_for_this_org() -> None:
    with pytest.raises(KeyRecordError, match="not made by this org root"):
        KeyDirectory(SigningKeyPair.generate().public, CERT, org="acme")
    with pytest.raises(KeyRecordError, match="not mc/other/"):
        KeyDirectory(ROOT.public, CERT, org="other")


def test_malformed_records_are_refused() -> None:
    alice = SigningKeyPair.generate()
    good = record_for("alice", alice, 1, device("x"))
    record = KeyRecord.decode(good.payload)
    twice = dataclasses.replace(record, devices=(record.devices[0], record.devices[0]))
    for payload in (b"\xc1", b"\x93\x01\x02\x03", twice.encode()):
        bad = dataclasses.replace(good, payload=payload, sig=alice.sign(b"mc-devices1", payload))
        with pytest.raises(EnvelopeError):
            KeyDirectory(ROOT.public, CERT, org="acme").accept(bad, arrived_on_user="alice")
