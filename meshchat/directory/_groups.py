"""Groups: their ``dept/name`` paths, their members and each group's retention policy.

`GroupsMixin` is one of the domain mixins that make up `meshchat.directory.store.Directory`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, Literal

from meshchat.directory import rbac
from meshchat.directory._core import DirectoryCore
from meshchat.directory.model import Department, Group, GroupKind, Permission, Role, User
from meshchat.errors import AlreadyExistsError, DirectoryError, NotFoundError, TopicError
from meshchat.topics import SITES_DEPARTMENT, validate_name

__all__: list[str] = []  # internal: `meshchat.directory.store` is the public face

DEFAULT_POST_ROLES: Final = frozenset({Role.ADMIN, Role.MANAGER})


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


class GroupsMixin(DirectoryCore):
    """Groups of `Directory`, their members and their retention policy."""

    if TYPE_CHECKING:  # what this domain uses of the others; `Directory` brings them together

        def user(self, name: str) -> User:
            """One user (`UsersMixin.user`)."""

        def _actor(self, name: str) -> User: ...

        def departments(self) -> list[Department]:
            """Every department (`UsersMixin.departments`)."""

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

    def _add_member_rows(
        self, dept: str, name: str, users: Iterable[str]
    ) -> tuple[list[str], list[str]]:
        """Insert memberships: (users added, geofence-made memberships now the admin's)."""
        row = self._group_row(dept, name)
        assert row is not None
        added: list[str] = []
        adopted: list[str] = []
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
                # An admin's add makes a membership the geofence made the admin's: it stays
                # when the user leaves the site.
                cursor = self.db.conn.execute(
                    "UPDATE members SET via = NULL "
                    "WHERE group_id = ? AND user = ? AND via IS NOT NULL",
                    (row["id"], user),
                )
                if cursor.rowcount:
                    adopted.append(user)
        return added, adopted

    def add_members(self, actor: str, path: str, users: Iterable[str]) -> list[str]:
        """Add users to a group; returns those who were not members yet (adds do not rotate).

        Raises:
            PermissionDeniedError: `actor` may not manage the group's department.
        """
        dept, name = parse_group_path(path)
        with self._write():
            rbac.require(self._actor(actor), Permission.GROUP_MANAGE, dept=dept)
            self.group(path)
            added, adopted = self._add_member_rows(dept, name, users)
            if added:
                self._audit(actor, "group.add", path, users=added)
            if adopted:
                self._audit(actor, "group.keep", path, users=adopted)
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
