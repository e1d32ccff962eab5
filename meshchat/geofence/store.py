"""The geofence worker's files: its state in ``DATA/geofence.db`` and OwnTracks device keys.

``geofence.db`` (SQLite, WAL) holds what the worker needs to continue after a restart with the
same memberships (each subject's checkpoint and recent fixes), the OwnTracks devices the admin
registered, and the worker's settings. Admin commands write it while the worker runs; the worker
notices through ``PRAGMA data_version``.

OwnTracks encryption keys are secrets: they live in the key store (``DATA/keys/owntracks``,
mode 0700, one 0600 file per device), never in SQLite, in logs or in the audit log (which only
records that a device's key was set or removed: even a fingerprint of a key made from a short
passphrase would help someone guess the passphrase).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Self

import msgpack
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from meshchat.directory import Directory, Permission, rbac
from meshchat.directory.signing import OrgKeys
from meshchat.e2ee import KeyStore
from meshchat.errors import ConfigError, NotFoundError
from meshchat.geofence.batch import DEFAULT_JOIN_DELAY_S, DEFAULT_LEAVE_DELAY_S
from meshchat.geofence.owntracks import derive_key
from meshchat.geofence.rules import Fix, SubjectState
from meshchat.topics import validate_name

__all__ = [
    "GEOFENCE_FILE",
    "GeofenceStore",
    "OwnTracksDevice",
    "StoredSettings",
    "owntracks_devices",
    "owntracks_key_stamps",
    "owntracks_keys",
    "remove_owntracks_key",
    "set_owntracks_key",
]

logger = logging.getLogger(__name__)

GEOFENCE_FILE: Final = "geofence.db"
OWNTRACKS_KEYS_DIR: Final = "owntracks"
_MAX_STATE: Final = 64 * 1024

MIGRATIONS = Migrations("meshchat.geofence")


@MIGRATIONS(name="0001_initial")
def _initial(db: Database) -> None:
    db.table("subjects").create(
        {"subject": str, "owner": str, "state": bytes, "updated_at": float},
        pk="subject",
        not_null={"owner", "state", "updated_at"},
    )
    db.table("owntracks_devices").create(
        {"user": str, "device": str, "has_key": int, "added_at": float, "added_by": str},
        pk=("user", "device"),
        not_null={"has_key", "added_at", "added_by"},
    )
    db.table("settings").create({"key": str, "value": str}, pk="key")


@dataclass(frozen=True, slots=True)
class OwnTracksDevice:
    """An OwnTracks phone the admin registered (with or without an encryption key)."""

    user: str
    device: str
    has_key: bool
    added_at: float
    added_by: str


@dataclass(frozen=True, slots=True)
class StoredSettings:
    """The worker's settings an admin may change (`meshchat geofence config`).

    Attributes:
        push_waypoints: send site regions to OwnTracks phones (``cmd`` ``setWaypoints``).
        join_delay_s: seconds joins may wait to go into one roster epoch.
        leave_delay_s: seconds leaves may wait to go into one roster epoch (one rotation).
    """

    push_waypoints: bool = False
    join_delay_s: float = DEFAULT_JOIN_DELAY_S
    leave_delay_s: float = DEFAULT_LEAVE_DELAY_S


def _encode_state(state: SubjectState) -> bytes:
    packed: bytes = msgpack.packb(
        [
            1,
            state.owner,
            state.base_ts if state.base_ts > -1e300 else None,
            [list(track) for track in state.tracks],
            [[fix.ts, fix.lat, fix.lon, fix.acc] for fix in state.fixes],
        ],
        use_bin_type=True,
    )
    return packed


def _decode_state(data: bytes) -> SubjectState:
    """Parse a stored state (our own writing; still checked, as a damaged file is possible).

    Raises:
        ValueError: it is damaged.
    """
    if len(data) > _MAX_STATE:
        raise ValueError("state is too large")
    try:
        fields = msgpack.unpackb(data, raw=False, max_array_len=4096, max_map_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"state is not msgpack: {exc}") from exc
    match fields:
        case [1, str(owner), base_ts, list(tracks), list(fixes)]:
            base = -float("inf") if base_ts is None else float(base_ts)
            parsed_tracks = []
            for track in tracks:
                match track:
                    case [str(site), bool(inside), since] if since is None or isinstance(
                        since, int | float
                    ):
                        parsed_tracks.append(
                            (site, inside, None if since is None else float(since))
                        )
                    case _:
                        raise ValueError("a track is malformed")
            parsed_fixes = []
            for item in fixes:
                match item:
                    case [ts, lat, lon, acc]:
                        parsed_fixes.append(Fix(float(ts), float(lat), float(lon), acc))
                    case _:
                        raise ValueError("a fix is malformed")
            return SubjectState(owner, base, tuple(parsed_tracks), tuple(parsed_fixes))
    raise ValueError("state has the wrong fields")


class GeofenceStore:
    """``DATA/geofence.db``; a context manager that closes the file."""

    def __init__(self, path: Path | str) -> None:
        """Open (and create or migrate) the file.

        Raises:
            ConfigError: it cannot be opened or is not a geofence database.
        """
        self.path = Path(path)
        try:
            self.db = Database(self.path)
            self.db.conn.execute("PRAGMA busy_timeout = 10000")
            self.db.enable_wal()
            MIGRATIONS.apply(self.db)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path} is not a usable geofence database: {exc}") from exc

    @classmethod
    def in_data_dir(cls, data: Path) -> Self:
        """The geofence file of a data directory."""
        return cls(data / GEOFENCE_FILE)

    def close(self) -> None:
        """Close the file."""
        self.db.close()

    def __enter__(self) -> Self:
        """Use the store in a with-block."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the file."""
        self.close()

    def data_version(self) -> int:
        """A number that changes whenever another connection commits."""
        return int(self.db.conn.execute("PRAGMA data_version").fetchone()[0])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- subjects ---------------------------------------------------------------------------

    def load_subjects(self) -> dict[str, SubjectState]:
        """Every persisted subject; damaged rows are logged and skipped."""
        found = {}
        for subject, state in self.db.conn.execute("SELECT subject, state FROM subjects"):
            try:
                found[subject] = _decode_state(state)
            except ValueError as exc:
                logger.warning(
                    "the stored state of %s is damaged and was dropped: %s", subject, exc
                )
        return found

    def save_subjects(self, states: Mapping[str, SubjectState | None]) -> None:
        """Write subjects' states in one transaction (None deletes a subject)."""
        now = time.time()
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO subjects (subject, owner, state, updated_at) "
                "VALUES (?, ?, ?, ?)",
                [
                    (subject, state.owner, _encode_state(state), now)
                    for subject, state in states.items()
                    if state is not None
                ],
            )
            conn.executemany(
                "DELETE FROM subjects WHERE subject = ?",
                [(subject,) for subject, state in states.items() if state is None],
            )

    # -- settings ---------------------------------------------------------------------------

    def settings(self) -> StoredSettings:
        """The settings, defaults for what was never set."""
        rows = dict(self.db.conn.execute("SELECT key, value FROM settings").fetchall())
        defaults = StoredSettings()
        return StoredSettings(
            push_waypoints=bool(json.loads(rows.get("push_waypoints", "false"))),
            join_delay_s=float(json.loads(rows.get("join_delay_s", str(defaults.join_delay_s)))),
            leave_delay_s=float(json.loads(rows.get("leave_delay_s", str(defaults.leave_delay_s)))),
        )

    def set_settings(
        self,
        *,
        push_waypoints: bool | None = None,
        join_delay_s: float | None = None,
        leave_delay_s: float | None = None,
    ) -> StoredSettings:
        """Change settings (None leaves one as it is).

        Raises:
            ConfigError: a delay is negative or longer than an hour.
        """
        changes: dict[str, object] = {}
        if push_waypoints is not None:
            changes["push_waypoints"] = push_waypoints
        for name, value in (("join_delay_s", join_delay_s), ("leave_delay_s", leave_delay_s)):
            if value is not None:
                if not 0 <= value <= 3600:
                    raise ConfigError(
                        f"{name.removesuffix('_s').replace('_', ' ')} must be 0 to 1h"
                    )
                changes[name] = value
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                [(key, json.dumps(value)) for key, value in changes.items()],
            )
        return self.settings()

    # -- OwnTracks devices ------------------------------------------------------------------

    def owntracks_devices(self) -> list[OwnTracksDevice]:
        """Registered OwnTracks devices, by user and device."""
        rows = self.db.conn.execute(
            "SELECT user, device, has_key, added_at, added_by FROM owntracks_devices "
            "ORDER BY user, device"
        ).fetchall()
        return [OwnTracksDevice(u, d, bool(k), a, b) for u, d, k, a, b in rows]

    def _put_device(self, user: str, device: str, *, has_key: bool, actor: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO owntracks_devices "
                "(user, device, has_key, added_at, added_by) VALUES (?, ?, ?, ?, ?)",
                (user, device, int(has_key), time.time(), actor),
            )

    def _drop_device(self, user: str, device: str) -> bool:
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM owntracks_devices WHERE user = ? AND device = ?", (user, device)
            )
            return bool(cursor.rowcount)


