"""The directory store: org, users, groups, sites and the audit log in one SQLite file.

Every write runs in one ``BEGIN IMMEDIATE`` transaction together with its audit row, so an
admin command in another process and the running server never interleave half-changes. Other
processes notice changes through `Directory.data_version`.

`Directory` is the one entry point. It is assembled from one mixin per domain, each in its own
module, all sharing one connection, one ``_write()`` transaction and one ``_audit()`` from
`DirectoryCore`:

- ``_core``: the file, transactions and the audit log (`DirectoryCore`);
- ``_users``: departments, users and passwords, devices and tokens, broker credentials;
- ``_groups``: groups, memberships and retention policy (and `parse_group_path`);
- ``_sites``: sites and the geofence's presence in their channels;
- ``_signed``: the roster and key-record states the directory last signed.

What spans the domains stays here: creating the org, the HR import and the snapshot for the
access policy. Mixins rather than composition because a domain's writes call into another's
inside one transaction (offboarding ends memberships, a site creates its channel group) and
every caller uses `Directory`'s flat methods: separate objects would need the same methods
again on `Directory` to delegate to them. The mixins are one level deep, each on
`DirectoryCore`; what one uses of another is declared at its top under ``TYPE_CHECKING``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from meshchat.directory import rbac
from meshchat.directory._core import DIRECTORY_FILE
from meshchat.directory._groups import GroupsMixin, parse_group_path
from meshchat.directory._signed import SignedStateMixin
from meshchat.directory._sites import SitesMixin
from meshchat.directory._users import UsersMixin, hash_pair
from meshchat.directory.hrimport import ImportFile, ImportPlan, plan_import
from meshchat.directory.model import Permission, Role, User
from meshchat.directory.policy import DirectorySnapshot
from meshchat.errors import AlreadyExistsError, NotFoundError
from meshchat.topics import validate_name

__all__ = ["DIRECTORY_FILE", "Directory", "parse_group_path"]


class Directory(UsersMixin, GroupsMixin, SitesMixin, SignedStateMixin):
    """The org directory in ``DATA/directory.db``; a context manager that closes the file."""

    # -- org -----------------------------------------------------------------------------------

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
        hashes = hash_pair(password)
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

    # -- HR import -----------------------------------------------------------------------------

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
