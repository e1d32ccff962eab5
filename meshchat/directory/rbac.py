"""Role-based access control for admin actions: who may create groups, import, manage sites."""

from __future__ import annotations

from typing import Final

from meshchat.directory.model import Permission, Role, User
from meshchat.errors import PermissionDeniedError

__all__ = ["DEPARTMENT_SCOPED", "ROLE_PERMISSIONS", "can", "require"]

ROLE_PERMISSIONS: Final[dict[Role, frozenset[Permission]]] = {
    Role.ADMIN: frozenset(Permission),
    Role.MANAGER: frozenset(
        {
            Permission.GROUP_CREATE,
            Permission.GROUP_MANAGE,
            Permission.POST_ANNOUNCEMENT,
            Permission.SITE_AUTOJOIN,
        }
    ),
    Role.MEMBER: frozenset({Permission.SITE_AUTOJOIN}),
    Role.DEVICE: frozenset(),
}
"""The defaults: admins may do everything; managers manage groups of their own department;
people (not device accounts) may be auto-joined to the channel of the site they stand in."""

DEPARTMENT_SCOPED: Final = frozenset(
    {Permission.GROUP_CREATE, Permission.GROUP_MANAGE, Permission.POST_ANNOUNCEMENT}
)
"""Permissions a manager holds for their own department only."""


def can(actor: User, permission: Permission, *, dept: str | None = None) -> bool:
    """Whether `actor` holds `permission` (for `dept`, when the permission is scoped to one)."""
    if not actor.active or permission not in ROLE_PERMISSIONS[actor.role]:
        return False
    if actor.role is Role.MANAGER and permission in DEPARTMENT_SCOPED:
        return dept is not None and dept == actor.dept
    return True


def require(actor: User, permission: Permission, *, dept: str | None = None) -> None:
    """Raise unless `actor` holds `permission`.

    Raises:
        PermissionDeniedError: naming the actor, their role and the missing permission.
    """
    if can(actor, permission, dept=dept):
        return
    if not actor.active:
        reason = f"{actor.name} is revoked"
    elif actor.role is Role.MANAGER and permission in ROLE_PERMISSIONS[Role.MANAGER]:
        reason = f"{actor.name} manages {actor.dept}, not {dept}"
    else:
        reason = f"{actor.name} is {actor.role.value}"
    where = f" for department {dept}" if dept and permission in DEPARTMENT_SCOPED else ""
    raise PermissionDeniedError(
        f"permission denied: {permission.value}{where} is missing ({reason})",
        actor=actor.name,
        permission=permission.value,
    )
