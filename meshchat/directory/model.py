"""Value objects of the org directory: users, groups, sites, roles and permissions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "Department",
    "Device",
    "Group",
    "GroupKind",
    "Permission",
    "Role",
    "Site",
    "User",
    "UserStatus",
]


class Role(enum.StrEnum):
    """What a user may do; `MANAGER` applies to the user's own department."""

    ADMIN = "admin"
    MANAGER = "manager"
    MEMBER = "member"
    DEVICE = "device"


class Permission(enum.StrEnum):
    """One right an action needs; a denied action names it."""

    ORG_IMPORT = "org.import"
    USER_MANAGE = "user.manage"
    ROLE_MANAGE = "role.manage"
    GROUP_CREATE = "group.create"
    GROUP_MANAGE = "group.manage"
    SITE_MANAGE = "site.manage"
    RETENTION_MANAGE = "retention.manage"
    AUDIT_READ = "audit.read"
    POST_ANNOUNCEMENT = "group.post-announcement"


class UserStatus(enum.StrEnum):
    """Whether an account may log in."""

    ACTIVE = "active"
    REVOKED = "revoked"


class GroupKind(enum.StrEnum):
    """Who may find and join a group; temporary groups expire."""

    PUBLIC = "public"
    PRIVATE = "private"
    TEMPORARY = "temporary"


@dataclass(frozen=True, slots=True)
class Department:
    """A department of the org."""

    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class User:
    """A person (or a device account) in the directory."""

    name: str
    dept: str
    role: Role
    status: UserStatus
    created_at: float
    display_name: str = ""
    has_password: bool = False

    @property
    def active(self) -> bool:
        """Whether the account may log in."""
        return self.status is UserStatus.ACTIVE


@dataclass(frozen=True, slots=True)
class Device:
    """A device registered to a user, or a device account of its own (role ``device``)."""

    name: str
    owner: str
    kind: str
    status: UserStatus
    created_at: float


@dataclass(frozen=True, slots=True)
class Group:
    """A group (or site channel) and its policy."""

    dept: str
    name: str
    kind: GroupKind
    created_at: float
    created_by: str
    expires_at: float | None = None
    announcement: bool = False
    post_roles: frozenset[Role] = field(default_factory=frozenset)
    retention_days: int | None = None
    legal_hold: bool = False
    compliance: bool = False
    rotation_pending: bool = False
    members: frozenset[str] = field(default_factory=frozenset)

    @property
    def path(self) -> str:
        """``dept/name``, the way users name a group."""
        return f"{self.dept}/{self.name}"

    def expired(self, now: float) -> bool:
        """Whether a temporary group has passed its expiry."""
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class Site:
    """A place with a geofence; its channel is the group ``sites/{name}``."""

    name: str
    lat: float | None
    lon: float | None
    radius_m: float | None
    polygon: tuple[tuple[float, float], ...] | None
    created_at: float