def _key_name(user: str, device: str) -> str:
    # Names in the key store are short; a hash of the pair keeps every (user, device) apart.
    digest = hashlib.blake2b(f"{user}/{device}".encode(), digest_size=16, person=b"mc-owntracks1")
    return f"ot-{digest.hexdigest()}"


def _key_store(data: Path) -> KeyStore:
    return KeyStore(OrgKeys.keys_path(data) / OWNTRACKS_KEYS_DIR)


@dataclass(frozen=True, slots=True)
class _Secret:
    key: bytes = field(repr=False)


def set_owntracks_key(
    data: Path, directory: Directory, actor: str, user: str, device: str, *, secret: str
) -> OwnTracksDevice:
    """Register an OwnTracks phone's encryption passphrase (the app's "encryption key").

    Args:
        data: the data directory.
        directory: the org directory.
        actor: the admin (needs ``site.manage``).
        user: the OwnTracks user, a directory user (the phone logs in as them).
        device: the OwnTracks device id.
        secret: the passphrase as typed into the app; its first 32 bytes of UTF-8 count.

    Raises:
        PermissionDeniedError: `actor` lacks ``site.manage``.
        NotFoundError: no such user.
        TopicError: the device name is not a valid name.
        ValueError: the passphrase is empty.
    """
    rbac.require(directory.user(actor), Permission.SITE_MANAGE)
    directory.user(user)
    validate_name(device, "OwnTracks device name")
    key = _Secret(derive_key(secret))
    _key_store(data).save(_key_name(user, device), key.key)
    with GeofenceStore.in_data_dir(data) as store:
        store._put_device(user, device, has_key=True, actor=actor)  # noqa: SLF001  # same module
    directory.audit_keys(actor, "owntracks.key", f"{user}/{device}", change="set")
    return next(d for d in owntracks_devices(data) if (d.user, d.device) == (user, device))


