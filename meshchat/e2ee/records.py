"""Public key records (retained on ``mc/{org}/_k/{user}``) and trust on first use.

The trust chain: the org root certifies the directory's key (a `SignerCert`); the directory
certifies each user's identity key (domain ``mc-id-cert1``); the identity key signs the user's
device list (domain ``mc-devices1``). A `KeyDirectory` verifies all three, refuses older
versions, and pins each user's identity key the first time it sees it: when the directory later
binds another identity key to the same user, it raises `IdentityChangedError` instead of quietly
trusting the directory, and only an explicit `repin` accepts the new key.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import msgpack

from meshchat.e2ee.keys import SigningKeyPair, verify
from meshchat.e2ee.roster import SignerCert, verify_signer
from meshchat.envelope import Signed
from meshchat.errors import E2EEError, EnvelopeError, TopicError
from meshchat.topics import validate_name
from meshchat.wire import unpack

__all__ = [
    "DeviceKeys",
    "IdentityChangedError",
    "KeyDirectory",
    "KeyRecord",
    "KeyRecordError",
    "certify_identity",
    "sign_key_record",
]

_ID_DOMAIN: Final = b"mc-id-cert1"
_DEVICES_DOMAIN: Final = b"mc-devices1"
MAX_DEVICES: Final = 64


class KeyRecordError(E2EEError):
    """A key record was refused."""


class IdentityChangedError(E2EEError):
    """The directory now binds another identity key to a user whose key was pinned.

    Attributes:
        user: whose key changed.
        pinned: the identity key pinned before.
        offered: the identity key the new record carries.
    """

    def __init__(self, user: str, pinned: bytes, offered: bytes) -> None:
        """Create the alarm."""
        super().__init__(
            f"the identity key of {user} changed (pinned {pinned.hex()[:16]}..., now "
            f"{offered.hex()[:16]}...): verify with {user} before trusting it"
        )
        self.user = user
        self.pinned = pinned
        self.offered = offered


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """A device's public keys: Ed25519 to verify it, X25519 to seal to it."""

    name: str
    signing: bytes
    box: bytes


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A user's identity key, the directory's certificate for it, and the signed device list."""

    user: str
    version: int
    identity: bytes
    identity_cert: bytes
    devices: tuple[DeviceKeys, ...]

    def encode(self) -> bytes:
        """Canonical bytes: what the identity key signs."""
        packed: bytes = msgpack.packb(
            [
                self.user,
                self.version,
                self.identity,
                self.identity_cert,
                [[d.name, d.signing, d.box] for d in sorted(self.devices, key=lambda d: d.name)],
            ],
            use_bin_type=True,
        )
        return packed

    @classmethod
    def decode(cls, payload: bytes) -> KeyRecord:
        """Parse and check a record's payload.

        Raises:
            EnvelopeError: malformed.
        """
        fields = unpack(payload, "key record", max_array=MAX_DEVICES, max_str=64, max_bin=64)
        match fields:
            case [str(user), int(version), bytes(identity), bytes(cert), list(devices)] if (
                0 <= version < 2**63 and len(identity) == 32 and len(cert) == 64
            ):
                record = cls(user, version, identity, cert, _devices(devices))
                if record.encode() != payload:
                    raise EnvelopeError("key record is not in canonical form")
                try:
                    validate_name(user, "user name")
                except TopicError as exc:
                    raise EnvelopeError(str(exc)) from exc
                return record
        raise EnvelopeError("key record has the wrong fields")

    def device(self, name: str) -> DeviceKeys | None:
        """One of the user's devices."""
        return next((d for d in self.devices if d.name == name), None)


def _devices(raw: list[object]) -> tuple[DeviceKeys, ...]:
    devices = []
    for item in raw:
        match item:
            case [str(name), bytes(signing), bytes(box)] if len(signing) == 32 and len(box) == 32:
                try:
                    validate_name(name, "device name")
                except TopicError as exc:
                    raise EnvelopeError(str(exc)) from exc
                devices.append(DeviceKeys(name, signing, box))
            case _:
                raise EnvelopeError("a device entry must be [name, signing key, box key]")
    if len({d.name for d in devices}) != len(devices):
        raise EnvelopeError("a device is listed twice")
    return tuple(devices)


def _identity_message(user: str, identity: bytes) -> bytes:
    packed: bytes = msgpack.packb([user, identity], use_bin_type=True)
    return packed


def certify_identity(directory: SigningKeyPair, user: str, identity: bytes) -> bytes:
    """The directory's certificate binding `identity` to `user`."""
    return directory.sign(_ID_DOMAIN, _identity_message(user, identity))


