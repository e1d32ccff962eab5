"""The directory's keys, and the rosters and key records it signs with them.

This is the only module of `meshchat.directory` that imports `meshchat.e2ee`; the store and the
access-policy core stay free of crypto. The package's ``__init__`` does not re-export it, so the
broker, which imports the policy core, never loads a key (an import-linter contract checks that).

The keys live in ``DATA/keys`` (a `KeyStore`: mode 0700, one 0600 file per secret):

- ``root.key``: the org root (Ed25519), sealed with the root passphrase (argon2id). It is needed
  only to certify the other keys, at creation; it may then be moved offline.
- ``compliance.key``: the org compliance key (X25519), sealed with the same passphrase, so an
  auditor who holds the passphrase can export it; the server never unseals it.
- ``directory.key``: the directory's signing key, certified by the root for ``mc/{org}/``: it
  certifies identity keys and signs rosters.
- ``geofence.key``: a roster key certified for ``mc/{org}/sites/`` only, for the geofence worker.
- ``geofence-telemetry.key``: the geofence worker's X25519 telemetry reader key, made on first
  use; its public half is certified by ``geofence.key`` (`reader_cert`), not by the root, so
  devices check it against the trust bundle they already hold (`meshchat.e2ee.telemetry`).
- ``identity.{user}.key``: each user's identity key (Ed25519), which signs the user's device list.
- ``trust.bin``: the public trust bundle (`OrgTrust`) a client checks against the root fingerprint.

Trust limitation, stated plainly: the server holds every user's identity key, so a user's
device list is only as trustworthy as the server. Clients pin identity keys on first use, which
catches the directory re-binding a user to another identity key; it does not catch a compromised
server that signs an extra device into a user's record with the identity key it already holds.
Moving identity keys onto the users' own devices closes that gap and is future work.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import hmac
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Final, Literal, Self

from meshchat.directory.model import KeyRecordState, RosterState, UserStatus
from meshchat.directory.policy import may_announce
from meshchat.directory.store import Directory, parse_group_path
from meshchat.e2ee import (
    GENESIS_HASH,
    BoxKeyPair,
    DeviceKeys,
    KeyRecord,
    KeyStore,
    Roster,
    SigningKeyPair,
    certify_identity,
    certify_reader,
    sign_key_record,
    sign_roster,
)
from meshchat.e2ee.records import MAX_DEVICES
from meshchat.e2ee.trust import DIRECTORY_SIGNER, OrgTrust, make_trust
from meshchat.envelope import Signed
from meshchat.errors import (
    AlreadyExistsError,
    ConfigError,
    DirectoryError,
    EnvelopeError,
    MeshchatError,
    NotFoundError,
)
from meshchat.files import fsync_directory
from meshchat.topics import PREFIX, SITES_DEPARTMENT, GroupTopic, validate_name

__all__ = [
    "GEOFENCE_SIGNER",
    "KEYS_DIR",
    "MIN_PASSPHRASE_LEN",
    "ROSTER_REFRESH",
    "ROSTER_TTL",
    "OrgKeys",
    "RosterSigner",
    "check_passphrase",
    "generate_passphrase",
]

KEYS_DIR: Final = "keys"
"""The key store's directory inside the data directory."""
ROOT_KEY: Final = "root.key"
COMPLIANCE_KEY: Final = "compliance.key"
DIRECTORY_KEY: Final = "directory.key"
GEOFENCE_KEY: Final = "geofence.key"
GEOFENCE_READER_KEY: Final = "geofence-telemetry.key"
"""The geofence worker's X25519 telemetry reader key (also what device credentials name)."""
TRUST_FILE: Final = "trust.bin"
_ORG_FILES: Final = (ROOT_KEY, COMPLIANCE_KEY, DIRECTORY_KEY, GEOFENCE_KEY, TRUST_FILE)

GEOFENCE_SIGNER: Final = "geofence"
"""The name the geofence worker's roster key signs as (scope ``mc/{org}/sites/``)."""
ROSTER_TTL: Final = 7 * 24 * 3600
"""A roster expires this many seconds after it was issued."""
ROSTER_REFRESH: Final = 24 * 3600
"""An unchanged roster is issued anew (next epoch, same content) once it expires within this."""
MIN_PASSPHRASE_LEN: Final = 12

RosterSigner = Literal["directory", "geofence"]


