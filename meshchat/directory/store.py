"""The directory store: org, users, groups, sites and the audit log in one SQLite file.

Every write runs in one ``BEGIN IMMEDIATE`` transaction together with its audit row, so an
admin command in another process and the running server never interleave half-changes. Other
processes notice changes through `Directory.data_version`.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal, Self

from sqlite_utils import Database

from meshchat.directory import rbac
from meshchat.directory.audit import (
    GENESIS,
    AuditEntry,
    canonical_details,
    chain_hash,
    verify_chain,
)
from meshchat.directory.credentials import (
    MOSQUITTO_TOKEN_ITERATIONS,
    hash_password,
    hash_token,
    mosquitto_hash,
    new_token,
    verify_password,
)
from meshchat.directory.hrimport import ImportFile, ImportPlan, plan_import
from meshchat.directory.model import (
    Department,
    Device,
    Group,
    GroupKind,
    KeyRecordState,
    Permission,
    Role,
    RosterState,
    Site,
    User,
    UserStatus,
)
from meshchat.directory.policy import DirectorySnapshot
from meshchat.directory.schema import MIGRATIONS
from meshchat.errors import (
    AlreadyExistsError,
    AuthenticationError,
    ConfigError,
    DirectoryError,
    NotFoundError,
    TopicError,
)
from meshchat.topics import RESERVED_DEPARTMENTS, SITES_DEPARTMENT, validate_name

__all__ = ["DIRECTORY_FILE", "Directory", "parse_group_path"]

DIRECTORY_FILE: Final = "directory.db"
DEFAULT_POST_ROLES: Final = frozenset({Role.ADMIN, Role.MANAGER})
PUBLIC_KEY_LEN: Final = 32
KEY_ACTIONS: Final = frozenset({"org.keys", "user.identity", "owntracks.key"})
"""Audit actions `Directory.audit_keys` may record (key creation, public keys only)."""
GEOFENCE_VIA: Final = "geofence"
"""``members.via`` of the site-channel memberships the geofence worker made."""
MAX_SITE_LATITUDE: Final = 85.0
"""The geofence's local projection serves sites between 85 degrees south and north."""
MAX_SITE_CORNERS: Final = 1000
MAX_SITE_DWELL_S: Final = 86_400.0
MAX_SITE_HYSTERESIS_M: Final = 10_000.0
SERVICE_ACTIONS: Final = frozenset({"archive.retention"})
"""Audit actions `Directory.audit_service` may record (what meshchat's services did alone)."""


def parse_group_path(path: str) -> tuple[str, str]:
    """Split ``dept/group`` into its two validated names.

    Raises:
        TopicError: not two names separated by one ``/``, or an invalid name.
    """
    parts = path.split("/")
    if len(parts) != 2:
        raise TopicError(f"group {path!r} must be written DEPT/GROUP", part="group", value=path)
    dept, name = parts
    return validate_name(dept, "department name"), validate_name(name, "group name")


def _hash_pair(password: str) -> tuple[str, str]:
    """argon2id for the embedded broker and logins; Mosquitto's format for external brokers."""
    return hash_password(password), mosquitto_hash(password)


def _directory_error(exc: sqlite3.Error, path: Path) -> DirectoryError:
    return DirectoryError(f"directory {path} cannot be used: {exc}")