def remove_owntracks_key(
    data: Path, directory: Directory, actor: str, user: str, device: str
) -> None:
    """Forget an OwnTracks phone's key (its encrypted messages are refused from now on).

    Raises:
        PermissionDeniedError: `actor` lacks ``site.manage``.
        NotFoundError: the device has no key registered.
    """
    rbac.require(directory.user(actor), Permission.SITE_MANAGE)
    validate_name(device, "OwnTracks device name")
    with GeofenceStore.in_data_dir(data) as store:
        if not store._drop_device(user, device):  # noqa: SLF001  # same module
            raise NotFoundError(f"no OwnTracks key is registered for {user}/{device}")
    _key_store(data).delete(_key_name(user, device))
    directory.audit_keys(actor, "owntracks.key", f"{user}/{device}", change="removed")


def owntracks_devices(data: Path) -> list[OwnTracksDevice]:
    """The registered OwnTracks devices of a data directory."""
    with GeofenceStore.in_data_dir(data) as store:
        return store.owntracks_devices()


def owntracks_key_stamps(
    data: Path, devices: Sequence[OwnTracksDevice]
) -> tuple[tuple[int, int, int] | None, ...]:
    """What `owntracks_keys` would find, from the key files' metadata only (no key is read).

    One (inode, modification time, size) per device with a key, None where its file is
    missing: the stamps differ whenever a key file was written (atomically) or removed since.
    """
    store = _key_store(data)
    stamps: list[tuple[int, int, int] | None] = []
    for device in devices:
        if not device.has_key:
            continue
        try:
            found = (store.directory / _key_name(device.user, device.device)).stat()
        except FileNotFoundError:
            stamps.append(None)
            continue
        stamps.append((found.st_ino, found.st_mtime_ns, found.st_size))
    return tuple(stamps)


def owntracks_keys(data: Path, devices: list[OwnTracksDevice]) -> dict[tuple[str, str], bytes]:
    """The secretbox keys of registered devices, by (user, device); missing files are skipped."""
    keys = {}
    store = _key_store(data)
    for device in devices:
        if not device.has_key:
            continue
        key = store.load(_key_name(device.user, device.device))
        if key is not None and len(key) == len(bytes(32)):
            keys[device.user, device.device] = key
    return keys