def generate_passphrase() -> str:
    """A random root passphrase (125 bits): five groups of five, easy to write down and type."""
    text = base64.b32encode(secrets.token_bytes(20)).decode("ascii").lower()[:25]
    return "-".join(text[i : i + 5] for i in range(0, len(text), 5))


def check_passphrase(passphrase: str) -> str:
    """The passphrase, if it is long enough to protect the org root.

    Raises:
        ConfigError: it is shorter than `MIN_PASSPHRASE_LEN` characters.
    """
    if len(passphrase) < MIN_PASSPHRASE_LEN:
        raise ConfigError(
            f"the root passphrase must be at least {MIN_PASSPHRASE_LEN} characters long"
        )
    return passphrase


def _identity_file(user: str) -> str:
    return f"identity.{validate_name(user, 'user name')}.key"


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


class OrgKeys:
    """The org's trust bundle and the keys the directory signs with; made by `create` or `open`."""

    def __init__(
        self,
        store: KeyStore,
        trust: OrgTrust,
        directory_key: SigningKeyPair,
        geofence_key: SigningKeyPair | None,
    ) -> None:
        """Use already checked keys; call `create` or `open` instead."""
        self._store = store
        self._trust = trust
        self._directory_key = directory_key
        self._geofence_key = geofence_key

    # -- creating and opening -----------------------------------------------------------------

    @staticmethod
    def keys_path(data_path: Path) -> Path:
        """Where the org keys of a data directory live."""
        return data_path / KEYS_DIR

    @classmethod
    def exists(cls, data_path: Path) -> bool:
        """Whether the data directory holds org keys (its trust bundle)."""
        return (cls.keys_path(data_path) / TRUST_FILE).exists()

    @classmethod
    def create(cls, data_path: Path, org: str, root_passphrase: str) -> Self:
        """Create the org root, compliance, directory and geofence keys and the trust bundle.

        Every file is written to a private staging directory first, which is then renamed to
        ``keys``: a crash leaves either no org keys or all of them.

        Args:
            data_path: the data directory.
            org: the org's name.
            root_passphrase: seals the root and compliance keys (argon2id).

        Raises:
            AlreadyExistsError: the data directory already holds org keys (never overwritten).
            ConfigError: the passphrase is too short, or the directory cannot be written.
            TopicError: the org name is invalid.
        """
        check_passphrase(root_passphrase)
        validate_name(org, "org name")
        keys_path = cls.keys_path(data_path)
        cls._refuse_existing(keys_path)
        try:
            data_path.mkdir(mode=0o700, parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".keys-new.", dir=data_path))
        except OSError as exc:
            raise ConfigError(f"cannot create keys in {data_path}: {exc.strerror}") from exc
        try:
            store = KeyStore(staging)
            root = SigningKeyPair.generate()
            directory_key = SigningKeyPair.generate()
            geofence_key = SigningKeyPair.generate()
            compliance = BoxKeyPair.generate()
            trust = make_trust(
                org,
                root,
                directory=directory_key,
                scoped={
                    GEOFENCE_SIGNER: (geofence_key, f"{PREFIX}/{org}/{SITES_DEPARTMENT}/"),
                },
                compliance=compliance,
            )
            store.save_sealed(ROOT_KEY, root.seed, root_passphrase)
            store.save_sealed(COMPLIANCE_KEY, compliance.secret, root_passphrase)
            store.save(DIRECTORY_KEY, directory_key.seed)
            store.save(GEOFENCE_KEY, geofence_key.seed)
            store.save(TRUST_FILE, trust.encode())
            cls._refuse_existing(keys_path)
            try:
                # Replaces an empty `keys` directory; fails on one with anything in it.
                staging.rename(keys_path)
            except OSError as exc:
                if exc.errno in {errno.ENOTEMPTY, errno.EEXIST}:
                    raise AlreadyExistsError(
                        f"{keys_path} already holds keys; org keys are never overwritten"
                    ) from exc
                raise ConfigError(f"cannot create {keys_path}: {exc.strerror}") from exc
            fsync_directory(data_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cls(KeyStore(keys_path), trust, directory_key, geofence_key)

    @staticmethod
    def _refuse_existing(keys_path: Path) -> None:
        found = [name for name in _ORG_FILES if (keys_path / name).exists()]
        if found:
            raise AlreadyExistsError(
                f"{keys_path} already holds org keys ({', '.join(found)}); they are never "
                "overwritten. Move them away first if you really mean to start a new org"
            )

    @classmethod
    def open(cls, data_path: Path) -> Self:
        """Load the trust bundle and the directory's (and the geofence worker's) keys.

        Raises:
            ConfigError: there are no org keys, or they are damaged or do not match the bundle.
        """
        keys_path = cls.keys_path(data_path)
        if not (keys_path / TRUST_FILE).exists():
            raise ConfigError(
                f"no org keys in {keys_path}: `meshchat org init` creates them, and "
                "`meshchat up` does for an org that has none"
            )
        store = KeyStore(keys_path)
        trust_bytes = store.load(TRUST_FILE)
        if trust_bytes is None:
            raise ConfigError(f"{keys_path / TRUST_FILE} disappeared while it was read")
        try:
            trust = OrgTrust.decode(trust_bytes)
        except MeshchatError as exc:
            msg = f"{keys_path / TRUST_FILE} is not a valid trust bundle: {exc}"
            raise ConfigError(msg) from exc
        directory_key = cls._signing_key(store, DIRECTORY_KEY)
        if directory_key is None:
            raise ConfigError(f"the directory's key {keys_path / DIRECTORY_KEY} is missing")
        if not _same(directory_key.public, trust.directory.public):
            raise ConfigError(f"{keys_path / DIRECTORY_KEY} does not match the trust bundle")
        geofence_key = cls._signing_key(store, GEOFENCE_KEY)
        if geofence_key is not None:
            cert = trust.signer(GEOFENCE_SIGNER)
            if cert is None or not _same(geofence_key.public, cert.public):
                raise ConfigError(f"{keys_path / GEOFENCE_KEY} does not match the trust bundle")
        return cls(store, trust, directory_key, geofence_key)

    @staticmethod
    def _signing_key(store: KeyStore, name: str) -> SigningKeyPair | None:
        seed = store.load(name)
        if seed is None:
            return None
        try:
            return SigningKeyPair(seed)
        except MeshchatError as exc:
            raise ConfigError(f"{store.directory / name} is damaged: {exc}") from exc

    # -- the org --------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The key store's directory."""
        return self._store.directory

    @property
    def trust(self) -> OrgTrust:
        """The org's public trust bundle."""
        return self._trust

    @property
    def org(self) -> str:
        """The org these keys belong to."""
        return self._trust.org

    @property
    def has_geofence_key(self) -> bool:
        """Whether the geofence worker's roster key is on this machine (site channels)."""
        return self._geofence_key is not None

    @property
    def geofence_key(self) -> SigningKeyPair:
        """The geofence worker's roster key (it also signs the worker's notices).

        Raises:
            ConfigError: the key is not on this machine.
        """
        if self._geofence_key is None:
            raise ConfigError(f"the geofence key {self.path / GEOFENCE_KEY} is not on this machine")
        return self._geofence_key

    def geofence_reader(self, *, create: bool = False) -> BoxKeyPair | None:
        """The geofence worker's telemetry reader key (X25519), made when `create` and missing.

        Devices seal their fixes-only telemetry key shares to it. It lives in the key store
        like the other org keys (a 0600 file) and is never logged.

        Raises:
            ConfigError: the key file is damaged or cannot be written.
        """
        secret = self._store.load(GEOFENCE_READER_KEY)
        if secret is None:
            if not create:
                return None
            key = BoxKeyPair.generate()
            self._store.save(GEOFENCE_READER_KEY, key.secret)
            return key
        try:
            return BoxKeyPair(secret)
        except MeshchatError as exc:
            raise ConfigError(f"{self.path / GEOFENCE_READER_KEY} is damaged: {exc}") from exc

    def reader_cert(self, reader: BoxKeyPair, now: float) -> bytes:
        """The reader key's certificate, signed by the geofence worker's roster key.

        Raises:
            ConfigError: the geofence key is not on this machine.
        """
        cert = certify_reader(self.geofence_key, self.org, reader.public, issued_at=int(now))
        return cert.encode()

    @property
    def fingerprint(self) -> str:
        """The root key's fingerprint, for people to compare at login."""
        return self._trust.fingerprint

    def root(self, passphrase: str) -> SigningKeyPair:
        """The org root key, unsealed with the root passphrase.

        Raises:
            WrongPassphraseError: the passphrase does not open it.
            ConfigError: the root key is not here (kept offline) or does not match the bundle.
        """
        seed = self._unseal(ROOT_KEY, passphrase)
        root = SigningKeyPair(seed)
        if not _same(root.public, self._trust.root):
            raise ConfigError(f"{self.path / ROOT_KEY} is not the root of the trust bundle")
        return root

    def compliance_secret(self, passphrase: str) -> BoxKeyPair:
        """The org compliance key (for an auditor), unsealed with the root passphrase.

        Raises:
            WrongPassphraseError: the passphrase does not open it.
            ConfigError: the key is not here or does not match the bundle.
        """
        secret = self._unseal(COMPLIANCE_KEY, passphrase)
        key = BoxKeyPair(secret)
        cert = self._trust.compliance
        if cert is None or not _same(key.public, cert.public):
            raise ConfigError(f"{self.path / COMPLIANCE_KEY} is not the org's compliance key")
        return key

    def _unseal(self, name: str, passphrase: str) -> bytes:
        secret = self._store.load_sealed(name, passphrase)
        if secret is None:
            raise ConfigError(f"{self.path / name} is not on this machine")
        return secret

    def audit_creation(self, directory: Directory, *, actor: str | None = None) -> None:
        """Record the new org keys in the audit log: the fingerprint and public keys only.

        Args:
            directory: the org directory.
            actor: who created them (default: the admin `org init` created).
        """
        self._check_org(directory)
        trust = self._trust
        public = {"fingerprint": self.fingerprint, "root": trust.root.hex()}
        public |= {f"signer_{cert.name}": cert.public.hex() for cert in trust.signers}
        if trust.compliance is not None:
            public["compliance"] = trust.compliance.public.hex()
        directory.audit_keys(actor or directory.default_actor(), "org.keys", self.org, **public)

    def _check_org(self, directory: Directory) -> None:
        if directory.org != self.org:
            raise ConfigError(
                f"the org keys in {self.path} belong to {self.org!r}, but the directory "
                f"holds {directory.org!r}"
            )

    # -- identity keys and key records ------------------------------------------------------

    def ensure_identities(self, directory: Directory, *, actor: str | None = None) -> list[str]:
        """Create an identity key for every active user who has none; idempotent.

        Args:
            directory: the org directory.
            actor: who the audit log names (default: the admin `org init` created).

        Returns:
            The users whose identity keys were created now, by name.
        """
        self._check_org(directory)
        by = actor or directory.default_actor()
        created = []
        with directory.transaction():
            for user in directory.users():
                name = _identity_file(user.name)
                if self._store.load(name) is not None:
                    continue
                key = SigningKeyPair.generate()
                self._store.save(name, key.seed)
                directory.audit_keys(by, "user.identity", user.name, identity=key.public.hex())
                created.append(user.name)
        return created

    def _identity(self, user: str) -> SigningKeyPair:
        key = self._signing_key(self._store, _identity_file(user))
        if key is None:
            raise NotFoundError(
                f"user {user!r} has no identity key yet (`meshchat user add` and `meshchat up` "
                "create them)"
            )
        return key

    def has_identity(self, user: str) -> bool:
        """Whether the user has an identity key."""
        return self._signing_key(self._store, _identity_file(user)) is not None

    def identity_public(self, user: str) -> bytes:
        """A user's identity key (public part).

        Raises:
            NotFoundError: the user has no identity key.
        """
        return self._identity(user).public

    def identity_cert(self, user: str) -> bytes:
        """The directory's certificate binding the user's identity key to the user's name.

        Raises:
            NotFoundError: the user has no identity key.
        """
        return certify_identity(self._directory_key, user, self._identity(user).public)

    def key_record(self, directory: Directory, user: str) -> Signed:
        """The user's signed key record: identity key and the user's current devices.

        Devices that registered their public keys and are not revoked are listed; the record's
        version increases whenever that list (or the identity key) changes.

        Raises:
            NotFoundError: no such user, or the user has no identity key.
            DirectoryError: the user has more devices than a record can list.
        """
        self._check_org(directory)
        directory.user(user)
        identity = self._identity(user)
        cert = certify_identity(self._directory_key, user, identity.public)
        with directory.transaction():
            devices = []
            for device in directory.devices(owner=user):
                if device.status is not UserStatus.ACTIVE:
                    continue
                if device.signing_public is None or device.box_public is None:
                    continue
                devices.append(DeviceKeys(device.name, device.signing_public, device.box_public))
            if len(devices) > MAX_DEVICES:
                raise DirectoryError(
                    f"{user} has {len(devices)} devices with keys; a key record lists at most "
                    f"{MAX_DEVICES}: revoke some with `meshchat device` commands"
                )
            state = directory.key_record_state(user)
            record = KeyRecord(
                user, state.version if state else 1, identity.public, cert, tuple(devices)
            )
            if state is None or not _same(record.encode(), state.payload):
                if state is not None:
                    record = dataclasses.replace(record, version=state.version + 1)
                directory.save_key_record_state(
                    KeyRecordState(user, record.version, record.encode())
                )
        return sign_key_record(record, identity)

    # -- rosters --------------------------------------------------------------------------------

    def roster(
        self,
        directory: Directory,
        group: str,
        now: float,
        *,
        signer: RosterSigner = "directory",
    ) -> Signed:
        """The group's signed roster, to publish retained on its roster topic.

        Members are the group's members whose accounts are active. The epoch increases, linked
        to the previous roster, whenever the members, the policy version or the compliance
        setting changed; an unchanged roster keeps its epoch (the same bytes come back) until
        it is within `ROSTER_REFRESH` of expiring, when the same content is issued as the next
        epoch with a fresh expiry (clients refuse a second, different roster for one epoch).

        Args:
            directory: the org directory.
            group: ``dept/name``.
            now: the current time (unix seconds).
            signer: ``"geofence"`` signs a site channel with the geofence worker's scoped key.

        Raises:
            NotFoundError: no such group.
            DirectoryError: the geofence key was asked to sign a group outside ``sites/``.
            ConfigError: the geofence key is not on this machine.
        """
        self._check_org(directory)
        dept, name = parse_group_path(group)
        topic = GroupTopic(self.org, dept, name)
        key, signer_name = self._roster_key(topic, signer)
        with directory.transaction():
            found = directory.group(group)
            accounts = {user.name: user for user in directory.users_named(found.members)}
            members = tuple(sorted(found.members & set(accounts)))
            announcers = tuple(m for m in members if may_announce(accounts[m], found))
            state = directory.roster_state(group)
            previous = _decode_roster(state)
            issued = int(now) if previous is None else max(int(now), previous.issued_at)
            expires = issued + ROSTER_TTL
            if found.expires_at is not None:
                # A temporary group's roster never outlives the group.
                expires = max(0, min(expires, int(found.expires_at)))
            if previous is not None and (
                previous.members,
                previous.policy,
                previous.compliance,
                previous.announcement,
                previous.announcers,
            ) == (members, found.policy_version, found.compliance, found.announcement, announcers):
                due = previous.expires_at - now < ROSTER_REFRESH
                if not due or expires <= previous.expires_at:
                    return sign_roster(previous, key, signer_name)
            roster = Roster(
                group_topic=topic.topic,
                epoch=1 if previous is None else previous.epoch + 1,
                prev=GENESIS_HASH if previous is None else previous.hash,
                expires_at=expires,
                members=members,
                issued_at=issued,
                policy=found.policy_version,
                compliance=found.compliance,
                announcement=found.announcement,
                announcers=announcers,
            )
            directory.save_roster_state(
                RosterState(group, roster.epoch, roster.hash, issued, expires, roster.encode())
            )
        return sign_roster(roster, key, signer_name)

    def _roster_key(self, topic: GroupTopic, signer: RosterSigner) -> tuple[SigningKeyPair, str]:
        if signer == "directory":
            return self._directory_key, DIRECTORY_SIGNER
        if not topic.is_site:
            raise DirectoryError(
                f"the geofence key signs site channels only ({SITES_DEPARTMENT}/...), "
                f"not {topic.path}"
            )
        if self._geofence_key is None:
            raise ConfigError(f"the geofence key {self.path / GEOFENCE_KEY} is not on this machine")
        return self._geofence_key, GEOFENCE_SIGNER


def _decode_roster(state: RosterState | None) -> Roster | None:
    if state is None:
        return None
    try:
        roster = Roster.decode(state.payload)
    except EnvelopeError as exc:
        raise DirectoryError(f"the stored roster of {state.path} is damaged: {exc}") from exc
    if roster.epoch != state.epoch or not _same(roster.hash, state.hash):
        raise DirectoryError(f"the stored roster of {state.path} does not match its epoch")
    return roster