def sign_key_record(record: KeyRecord, identity: SigningKeyPair) -> Signed:
    """The `Signed` envelope to publish, retained, on the user's key topic."""
    payload = record.encode()
    return Signed(record.user, payload, identity.sign(_DEVICES_DOMAIN, payload))


class KeyDirectory:
    """Verified key records by user, with each user's identity key pinned on first use."""

    def __init__(self, root_public: bytes, directory_cert: SignerCert, *, org: str) -> None:
        """Trust records whose identity the root-certified directory key vouched for."""
        if not verify_signer(root_public, directory_cert):
            msg = "the directory's certificate was not made by this org root"
            raise KeyRecordError(msg)
        if directory_cert.scope != f"mc/{org}/":
            msg = f"the directory's certificate covers {directory_cert.scope}, not mc/{org}/"
            raise KeyRecordError(msg)
        self._directory = directory_cert.public
        self._records: dict[str, KeyRecord] = {}
        self._pins: dict[str, bytes] = {}
        self._owners: dict[str, str] = {}

    @property
    def pins(self) -> Mapping[str, bytes]:
        """Pinned identity keys by user (persist them with the device's state)."""
        return dict(self._pins)

    def restore_pins(self, pins: Mapping[str, bytes]) -> None:
        """Load pins saved earlier."""
        self._pins.update(pins)

    def record(self, user: str) -> KeyRecord | None:
        """The newest verified record of a user."""
        return self._records.get(user)

    def device(self, user: str, name: str) -> DeviceKeys | None:
        """A current device of a user (None once it left the user's signed device list)."""
        record = self._records.get(user)
        return record.device(name) if record else None

    def owner(self, device: str) -> tuple[str, DeviceKeys] | None:
        """The user a device currently belongs to, and its keys (None: unknown or revoked)."""
        user = self._owners.get(device)
        if user is None:
            return None
        keys = self.device(user, device)
        return None if keys is None else (user, keys)

    def devices_of(self, users: Iterable[str]) -> list[DeviceKeys]:
        """The current devices of some users (those whose record is known)."""
        found: list[DeviceKeys] = []
        for user in users:
            record = self._records.get(user)
            if record is not None:
                found.extend(record.devices)
        return found

    @property
    def records(self) -> Mapping[str, KeyRecord]:
        """The newest verified record of every user seen."""
        return dict(self._records)

    def restore(self, record: KeyRecord) -> None:
        """Load a record this device verified earlier (from its own state file)."""
        self._records[record.user] = record
        self._pins.setdefault(record.user, record.identity)
        self._index(record)

    def _index(self, record: KeyRecord) -> None:
        for device in record.devices:
            self._owners[device.name] = record.user

    def accept(self, envelope: Signed, *, arrived_on_user: str) -> KeyRecord:
        """Verify a key record that arrived on ``_k/{arrived_on_user}`` and keep it.

        Raises:
            KeyRecordError: bad certificate or signature, a record for another user, or an
                older version.
            IdentityChangedError: a valid record binds another identity key than the pinned one.
            EnvelopeError: malformed.
        """
        record = KeyRecord.decode(envelope.payload)
        if record.user != arrived_on_user or envelope.signer != record.user:
            raise KeyRecordError(f"a key record of {record.user} arrived for {arrived_on_user}")
        if not verify(
            self._directory,
            _ID_DOMAIN,
            _identity_message(record.user, record.identity),
            record.identity_cert,
        ):
            raise KeyRecordError(
                f"the identity key of {record.user} is not certified by the directory"
            )
        if not verify(record.identity, _DEVICES_DOMAIN, envelope.payload, envelope.sig):
            raise KeyRecordError(f"the device list of {record.user} has a bad signature")
        current = self._records.get(record.user)
        if current is not None and record.version < current.version:
            raise KeyRecordError(
                f"key record version {record.version} of {record.user} is older than "
                f"{current.version}: refused"
            )
        pinned = self._pins.get(record.user)
        if pinned is not None and not hmac.compare_digest(pinned, record.identity):
            raise IdentityChangedError(record.user, pinned, record.identity)
        self._pins[record.user] = record.identity
        self._records[record.user] = record
        self._index(record)
        return record

    def repin(self, envelope: Signed, *, arrived_on_user: str) -> KeyRecord:
        """Accept a changed identity key after the user verified it out of band."""
        self._pins.pop(arrived_on_user, None)
        self._records.pop(arrived_on_user, None)
        return self.accept(envelope, arrived_on_user=arrived_on_user)
