"""Departments, users and their passwords, devices and their tokens, the broker's credentials.

`UsersMixin` is one of the domain mixins that make up `meshchat.directory.store.Directory`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from meshchat.directory import rbac
from meshchat.directory._core import DirectoryCore
from meshchat.directory.credentials import (
    MOSQUITTO_TOKEN_ITERATIONS,
    hash_password,
    hash_token,
    mosquitto_hash,
    new_token,
    verify_password,
)
from meshchat.directory.model import Department, Device, Group, Permission, Role, User, UserStatus
from meshchat.errors import (
    AlreadyExistsError,
    AuthenticationError,
    DirectoryError,
    NotFoundError,
    TopicError,
)
from meshchat.topics import RESERVED_DEPARTMENTS, validate_name

__all__: list[str] = []  # internal: `meshchat.directory.store.Directory` is the public face

PUBLIC_KEY_LEN: Final = 32


def hash_pair(password: str) -> tuple[str, str]:
    """argon2id for the embedded broker and logins; Mosquitto's format for external brokers."""
    return hash_password(password), mosquitto_hash(password)


class UsersMixin(DirectoryCore):
    """Departments, users and devices of `Directory`; the credentials they log in with."""

    if TYPE_CHECKING:  # what this domain uses of the others; `Directory` brings them together

        def groups(self, *, member: str | None = None, dept: str | None = None) -> list[Group]:
            """Groups by path (`GroupsMixin.groups`)."""

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

    # -- users ---------------------------------------------------------------------------------

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

    def users_named(self, names: Iterable[str], *, include_revoked: bool = False) -> list[User]:
        """The users of those `names` that exist (active ones only by default), by name.

        One query however many names: a group's roster reads its members' accounts only.
        """
        sql = "SELECT * FROM users WHERE name IN (SELECT value FROM json_each(?))"
        args: list[Any] = [json.dumps(sorted(names))]
        if not include_revoked:
            sql += " AND status = ?"
            args.append(UserStatus.ACTIVE.value)
        cursor = self.db.conn.execute(sql + " ORDER BY name", args)
        columns = [c[0] for c in cursor.description]
        return [self._to_user(dict(zip(columns, row, strict=True))) for row in cursor.fetchall()]

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
        hashes = hash_pair(password) if password is not None else None
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
        argon, broker = hash_pair(password)
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
    # -- devices -------------------------------------------------------------------------------

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
            if rows[0]["status"] == UserStatus.REVOKED.value:
                return  # revoked already: nothing changes, nothing to audit
            self.db.conn.execute(
                "UPDATE devices SET status = ?, token_hash = NULL, broker_hash = NULL "
                "WHERE name = ?",
                (UserStatus.REVOKED.value, name),
            )
            self._audit(actor, "device.revoke", name)

    # -- broker credentials --------------------------------------------------------------------

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
