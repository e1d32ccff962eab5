"""Device accounts on the server: `meshchat device add` and `remove` (blocking; SQLite, key files).

A device account is a user with role ``device`` and one device of the same name: its MQTT user
name, client id, inbox and telemetry topics all carry that name. Adding one, in one directory
transaction:

1. the account (role ``device``) and its device, with a fresh broker token;
2. the device's Ed25519 and X25519 keys, made here (the public halves go into the directory,
   and from there into the account's signed key record; the secrets only into the credential
   file) and an identity key for the account;
3. membership of its dispatch group (``DEPT/dispatch`` unless told otherwise; created, with the
   admin as first member, when it does not exist): the people in that group read the device's
   telemetry and send it work orders;
4. the geofence worker's telemetry key (X25519) in the org key store, made on first use;
5. the credential file: written last, so a failure leaves nothing behind in the directory.

The server therefore knows each device's secret keys while it writes the file, as it knows
users' identity keys (see `meshchat.directory.signing`): a device is only as trustworthy as the
server that provisioned it. Generating keys on the device itself is future work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from meshchat.device.credentials import DeviceCredentials
from meshchat.directory import Directory, Role
from meshchat.directory.model import Device, User, UserStatus
from meshchat.directory.signing import OrgKeys
from meshchat.e2ee import BoxKeyPair, KeyStore, SigningKeyPair
from meshchat.errors import ConfigError, DirectoryError, NotFoundError
from meshchat.topics import validate_name

__all__ = [
    "DEFAULT_DISPATCH_GROUP",
    "DEVICE_KINDS",
    "GEOFENCE_TELEMETRY_KEY",
    "DeviceAccount",
    "ProvisionedDevice",
    "add_device",
    "device_accounts",
    "remove_device",
    "telemetry_reader_key",
]

DEFAULT_DISPATCH_GROUP: Final = "dispatch"
"""A device's dispatch group is ``DEPT/dispatch`` unless `add_device` is told another."""
DEVICE_KINDS: Final = ("tracker", "gateway", "vehicle", "scanner")
GEOFENCE_TELEMETRY_KEY: Final = "geofence-telemetry.key"
"""The geofence worker's X25519 key for telemetry key shares, in ``DATA/keys``."""


