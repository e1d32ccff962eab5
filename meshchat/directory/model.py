"""Value objects of the org directory: users, groups, sites, roles and permissions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "Department",
    "Device",
    "Group",
    "GroupKind",
    "KeyRecordState",
    "Permission",
    "Role",
    "RosterState",
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
    SITE_AUTOJOIN = "site.auto-join"
    """Not an admin action: the geofence may add this user to the channel of a site they enter."""


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
    """A device registered to a user, or a device account of its own (role ``device``).

    Attributes:
        signing_public: the device's Ed25519 public key, once it registered its keys.
        box_public: the device's X25519 public key (payloads are sealed to it).
    """

    name: str
    owner: str
    kind: str
    status: UserStatus
    created_at: float
    signing_public: bytes | None = None
    box_public: bytes | None = None

    @property
    def has_keys(self) -> bool:
        """Whether the device registered both public keys."""
        return self.signing_public is not None and self.box_public is not None


@dataclass(frozen=True, slots=True)
class Group:
    """A group (or site channel) and its policy.

    `policy_version` increases with every policy change; signed rosters carry it, so every
    sender rotates its keys when the policy changes.
    """

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
    policy_version: int = 0

    @property
    def path(self) -> str:
        """``dept/name``, the way users name a group."""
        return f"{self.dept}/{self.name}"

    def expired(self, now: float) -> bool:
        """Whether a temporary group has passed its expiry."""
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class Site:
    """A place with a geofence; its channel is the group ``sites/{name}``.

    Attributes:
        dwell_s: seconds inside before the geofence adds someone (None: its default).
        exit_dwell_s: seconds wholly outside before it removes them (None: its default).
        hysteresis_m: metres the fence grows by for the exit test (None: its default).
    """

    name: str
    lat: float | None
    lon: float | None
    radius_m: float | None
    polygon: tuple[tuple[float, float], ...] | None
    created_at: float
    dwell_s: float | None = None
    exit_dwell_s: float | None = None
    hysteresis_m: float | None = None


@dataclass(frozen=True, slots=True)
class RosterState:
    """The roster the directory last signed for a group (public data, kept between runs).

    Attributes:
        path: the group, ``dept/name``.
        epoch: the roster's epoch.
        hash: the roster's hash (the next epoch's ``prev``).
        issued_at: when it was signed (unix seconds).
        expires_at: when it expires (unix seconds).
        payload: the roster's canonical bytes, exactly as signed.
    """

    path: str
    epoch: int
    hash: bytes
    issued_at: int
    expires_at: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class KeyRecordState:
    """The key record the directory last signed for a user (public data, kept between runs)."""

    user: str
    version: int
    payload: bytes