class Directory:
    """The org directory in ``DATA/directory.db``; a context manager that closes the file."""

    def __init__(self, path: Path | str, *, clock: Any = time.time) -> None:  # noqa: ANN401  # any callable returning seconds
        """Open (and create or migrate) the directory at `path`.

        Raises:
            ConfigError: the file cannot be opened or is not a directory database.
        """
        self.path = Path(path)
        self._clock = clock
        try:
            self.db = Database(self.path)
            self.db.conn.execute("PRAGMA busy_timeout = 10000")
            self.db.conn.execute("PRAGMA foreign_keys = ON")
            self.db.enable_wal()
            MIGRATIONS.apply(self.db)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path} is not a usable directory database: {exc}") from exc

    @classmethod
    def in_data_dir(cls, data: Path) -> Self:
        """The directory of a data directory."""
        return cls(data / DIRECTORY_FILE)

    def close(self) -> None:
        """Close the database file."""
        self.db.close()

    def __enter__(self) -> Self:
        """Use the directory in a with-block."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the database file."""
        self.close()

    # -- transactions and audit ---------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One immediate write transaction; nested calls join the outer one."""
        conn = self.db.conn
        if conn.in_transaction:
            yield conn
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _directory_error(exc, self.path) from exc
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _audit(self, actor: str, action: str, target: str, **details: Any) -> None:  # noqa: ANN401  # JSON values
        conn = self.db.conn
        assert conn.in_transaction, "audit rows are written inside the change they record"
        row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
        ts = float(self._clock())
        text = canonical_details(details)
        digest = chain_hash(
            prev, seq, ts=ts, actor=actor, action=action, target=target, details=text
        )
        conn.execute(
            "INSERT INTO audit (seq, ts, actor, action, target, details, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, ts, actor, action, target, text, prev, digest),
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_head', ?)",
            (json.dumps([seq, digest]),),
        )

    def data_version(self) -> int:
        """A number that changes whenever another connection commits a change."""
        return int(self.db.conn.execute("PRAGMA data_version").fetchone()[0])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction around several calls (read, decide, write with no one between).

        Calls inside it join it; it commits at the end of the block, or rolls back on an error.
        """
        with self._write():
            yield

    def audit_keys(self, actor: str, action: str, target: str, **public: str) -> None:
        """Record the creation of keys in the audit log: public keys and fingerprints only.

        Args:
            actor: who (or which start of the server) created them.
            action: one of `KEY_ACTIONS`.
            target: the org or the user.
            **public: public keys (hex) and fingerprints; never a secret.
        """
        if action not in KEY_ACTIONS:
            raise ValueError(f"{action!r} is not a key action")
        with self._write():
            self._audit(actor, action, target, **public)

    def audit_service(self, actor: str, action: str, target: str, **details: Any) -> None:  # noqa: ANN401  # JSON values
        """Record what one of meshchat's services did on its own (a retention pass).

        Args:
            actor: the service (``svc.archive``).
            action: one of `SERVICE_ACTIONS`.
            target: what it acted on.
            **details: JSON values describing it; never a secret or a message.
        """
        if action not in SERVICE_ACTIONS:
            raise ValueError(f"{action!r} is not a service action")
        with self._write():
            self._audit(actor, action, target, **details)

    # -- org ---------------------------------------------------------------------------------

    @property
    def org(self) -> str:
        """The org's name.

        Raises:
            NotFoundError: no org yet.
        """
        row = self.db.conn.execute("SELECT name FROM org").fetchone()
        if row is None:
            raise NotFoundError("there is no org yet: run `meshchat org init --org NAME` first")
        return str(row[0])

    @property
    def initialized(self) -> bool:
        """Whether `init_org` has run."""
        return self.db.conn.execute("SELECT 1 FROM org").fetchone() is not None

    def init_org(self, org: str, *, admin: str, password: str, dept: str = "admin") -> User:
        """Create the org with its first department and admin account.

        Raises:
            AlreadyExistsError: the directory already has an org.
            TopicError: a name is invalid.
            ValueError: the password is too short or too long.
        """
        validate_name(org, "org name")
        hashes = _hash_pair(password)
        with self._write():
            if self.initialized:
                raise AlreadyExistsError(f"the directory already holds the org {self.org!r}")
            now = float(self._clock())
            self.db.table("org").insert({"name": org, "created_at": now})
            self.db.table("meta").insert({"key": "bootstrap_admin", "value": admin}, replace=True)
            self._audit(admin, "org.init", org)
            self._insert_user(
                admin,
                admin,
                dept=dept,
                role=Role.ADMIN,
                hashes=hashes,
                display_name="",
            )
        return self.user(admin)

    def default_actor(self) -> str:
        """Who admin commands act as when no one is named: the admin `init_org` created.

        Raises:
            NotFoundError: no org yet.
        """
        row = self.db.conn.execute("SELECT value FROM meta WHERE key = 'bootstrap_admin'")
        found = row.fetchone()
        if found is None:
            self.org  # noqa: B018  # raises the "no org yet" error
            raise NotFoundError("the directory names no admin; pass --as USER")
        return str(found[0])

    # -- departments ---------------------------------------------------------------------------

    def _ensure_department(self, actor: str, dept: str) -> None:
        validate_name(dept, "department name")
        if dept in RESERVED_DEPARTMENTS:
            raise TopicError(
                f"department name {dept!r} is reserved for site channels",
                part="department name",
                value=dept,
            )
        exists = self.db.conn.execute("SELECT 1 FROM departments WHERE name = ?", (dept,))
        if exists.fetchone() is None:
            self.db.table("departments").insert({"name": dept, "created_at": float(self._clock())})
            self._audit(actor, "department.create", dept)

    def add_department(self, actor: str, name: str) -> Department:
        """Create a department.

        Raises:
            PermissionDeniedError: `actor` lacks ``user.manage``.
            AlreadyExistsError: it exists.
        """
        with self._write():
            rbac.require(self._actor(actor), Permission.USER_MANAGE)
            if name in {d.name for d in self.departments()}:
                raise AlreadyExistsError(f"department {name!r} already exists")
            self._ensure_department(actor, name)
        return next(d for d in self.departments() if d.name == name)

    def departments(self) -> list[Department]:
        """Every department, by name."""
        return [
            Department(row["name"], row["created_at"])
            for row in self.db.table("departments").rows_where(order_by="name")
        ]

    # -- users -------------------------------------------------------------------------------

    def _insert_user(
        self,
        actor: str,
        name: str,
        *,
        dept: str,
        role: Role,
        hashes: tuple[str, str] | None,
        display_name: str,
    ) -> None:
        validate_name(name, "user name")
        self._ensure_department(actor, dept)
        existing = self._user_row(name)
        if existing is not None:
            state = "a revoked account" if existing["status"] == UserStatus.REVOKED else "taken"
            raise AlreadyExistsError(f"user name {name!r} is {state}")
        now = float(self._clock())
        self.db.table("users").insert(
            {
                "name": name,
                "dept": dept,
                "role": role.value,
                "status": UserStatus.ACTIVE.value,
                "display_name": display_name,
                "password_hash": hashes[0] if hashes else None,
                "broker_hash": hashes[1] if hashes else None,
                "created_at": now,
                "updated_at": now,
            }
        )
        self._audit(actor, "user.add", name, dept=dept, role=role.value)

    def _user_row(self, name: str) -> dict[str, Any] | None:
        rows = list(self.db.table("users").rows_where("name = ?", [name]))
        return rows[0] if rows else None

    @staticmethod
    def _to_user(row: dict[str, Any]) -> User:
        return User(
            name=row["name"],
            dept=row["dept"],
            role=Role(row["role"]),
            status=UserStatus(row["status"]),
            created_at=row["created_at"],
            display_name=row["display_name"] or "",
            has_password=bool(row["password_hash"]),
        )

    def user(self, name: str) -> User:
        """One user.

        Raises:
            NotFoundError: no such user.
        """
        row = self._user_row(name)
        if row is None:
            raise NotFoundError(f"no user {name!r}")
        return self._to_user(row)

    def users(self, *, dept: str | None = None, include_revoked: bool = False) -> list[User]:
        """Users by name, optionally of one department."""
        where, args = [], []
        if dept is not None:
            where.append("dept = ?")
            args.append(dept)
        if not include_revoked:
            where.append("status = ?")
            args.append(UserStatus.ACTIVE.value)
        rows = self.db.table("users").rows_where(" AND ".join(where) or None, args, order_by="name")
        return [self._to_user(row) for row in rows]

    def _actor(self, name: str) -> User:
        try:
            return self.user(name)
        except NotFoundError:
            raise NotFoundError(f"no user {name!r} to act as") from None

    def add_user(
        self,
        actor: str,
        name: str,
        *,
        dept: str,
        role: Role = Role.MEMBER,
        password: str | None = None,
        display_name: str = "",
    ) -> User:
        """Onboard a user (creating the department when it is new).

        Raises:
            PermissionDeniedError: `actor` lacks ``user.manage``.
            AlreadyExistsError: the name is taken (also by a revoked account).
        """
        hashes = _hash_pair(password) if password is not None else None
        with self._write():
            rbac.require(self._actor(actor), Permission.USER_MANAGE)
            self._insert_user(
                actor,
                name,
                dept=dept,
                role=role,
                hashes=hashes,
                display_name=display_name,
            )
        return self.user(name)

    def set_password(self, actor: str, name: str, password: str) -> None:
        """Set a user's password (users may set their own).

        Raises:
            PermissionDeniedError: `actor` is someone else and lacks ``user.manage``.
        """
        argon, broker = _hash_pair(password)
        with self._write():
            if actor != name:
                rbac.require(self._actor(actor), Permission.USER_MANAGE)
            self.user(name)
            self.db.table("users").update(
                name,
                {"password_hash": argon, "broker_hash": broker, "updated_at": float(self._clock())},
            )
            self._audit(actor, "user.password", name)

    def set_role(self, actor: str, name: str, role: Role) -> User:
        """Change a user's role.

        Raises:
            PermissionDeniedError: `actor` lacks ``role.manage``.
        """
        with self._write():
            rbac.require(self._actor(actor), Permission.ROLE_MANAGE)
            before = self.user(name)
            if before.role is not role:
                self.db.table("users").update(
                    name, {"role": role.value, "updated_at": float(self._clock())}
                )
                self._audit(actor, "user.role", name, before=before.role.value, after=role.value)
        return self.user(name)

    def set_display_name(self, actor: str, name: str, display_name: str) -> None:
        """Change a user's display name.

        Raises:
            PermissionDeniedError: `actor` is someone else and lacks ``user.manage``.
        """
        with self._write():
            if actor != name:
                rbac.require(self._actor(actor), Permission.USER_MANAGE)
            before = self.user(name)
            if before.display_name != display_name:
                self.db.table("users").update(
                    name, {"display_name": display_name, "updated_at": float(self._clock())}
                )
                self._audit(actor, "user.rename", name, after=display_name)

    def plan_import(self, actor: str, wanted: ImportFile) -> ImportPlan:
        """What importing `wanted` would change (nothing is written).

        Raises:
            PermissionDeniedError: `actor` lacks ``org.import``.
            ImportFileError: a row cannot be applied (its line is named).
        """
        with self._read():
            rbac.require(self._actor(actor), Permission.ORG_IMPORT)
            current = {user.name: user for user in self.users(include_revoked=True)}
            departments = {dept.name for dept in self.departments()}
            return plan_import(wanted, current, departments, actor=actor)

    def apply_import(
        self,
        actor: str,
        wanted: ImportFile,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> ImportPlan:
        """Make the directory match an HR file, in one transaction; returns what changed.

        Offboarded users are revoked, leave their groups and those groups rotate keys.

        Args:
            actor: the admin importing.
            wanted: the checked HR file.
            progress: called with the number of changes applied so far.

        Raises:
            PermissionDeniedError: `actor` lacks ``org.import``.
            ImportFileError: a row cannot be applied; nothing was written.
        """
        done = 0

        def step() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done)

        with self._write():
            plan = self.plan_import(actor, wanted)
            if plan.empty:
                return plan
            for dept in plan.departments:
                self._ensure_department(actor, dept)
                step()
            for row in plan.onboard:
                self._insert_user(
                    actor,
                    row.user,
                    dept=row.dept,
                    role=row.role or Role.MEMBER,
                    hashes=None,
                    display_name=row.display_name or "",
                )
                step()
            for user, _, dept in plan.move:
                self.move_user(actor, user, dept)
                step()
            for user, _, role in plan.role:
                self.set_role(actor, user, role)
                step()
            for user, display_name in plan.rename:
                self.set_display_name(actor, user, display_name)
                step()
            for user in plan.offboard:
                self.remove_user(actor, user)
                step()
            self._audit(
                actor,
                "org.import",
                self.org,
                onboard=len(plan.onboard),
                move=len(plan.move),
                role=len(plan.role),
                rename=len(plan.rename),
                offboard=len(plan.offboard),
            )
        return plan

    def move_user(self, actor: str, name: str, dept: str) -> User:
        """Move a user to another department (created when new).

        Raises:
            PermissionDeniedError: `actor` lacks ``user.manage``.
        """
        with self._write():
            rbac.require(self._actor(actor), Permission.USER_MANAGE)
            before = self.user(name)
            if before.dept != dept:
                self._ensure_department(actor, dept)
                self.db.table("users").update(
                    name, {"dept": dept, "updated_at": float(self._clock())}
                )
                self._audit(actor, "user.move", name, before=before.dept, after=dept)
        return self.user(name)

    def remove_user(self, actor: str, name: str) -> list[str]:
        """Offboard a user: revoke the account and its devices, end every membership.

        Every group the user was in is marked for key rotation.

        Returns:
            The paths of the groups the user left.

        Raises:
            PermissionDeniedError: `actor` lacks ``user.manage``.
            NotFoundError: no such user, or already revoked.
        """
        with self._write():
            rbac.require(self._actor(actor), Permission.USER_MANAGE)
            user = self.user(name)
            if not user.active:
                raise NotFoundError(f"user {name!r} is already revoked")
            left = [group.path for group in self.groups(member=name)]
            group_ids = [
                row[0]
                for row in self.db.conn.execute(
                    "SELECT group_id FROM members WHERE user = ?", (name,)
                )
            ]
            self.db.conn.execute("DELETE FROM members WHERE user = ?", (name,))
            for group_id in group_ids:
                self.db.conn.execute(
                    "UPDATE groups SET rotation_pending = 1 WHERE id = ?", (group_id,)
                )
            self.db.conn.execute(
                "UPDATE users SET status = ?, password_hash = NULL, broker_hash = NULL, "
                "updated_at = ? WHERE name = ?",
                (UserStatus.REVOKED.value, float(self._clock()), name),
            )
            self.db.conn.execute(
                "UPDATE devices SET status = ?, token_hash = NULL, broker_hash = NULL "
                "WHERE owner = ?",
                (UserStatus.REVOKED.value, name),
            )
            self._audit(actor, "user.remove", name, groups=left)
        return left

    def authenticate_password(self, name: str, password: str) -> User:
        """The user, if `password` is theirs and the account is active.

        Raises:
            AuthenticationError: unknown user, wrong password or revoked account (not said which).
        """
        row = self._user_row(name)
        stored = row["password_hash"] if row else None
        if row is None or not verify_password(stored, password):
            raise AuthenticationError("wrong user name or password")
        user = self._to_user(row)
        if not user.active:
            raise AuthenticationError("wrong user name or password")
        return user

    # -- devices -----------------------------------------------------------------------------

    def add_device(self, actor: str, name: str, *, owner: str, kind: str = "phone") -> str:
        """Register a device to a user and return its token (shown once, stored only hashed).

        Users may register their own devices; admins anyone's.

        Raises:
            PermissionDeniedError: `actor` registers for someone else without ``user.manage``.
            AlreadyExistsError: the name is taken by a device or a user.
        """
        validate_name(name, "device name")
        validate_name(kind, "device kind")
        token = new_token()
        with self._write():
            if actor != owner:
                rbac.require(self._actor(actor), Permission.USER_MANAGE)
            if not self.user(owner).active:
                raise DirectoryError(f"user {owner!r} is revoked")
            taken = self.db.conn.execute(
                "SELECT 1 FROM devices WHERE name = ? UNION SELECT 1 FROM users WHERE name = ? "
                "AND name != ?",
                (name, name, owner),
            ).fetchone()
            if taken is not None:
                raise AlreadyExistsError(f"device name {name!r} is taken")
            self.db.table("devices").insert(
                {
                    "name": name,
                    "owner": owner,
                    "kind": kind,
                    "status": UserStatus.ACTIVE.value,
                    "token_hash": hash_token(token),
                    "broker_hash": mosquitto_hash(token, iterations=MOSQUITTO_TOKEN_ITERATIONS),
                    "created_at": float(self._clock()),
                }
            )
            self._audit(actor, "device.add", name, owner=owner, kind=kind)
        return token

    def devices(self, *, owner: str | None = None) -> list[Device]:
        """Registered devices by name, optionally of one owner."""
        rows = self.db.table("devices").rows_where(
            "owner = ?" if owner else None, [owner] if owner else [], order_by="name"
        )
        return [
            Device(
                r["name"],
                r["owner"],
                r["kind"],
                UserStatus(r["status"]),
                r["created_at"],
                signing_public=r["signing_public"],
                box_public=r["box_public"],
            )
            for r in rows
        ]

    def set_device_keys(self, device: str, signing: bytes, box: bytes, *, actor: str) -> Device:
        """Register a device's public keys (Ed25519 to verify it, X25519 to seal to it).

        Users set their own devices' keys (at login); admins anyone's. Only public keys are
        stored and audited; the device keeps its secrets.

        Raises:
            NotFoundError: no such device.
            PermissionDeniedError: someone else's device without ``user.manage``.
            DirectoryError: the device is revoked, or a key is not 32 bytes.
        """
        if len(signing) != PUBLIC_KEY_LEN or len(box) != PUBLIC_KEY_LEN:
            raise DirectoryError(f"a device's public keys are {PUBLIC_KEY_LEN} bytes each")
        if signing == box:
            raise DirectoryError("a device's signing and box keys must be different keys")
        with self._write():
            rows = list(self.db.table("devices").rows_where("name = ?", [device]))
            if not rows:
                raise NotFoundError(f"no device {device!r}")
            row = rows[0]
            if actor != row["owner"]:
                rbac.require(self._actor(actor), Permission.USER_MANAGE)
            if row["status"] != UserStatus.ACTIVE.value:
                raise DirectoryError(f"device {device!r} is revoked")
            if (row["signing_public"], row["box_public"]) != (signing, box):
                self.db.table("devices").update(
                    device, {"signing_public": signing, "box_public": box}
                )
                self._audit(
                    actor,
                    "device.keys",
                    device,
                    owner=row["owner"],
                    signing=signing.hex(),
                    box=box.hex(),
                )
        return next(d for d in self.devices(owner=row["owner"]) if d.name == device)

    # -- what the directory last signed (public documents, no secrets) ------------------------

    def roster_state(self, path: str) -> RosterState | None:
        """The roster last signed for a group, or None before the first one."""
        dept, name = parse_group_path(path)
        row = self.db.conn.execute(
            "SELECT epoch, hash, issued_at, expires_at, payload FROM rosters "
            "WHERE dept = ? AND name = ?",
            (dept, name),
        ).fetchone()
        if row is None:
            return None
        epoch, digest, issued_at, expires_at, payload = row
        return RosterState(path, epoch, bytes.fromhex(digest), issued_at, expires_at, payload)

    def save_roster_state(self, state: RosterState) -> None:
        """Keep the roster just signed for a group (its epoch never goes back)."""
        dept, name = parse_group_path(state.path)
        with self._write():
            before = self.roster_state(state.path)
            if before is not None and state.epoch <= before.epoch:
                raise DirectoryError(
                    f"roster epoch {state.epoch} of {state.path} is not after {before.epoch}"
                )
            self.db.conn.execute(
                "INSERT OR REPLACE INTO rosters "
                "(dept, name, epoch, hash, issued_at, expires_at, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    dept,
                    name,
                    state.epoch,
                    state.hash.hex(),
                    state.issued_at,
                    state.expires_at,
                    state.payload,
                ),
            )

    def key_record_state(self, user: str) -> KeyRecordState | None:
        """The key record last signed for a user, or None before the first one."""
        row = self.db.conn.execute(
            "SELECT version, payload FROM key_records WHERE user = ?", (user,)
        ).fetchone()
        return None if row is None else KeyRecordState(user, row[0], row[1])

    def save_key_record_state(self, state: KeyRecordState) -> None:
        """Keep the key record just signed for a user (its version never goes back)."""
        with self._write():
            before = self.key_record_state(state.user)
            if before is not None and state.version <= before.version:
                raise DirectoryError(
                    f"key record version {state.version} of {state.user} is not after "
                    f"{before.version}"
                )
            self.db.conn.execute(
                "INSERT OR REPLACE INTO key_records (user, version, payload) VALUES (?, ?, ?)",
                (state.user, state.version, state.payload),
            )

    def revoke_device(self, actor: str, name: str) -> None:
        """Revoke one device's credential.

        Raises:
            NotFoundError: no such device.
            PermissionDeniedError: someone else's device without ``user.manage``.
        """
        with self._write():
            rows = list(self.db.table("devices").rows_where("name = ?", [name]))
            if not rows:
                raise NotFoundError(f"no device {name!r}")
            if actor != rows[0]["owner"]:
                rbac.require(self._actor(actor), Permission.USER_MANAGE)
            self.db.conn.execute(
                "UPDATE devices SET status = ?, token_hash = NULL, broker_hash = NULL "
                "WHERE name = ?",
                (UserStatus.REVOKED.value, name),
            )
            self._audit(actor, "device.revoke", name)

    # -- snapshot for the access policy --------------------------------------------------------

    def snapshot(self, service_tokens: Mapping[str, str] | None = None) -> DirectorySnapshot:
        """Everything the access policy needs, read in one transaction.

        Args:
            service_tokens: token hashes of the internal services, by service name.
        """
        conn = self.db.conn
        with self._read():
            users = {user.name: user for user in self.users(include_revoked=True)}
            devices = {device.name: device for device in self.devices()}
            groups = {(group.dept, group.name): group for group in self.groups()}
            passwords = dict(conn.execute("SELECT name, password_hash FROM users").fetchall())
            tokens = dict(conn.execute("SELECT name, token_hash FROM devices").fetchall())
            org = self.org
        return DirectorySnapshot(
            org=org,
            users=users,
            devices=devices,
            groups=groups,
            password_hashes=passwords,
            token_hashes=tokens,
            service_tokens=dict(service_tokens or {}),
        )

    @contextlib.contextmanager
    def _read(self) -> Iterator[None]:
        """A consistent view across several queries (a read transaction)."""
        conn = self.db.conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.execute("COMMIT")

    def broker_credentials(self) -> dict[str, str]:
        """Mosquitto-format hashes by MQTT user name: active users, and device accounts.

        Device accounts log in as themselves with their token. Devices registered to a person
        are not listed: a Mosquitto password file holds one secret per user name.
        """
        users = self.db.conn.execute(
            "SELECT name, broker_hash FROM users WHERE status = ? AND broker_hash IS NOT NULL",
            (UserStatus.ACTIVE.value,),
        ).fetchall()
        devices = self.db.conn.execute(
            "SELECT name, broker_hash FROM devices WHERE status = ? AND name = owner "
            "AND broker_hash IS NOT NULL",
            (UserStatus.ACTIVE.value,),
        ).fetchall()
        return dict(users) | dict(devices)

    # -- groups ------------------------------------------------------------------------------

    def _group_row(self, dept: str, name: str) -> dict[str, Any] | None:
        rows = list(self.db.table("groups").rows_where("dept = ? AND name = ?", [dept, name]))
        return rows[0] if rows else None

    def _to_group(self, row: dict[str, Any]) -> Group:
        members = frozenset(
            r[0]
            for r in self.db.conn.execute(
                "SELECT user FROM members WHERE group_id = ?", (row["id"],)
            )
        )
        post_roles = frozenset(Role(r) for r in (row["post_roles"] or "").split(",") if r)
        return Group(
            dept=row["dept"],
            name=row["name"],
            kind=GroupKind(row["kind"]),
            created_at=row["created_at"],
            created_by=row["created_by"],
            expires_at=row["expires_at"],
            announcement=bool(row["announcement"]),
            post_roles=post_roles,
            retention_days=row["retention_days"],
            legal_hold=bool(row["legal_hold"]),
            compliance=bool(row["compliance"]),
            rotation_pending=bool(row["rotation_pending"]),
            members=members,
            policy_version=row["policy_version"],
        )

    def group(self, path: str) -> Group:
        """One group by ``dept/name``.

        Raises:
            NotFoundError: no such group.
        """
        dept, name = parse_group_path(path)
        row = self._group_row(dept, name)
        if row is None:
            raise NotFoundError(f"no group {path!r}")
        return self._to_group(row)

    def groups(self, *, member: str | None = None, dept: str | None = None) -> list[Group]:
        """Groups by path; only those `member` belongs to, or of one department."""
        sql = "SELECT * FROM groups"
        args: list[Any] = []
        where = []
        if member is not None:
            where.append("id IN (SELECT group_id FROM members WHERE user = ?)")
            args.append(member)
        if dept is not None:
            where.append("dept = ?")
            args.append(dept)
        if where:
            sql += " WHERE " + " AND ".join(where)
        cursor = self.db.conn.execute(sql + " ORDER BY dept, name", args)
        columns = [c[0] for c in cursor.description]
        return [self._to_group(dict(zip(columns, row, strict=True))) for row in cursor.fetchall()]

    def create_group(
        self,
        actor: str,
        path: str,
        *,
        kind: GroupKind = GroupKind.PUBLIC,
        expires_at: float | None = None,
        retention_days: int | None = None,
        compliance: bool = False,
        announcement: bool = False,
        post_roles: Iterable[Role] | None = None,
    ) -> Group:
        """Create a group; its creator becomes its first member.

        Raises:
            PermissionDeniedError: `actor` may not create groups in that department.
            AlreadyExistsError: the group exists.
            DirectoryError: a temporary group without expiry, or an expiry on another kind.
        """
        dept, name = parse_group_path(path)
        if dept == SITES_DEPARTMENT:
            raise DirectoryError("site channels are created with `meshchat site add`")
        if (kind is GroupKind.TEMPORARY) != (expires_at is not None):
            raise DirectoryError("a temporary group needs an expiry, and only a temporary one")
        if retention_days is not None and retention_days < 1:
            raise DirectoryError("retention must be at least one day")
        roles = frozenset(post_roles) if post_roles is not None else DEFAULT_POST_ROLES
        with self._write():
            creator = self._actor(actor)
            rbac.require(creator, Permission.GROUP_CREATE, dept=dept)
            if dept not in {d.name for d in self.departments()}:
                raise NotFoundError(f"no department {dept!r}")
            self._insert_group(
                actor,
                dept,
                name,
                kind=kind,
                expires_at=expires_at,
                retention_days=retention_days,
                compliance=compliance,
                announcement=announcement,
                post_roles=roles,
            )
            self._add_member_rows(dept, name, [actor])
        return self.group(path)

    def _insert_group(self, actor: str, dept: str, name: str, **policy: Any) -> None:  # noqa: ANN401  # column values
        if self._group_row(dept, name) is not None:
            raise AlreadyExistsError(f"group {dept}/{name} already exists")
        roles: frozenset[Role] = policy.pop("post_roles")
        self.db.table("groups").insert(
            {
                "dept": dept,
                "name": name,
                "kind": policy.pop("kind").value,
                "created_at": float(self._clock()),
                "created_by": actor,
                "post_roles": ",".join(sorted(r.value for r in roles)),
                **{k: int(v) if isinstance(v, bool) else v for k, v in policy.items()},
            }
        )
        audit_policy = {k: v for k, v in policy.items() if v not in {None, False}}
        self._audit(actor, "group.create", f"{dept}/{name}", **audit_policy)

    def _add_member_rows(self, dept: str, name: str, users: Iterable[str]) -> list[str]:
        row = self._group_row(dept, name)
        assert row is not None
        added = []
        for user in users:
            found = self.user(user)
            if not found.active:
                raise DirectoryError(f"user {user!r} is revoked")
            cursor = self.db.conn.execute(
                "INSERT OR IGNORE INTO members (group_id, user, added_at) VALUES (?, ?, ?)",
                (row["id"], user, float(self._clock())),
            )
            if cursor.rowcount:
                added.append(user)
            else:
                # An admin's add makes a membership the geofence made the admin's: it stays.
                self.db.conn.execute(
                    "UPDATE members SET via = NULL WHERE group_id = ? AND user = ?",
                    (row["id"], user),
                )
        return added

    def add_members(self, actor: str, path: str, users: Iterable[str]) -> list[str]:
        """Add users to a group; returns those who were not members yet (adds do not rotate).

        Raises:
            PermissionDeniedError: `actor` may not manage the group's department.
        """
        dept, name = parse_group_path(path)
        with self._write():
            rbac.require(self._actor(actor), Permission.GROUP_MANAGE, dept=dept)
            self.group(path)
            added = self._add_member_rows(dept, name, users)
            if added:
                self._audit(actor, "group.add", path, users=added)
        return added

    def remove_members(self, actor: str, path: str, users: Iterable[str]) -> list[str]:
        """Remove users from a group and mark it for key rotation; returns who was removed.

        Anyone may remove themselves (leave), except from a site channel, whose members the
        geofence keeps; removing others needs ``group.manage`` for the group's department.

        Raises:
            PermissionDeniedError: `actor` may not manage the group's department.
        """
        dept, name = parse_group_path(path)
        wanted = list(users)
        with self._write():
            remover = self._actor(actor)
            if wanted != [actor] or dept == SITES_DEPARTMENT:
                rbac.require(remover, Permission.GROUP_MANAGE, dept=dept)
            group = self.group(path)
            removed = [user for user in wanted if user in group.members]
            row = self._group_row(dept, name)
            assert row is not None
            for user in removed:
                self.db.conn.execute(
                    "DELETE FROM members WHERE group_id = ? AND user = ?", (row["id"], user)
                )
            if removed:
                self.db.conn.execute(
                    "UPDATE groups SET rotation_pending = 1 WHERE id = ?", (row["id"],)
                )
                self._audit(actor, "group.remove", path, users=removed)
        return removed

    def set_policy(
        self,
        actor: str,
        path: str,
        *,
        retention_days: int | Literal["keep"] | None = "keep",
        legal_hold: bool | None = None,
        compliance: bool | None = None,
    ) -> Group:
        """Change a group's retention, legal hold or compliance copy (admins only).

        Args:
            actor: who changes it.
            path: the group, ``dept/name``.
            retention_days: days to keep history, None for forever, "keep" to leave it.
            legal_hold: keep everything regardless of retention while set.
            compliance: give the compliance key a copy of every chain.

        Raises:
            PermissionDeniedError: `actor` lacks ``retention.manage``.
        """
        if isinstance(retention_days, int) and retention_days < 1:
            raise DirectoryError("retention must be at least one day")
        dept, name = parse_group_path(path)
        with self._write():
            rbac.require(self._actor(actor), Permission.RETENTION_MANAGE)
            before = self.group(path)
            changes: dict[str, Any] = {}
            if retention_days not in ("keep", before.retention_days):
                changes["retention_days"] = retention_days
            if legal_hold is not None and legal_hold != before.legal_hold:
                changes["legal_hold"] = legal_hold
            if compliance is not None and compliance != before.compliance:
                changes["compliance"] = compliance
            if changes:
                row = self._group_row(dept, name)
                assert row is not None
                values = {k: int(v) if isinstance(v, bool) else v for k, v in changes.items()}
                values["policy_version"] = row["policy_version"] + 1
                self.db.table("groups").update(row["id"], values)
                self._audit(actor, "group.policy", path, **changes)
        return self.group(path)

    # -- sites -------------------------------------------------------------------------------

    @staticmethod
    def _check_site_timing(
        dwell_s: float | None, exit_dwell_s: float | None, hysteresis_m: float | None
    ) -> None:
        for what, value, top in (
            ("dwell", dwell_s, MAX_SITE_DWELL_S),
            ("exit dwell", exit_dwell_s, MAX_SITE_DWELL_S),
            ("hysteresis", hysteresis_m, MAX_SITE_HYSTERESIS_M),
        ):
            if value is not None and not 0 <= value <= top:
                raise DirectoryError(f"the {what} must be between 0 and {top:,g}")

    def add_site(
        self,
        actor: str,
        name: str,
        *,
        lat: float | None = None,
        lon: float | None = None,
        radius_m: float | None = None,
        polygon: list[tuple[float, float]] | None = None,
        dwell_s: float | None = None,
        exit_dwell_s: float | None = None,
        hysteresis_m: float | None = None,
    ) -> Site:
        """Add a site (a circle or a polygon of (lat, lon) points) and its channel group.

        Args:
            actor: who adds it.
            name: the site's name; its channel is ``sites/{name}``.
            lat: a circle's centre latitude.
            lon: a circle's centre longitude.
            radius_m: a circle's radius in metres.
            polygon: or the corners of a polygon, as (lat, lon).
            dwell_s: seconds inside before the geofence adds someone (None: its default).
            exit_dwell_s: seconds wholly outside before it removes them (None: its default).
            hysteresis_m: metres the fence grows by for the exit test (None: its default).

        Raises:
            PermissionDeniedError: `actor` lacks ``site.manage``.
            DirectoryError: neither or both shapes, coordinates or timing out of range.
        """
        validate_name(name, "site name")
        circle = lat is not None and lon is not None and radius_m is not None
        if circle == (polygon is not None):
            raise DirectoryError("a site is a circle (--lat, --lon, --radius) or a polygon")
        points = [(lat, lon)] if circle else list(polygon or [])
        for point_lat, point_lon in points:
            assert point_lat is not None
            assert point_lon is not None
            if not (-90 <= point_lat <= 90 and -180 <= point_lon <= 180):
                raise DirectoryError(f"coordinates ({point_lat}, {point_lon}) are out of range")
            if abs(point_lat) > MAX_SITE_LATITUDE:
                raise DirectoryError(
                    f"latitude {point_lat} is beyond {MAX_SITE_LATITUDE:g} degrees: sites must "
                    f"lie between {MAX_SITE_LATITUDE:g} S and {MAX_SITE_LATITUDE:g} N"
                )
        if circle and not (radius_m is not None and 0 < radius_m <= 100_000):
            raise DirectoryError("the radius must be between 0 and 100,000 metres")
        if polygon is not None and not 3 <= len(polygon) <= MAX_SITE_CORNERS:
            raise DirectoryError(f"a polygon needs 3 to {MAX_SITE_CORNERS} points")
        self._check_site_timing(dwell_s, exit_dwell_s, hysteresis_m)
        timing = {"dwell_s": dwell_s, "exit_dwell_s": exit_dwell_s, "hysteresis_m": hysteresis_m}
        with self._write():
            rbac.require(self._actor(actor), Permission.SITE_MANAGE)
            if list(self.db.table("sites").rows_where("name = ?", [name])):
                raise AlreadyExistsError(f"site {name!r} already exists")
            self.db.table("sites").insert(
                {
                    "name": name,
                    "lat": lat,
                    "lon": lon,
                    "radius_m": radius_m,
                    "polygon": json.dumps(polygon) if polygon is not None else None,
                    "created_at": float(self._clock()),
                    **timing,
                }
            )
            given = {key: value for key, value in timing.items() if value is not None}
            self._audit(actor, "site.add", name, circle=circle, **given)
            # A site removed earlier left its (empty) channel: the channel comes back, and its
            # roster's epochs go on from where they were (clients refuse a rollback).
            if self._group_row(SITES_DEPARTMENT, name) is None:
                self._insert_group(
                    actor,
                    SITES_DEPARTMENT,
                    name,
                    kind=GroupKind.PUBLIC,
                    expires_at=None,
                    retention_days=None,
                    compliance=False,
                    announcement=False,
                    post_roles=DEFAULT_POST_ROLES,
                )
        return self.site(name)

    def remove_site(self, actor: str, name: str) -> list[str]:
        """Remove a site: its fence and every member of its channel, in one transaction.

        The channel group ``sites/{name}`` stays, empty, with a key rotation pending: its next
        roster (signed by the geofence key, as every site roster) lists nobody, so the broker
        lets nobody read or post there and every sender's old key is retired; its history
        stays in the archive under its retention. Adding the site again brings the channel
        back. The geofence worker drops the site when it next reads the directory.

        Returns:
            The users who were in the channel (geofence-made and admin-made memberships).

        Raises:
            PermissionDeniedError: `actor` lacks ``site.manage``.
            NotFoundError: no such site.
        """
        with self._write():
            rbac.require(self._actor(actor), Permission.SITE_MANAGE)
            self.site(name)
            row = self._group_row(SITES_DEPARTMENT, name)
            members: list[str] = []
            if row is not None:
                members = sorted(
                    user
                    for (user,) in self.db.conn.execute(
                        "SELECT user FROM members WHERE group_id = ?", (row["id"],)
                    )
                )
                self.db.conn.execute("DELETE FROM members WHERE group_id = ?", (row["id"],))
                if members:
                    self.db.conn.execute(
                        "UPDATE groups SET rotation_pending = 1 WHERE id = ?", (row["id"],)
                    )
            self.db.conn.execute("DELETE FROM sites WHERE name = ?", (name,))
            self._audit(actor, "site.remove", name, members=members)
        return members

    def set_site(
        self,
        actor: str,
        name: str,
        *,
        dwell_s: float | Literal["keep"] | None = "keep",
        exit_dwell_s: float | Literal["keep"] | None = "keep",
        hysteresis_m: float | Literal["keep"] | None = "keep",
    ) -> Site:
        """Change a site's geofence timing; None goes back to the default, "keep" leaves it.

        Raises:
            PermissionDeniedError: `actor` lacks ``site.manage``.
            NotFoundError: no such site.
            DirectoryError: a value is out of range.
        """
        wanted = {"dwell_s": dwell_s, "exit_dwell_s": exit_dwell_s, "hysteresis_m": hysteresis_m}
        changes = {key: value for key, value in wanted.items() if value != "keep"}
        self._check_site_timing(
            *(None if isinstance(v, str) else v for v in wanted.values())  # "keep" is checked
        )
        with self._write():
            rbac.require(self._actor(actor), Permission.SITE_MANAGE)
            before = self.site(name)
            changes = {k: v for k, v in changes.items() if getattr(before, k) != v}
            if changes:
                self.db.table("sites").update(name, changes)
                self._audit(actor, "site.set", name, **changes)
        return self.site(name)

    def site(self, name: str) -> Site:
        """One site.

        Raises:
            NotFoundError: no such site.
        """
        rows = list(self.db.table("sites").rows_where("name = ?", [name]))
        if not rows:
            raise NotFoundError(f"no site {name!r}")
        return self._to_site(rows[0])

    @staticmethod
    def _to_site(row: dict[str, Any]) -> Site:
        polygon = json.loads(row["polygon"]) if row["polygon"] else None
        return Site(
            name=row["name"],
            lat=row["lat"],
            lon=row["lon"],
            radius_m=row["radius_m"],
            polygon=tuple((float(a), float(b)) for a, b in polygon) if polygon else None,
            created_at=row["created_at"],
            dwell_s=row.get("dwell_s"),
            exit_dwell_s=row.get("exit_dwell_s"),
            hysteresis_m=row.get("hysteresis_m"),
        )

    def sites(self) -> list[Site]:
        """Every site, by name."""
        return [self._to_site(row) for row in self.db.table("sites").rows_where(order_by="name")]

    def site_presence(self) -> dict[str, frozenset[str]]:
        """The users the geofence worker put in each site channel (not an admin), by site."""
        rows = self.db.conn.execute(
            "SELECT g.name, m.user FROM members m JOIN groups g ON g.id = m.group_id "
            "WHERE g.dept = ? AND m.via = ?",
            (SITES_DEPARTMENT, GEOFENCE_VIA),
        ).fetchall()
        found: dict[str, set[str]] = {}
        for site, user in rows:
            found.setdefault(site, set()).add(user)
        return {site: frozenset(users) for site, users in found.items()}

    def set_site_presence(
        self,
        actor: str,
        site: str,
        present: Iterable[str],
        *,
        add: bool = True,
        remove: bool = True,
    ) -> tuple[list[str], list[str]]:
        """The geofence worker's write: make a site channel's automatic members `present`.

        Only users whose role holds ``site.auto-join`` (and who are active) are added; only
        memberships the geofence made are removed, never one an admin made. A removal marks the
        channel for key rotation. One transaction and one audit row (``site.presence``) per call,
        so one roster epoch per batch.

        Args:
            actor: the service acting (``svc.geofence``); not checked against RBAC.
            site: the site.
            present: the users the geofence sees inside the site now.
            add: add those not in the channel yet.
            remove: remove the geofence's members who are not present.

        Returns:
            (added, removed) user names, sorted.

        Raises:
            NotFoundError: no such site.
        """
        wanted = set(present)
        with self._write():
            self.site(site)
            row = self._group_row(SITES_DEPARTMENT, site)
            if row is None:
                raise NotFoundError(f"site {site!r} has no channel")
            members = dict(
                self.db.conn.execute(
                    "SELECT user, via FROM members WHERE group_id = ?", (row["id"],)
                ).fetchall()
            )
            allowed = {
                user.name
                for user in self.users()
                if user.name in wanted and rbac.can(user, Permission.SITE_AUTOJOIN)
            }
            added = sorted(allowed - members.keys()) if add else []
            removed = (
                sorted(u for u, via in members.items() if via == GEOFENCE_VIA and u not in allowed)
                if remove
                else []
            )
            now = float(self._clock())
            self.db.conn.executemany(
                "INSERT INTO members (group_id, user, added_at, via) VALUES (?, ?, ?, ?)",
                [(row["id"], user, now, GEOFENCE_VIA) for user in added],
            )
            self.db.conn.executemany(
                "DELETE FROM members WHERE group_id = ? AND user = ?",
                [(row["id"], user) for user in removed],
            )
            if removed:
                self.db.conn.execute(
                    "UPDATE groups SET rotation_pending = 1 WHERE id = ?", (row["id"],)
                )
            if added or removed:
                self._audit(actor, "site.presence", site, joined=added, left=removed)
        return added, removed

    # -- audit -------------------------------------------------------------------------------

    def audit_entries(self, *, last: int | None = None) -> list[AuditEntry]:
        """The audit log in order (only the `last` rows when given)."""
        sql = "SELECT seq, ts, actor, action, target, details, prev_hash, hash FROM audit"
        if last is not None:
            sql = f"SELECT * FROM ({sql} ORDER BY seq DESC LIMIT ?) ORDER BY seq"  # noqa: S608  # constant SQL
            rows = self.db.conn.execute(sql, (last,)).fetchall()
        else:
            rows = self.db.conn.execute(sql + " ORDER BY seq").fetchall()
        return [AuditEntry(*row) for row in rows]

    def verify_audit(self) -> int:
        """Check the whole audit chain; returns the number of rows.

        Raises:
            AuditChainError: naming the first bad row.
        """
        row = self.db.conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
        head = tuple(json.loads(row[0])) if row else None
        cursor = self.db.conn.execute(
            "SELECT seq, ts, actor, action, target, details, prev_hash, hash FROM audit "
            "ORDER BY rowid"
        )
        return verify_chain(
            (AuditEntry(*r) for r in cursor),
            (int(head[0]), str(head[1])) if head else None,
        )