def telemetry_reader_key(data_path: Path, *, create: bool = False) -> BoxKeyPair | None:
    """The geofence worker's telemetry key (devices seal their fixes-only key shares to it).

    Args:
        data_path: the data directory (its ``keys`` store).
        create: make it when there is none.

    Returns:
        The key, or None when there is none and `create` is false.

    Raises:
        ConfigError: the key store is unusable, or the key file is damaged.
    """
    store = KeyStore(OrgKeys.keys_path(data_path))
    secret = store.load(GEOFENCE_TELEMETRY_KEY)
    if secret is None:
        if not create:
            return None
        key = BoxKeyPair.generate()
        store.save(GEOFENCE_TELEMETRY_KEY, key.secret)
        return key
    try:
        return BoxKeyPair(secret)
    except Exception as exc:
        raise ConfigError(f"{store.directory / GEOFENCE_TELEMETRY_KEY} is damaged: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ProvisionedDevice:
    """A new device account and where its credentials went.

    Attributes:
        credentials: what was written (it holds secrets).
        path: the credential file.
        group: the device's dispatch group (``dept/name``).
        created_group: whether that group was created for it.
    """

    credentials: DeviceCredentials
    path: Path
    group: str
    created_group: bool


def add_device(
    directory: Directory,
    data_path: Path,
    *,
    actor: str,
    name: str,
    dept: str,
    kind: str,
    broker: str,
    out: Path,
    group: str | None = None,
) -> ProvisionedDevice:
    """Create a device account, its keys and its credential file (see the module docstring).

    Args:
        directory: the org directory.
        data_path: the data directory (org keys).
        actor: the admin acting (needs ``user.manage``; ``group.create`` for a new group).
        name: the device's name.
        dept: its department.
        kind: what it is (``tracker``, ``gateway``, ``vehicle``, ``scanner``, or another name).
        broker: the broker URL the device should use.
        out: where to write the credential file (must not exist).
        group: its dispatch group, ``dept/name`` (default ``DEPT/dispatch``).

    Raises:
        ConfigError: the org has no keys yet, or the credential file exists or cannot be
            written.
        PermissionDeniedError: `actor` may not add users or create the group.
        AlreadyExistsError: the name is taken.
        DirectoryError: another refusal of the directory (a revoked name, a bad group path).
    """
    validate_name(name, "device name")
    validate_name(kind, "device kind")
    path = group or f"{dept}/{DEFAULT_DISPATCH_GROUP}"
    if out.exists():
        raise ConfigError(f"{out} already exists; device credentials are never overwritten")
    if not OrgKeys.exists(data_path):
        raise ConfigError(
            "the org has no keys yet: start the server once (`meshchat up`) or run "
            "`meshchat org init`"
        )
    keys = OrgKeys.open(data_path)
    signing, box = SigningKeyPair.generate(), BoxKeyPair.generate()
    reader = telemetry_reader_key(data_path, create=True)
    assert reader is not None
    with directory.transaction():
        directory.add_user(actor, name, dept=dept, role=Role.DEVICE)
        token = directory.add_device(actor, name, owner=name, kind=kind)
        directory.set_device_keys(name, signing.public, box.public, actor=actor)
        keys.ensure_identities(directory, actor=actor)
        created = False
        try:
            directory.group(path)
        except NotFoundError:
            directory.create_group(actor, path)
            created = True
        directory.add_members(actor, path, [name])
        credentials = DeviceCredentials(
            org=directory.org,
            device=name,
            dept=dept,
            kind=kind,
            broker=broker,
            group=path,
            token=token,
            signing=signing,
            box=box,
            trust=keys.trust,
            geofence=reader.public,
        )
        credentials.write(out)
    return ProvisionedDevice(credentials, out, path, created)


def _device_account(directory: Directory, name: str) -> User:
    user = directory.user(name)
    if user.role is not Role.DEVICE:
        raise DirectoryError(
            f"{name} is a person's account, not a device: use `meshchat user remove`, or "
            "revoke one of their devices from their side"
        )
    return user


def remove_device(directory: Directory, *, actor: str, name: str) -> list[str]:
    """Revoke a device account: its token stops working at once and it leaves its groups.

    The broker disconnects it within a second (the server follows the directory) and refuses
    it from then on; its groups rotate their keys, and its key record empties, so its readers
    drop it.

    Returns:
        The groups it left.

    Raises:
        NotFoundError: no such device, or it is already revoked.
        DirectoryError: `name` is a person's account.
        PermissionDeniedError: `actor` lacks ``user.manage``.
    """
    _device_account(directory, name)
    return directory.remove_user(actor, name)


@dataclass(frozen=True, slots=True)
class DeviceAccount:
    """A device account as `meshchat device list` shows it."""

    name: str
    dept: str
    kind: str
    active: bool
    created_at: float
    groups: tuple[str, ...]
    has_keys: bool


def device_accounts(directory: Directory, *, include_revoked: bool = False) -> list[DeviceAccount]:
    """Every device account, by name, with its groups."""
    devices: dict[str, Device] = {d.name: d for d in directory.devices()}
    found = []
    for user in directory.users(include_revoked=include_revoked):
        if user.role is not Role.DEVICE:
            continue
        device = devices.get(user.name)
        groups = tuple(sorted(g.path for g in directory.groups(member=user.name)))
        found.append(
            DeviceAccount(
                name=user.name,
                dept=user.dept,
                kind=device.kind if device else "?",
                active=user.active and device is not None and device.status is UserStatus.ACTIVE,
                created_at=user.created_at,
                groups=groups,
                has_keys=device is not None and device.has_keys,
            )
        )
    return found
