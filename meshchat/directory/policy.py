"""The broker-neutral access policy: who may connect, subscribe, publish and receive where.

Sans-IO: it decides from a `DirectorySnapshot` (an immutable copy of what the directory holds) and
never touches a file or a socket, so every broker adapter (amqtt plugins, later EMQX's HTTP hooks
and VerneMQ's webhooks) gets the same answers. DESIGN.md section 3 gives the rules.
"""

from __future__ import annotations

import enum
import functools
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from meshchat.directory.credentials import hash_password, verify_password, verify_token
from meshchat.directory.model import Device, Group, Role, User, UserStatus
from meshchat.errors import AuthenticationError, TopicError
from meshchat.topics import (
    PREFIX,
    SITES_DEPARTMENT,
    GroupTopic,
    InboxTopic,
    KeyTopic,
    OwnTracksTopic,
    PresenceTopic,
    RosterTopic,
    ServiceTopic,
    TelemetryTopic,
    Topic,
    parse_topic,
    validate_filter,
)

__all__ = [
    "SERVICE_PREFIX",
    "AccessPolicy",
    "Action",
    "Decision",
    "DirectorySnapshot",
    "Principal",
    "PrincipalKind",
    "may_announce",
]

SERVICE_PREFIX: Final = "svc."
"""MQTT user names of internal services (``svc.archive``); a '.' never occurs in a user name."""

ARCHIVE_SERVICE: Final = "archive"
DIRECTORY_SERVICE: Final = "dir"
GEOFENCE_SERVICE: Final = "geofence"


class Action(enum.StrEnum):
    """What a client does with a topic."""

    SUBSCRIBE = "subscribe"
    PUBLISH = "publish"
    RECEIVE = "receive"


class PrincipalKind(enum.StrEnum):
    """Who a connection is."""

    USER = "user"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated connection.

    Attributes:
        kind: a user (people and device accounts) or an internal service.
        name: the user or service name.
        client_id: the MQTT client id the connection uses.
        device: the registered device the connection speaks for, if any (its own ``_d``,
            ``_p`` and ``_t`` topics).
    """

    kind: PrincipalKind
    name: str
    client_id: str
    device: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """An access decision and the reason, for logs and for users who are refused."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        """A decision is true when access is allowed."""
        return self.allowed


@dataclass(frozen=True, slots=True)
class DirectorySnapshot:
    """What the policy needs of the directory, copied at one moment."""

    org: str
    users: Mapping[str, User]
    devices: Mapping[str, Device]
    groups: Mapping[tuple[str, str], Group]
    password_hashes: Mapping[str, str | None] = field(repr=False)
    token_hashes: Mapping[str, str | None] = field(repr=False)
    service_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Token hashes of the internal services, by service name."""


def _allow(reason: str) -> Decision:
    return Decision(allowed=True, reason=reason)


def _deny(reason: str) -> Decision:
    return Decision(allowed=False, reason=reason)


class AccessPolicy:
    """Decisions over one directory snapshot; replace the object when the directory changes."""

    def __init__(self, snapshot: DirectorySnapshot) -> None:
        """Decide over `snapshot`."""
        self.snapshot = snapshot
        self._org_prefix = f"{PREFIX}/{snapshot.org}/"
        self._groups_of: dict[str, list[Group]] | None = None

    # -- authentication ------------------------------------------------------------------------

    def authenticate(self, username: str | None, password: str | None, client_id: str) -> Principal:
        """Decide whether a CONNECT may proceed, and as whom.

        Users log in with their password or with the token of one of their devices (then the
        client id must be that device's name); device accounts with their token and their own
        name as client id; services with ``svc.NAME`` and their token. A client id that names a
        registered device must belong to the authenticating user, and any other client id of a
        user must start with ``{user}.``, so nobody can take over another's session.

        Raises:
            AuthenticationError: for every refusal, with one message that does not say whether
                the user exists.
        """
        refused = AuthenticationError("wrong user name or password")
        if not username or password is None:
            raise refused
        if username.startswith(SERVICE_PREFIX):
            return self._authenticate_service(username, password, client_id, refused)
        user = self.snapshot.users.get(username)
        if user is None or not user.active:
            # Spend the same time as a real check, so timing does not reveal who exists.
            verify_password(_dummy_hash(), password)
            raise refused
        device = self.snapshot.devices.get(client_id)
        if device is not None:
            if device.owner != user.name or device.status is not UserStatus.ACTIVE:
                raise refused
            if verify_token(self.snapshot.token_hashes.get(device.name), password):
                return Principal(PrincipalKind.USER, user.name, client_id, device.name)
            if user.role is not Role.DEVICE and verify_password(
                self.snapshot.password_hashes.get(user.name), password
            ):
                return Principal(PrincipalKind.USER, user.name, client_id, device.name)
            raise refused
        if not client_id.startswith(f"{user.name}."):
            raise AuthenticationError(
                f"client id {client_id!r} is neither a device of {user.name} nor starts with "
                f"'{user.name}.'"
            )
        if user.role is not Role.DEVICE and verify_password(
            self.snapshot.password_hashes.get(user.name), password
        ):
            return Principal(PrincipalKind.USER, user.name, client_id)
        raise refused

    def _authenticate_service(
        self, username: str, password: str, client_id: str, refused: AuthenticationError
    ) -> Principal:
        name = username.removeprefix(SERVICE_PREFIX)
        stored = self.snapshot.service_tokens.get(name)
        if stored is None or not verify_token(stored, password):
            raise refused
        if not (client_id == username or client_id.startswith(f"{username}.")):
            raise AuthenticationError(
                f"service {name} must use a client id starting with {username}"
            )
        return Principal(PrincipalKind.SERVICE, name, client_id)

    def still_valid(self, principal: Principal) -> bool:
        """Whether a connected principal's account (and device) are still active."""
        if principal.kind is PrincipalKind.SERVICE:
            return principal.name in self.snapshot.service_tokens
        user = self.snapshot.users.get(principal.name)
        if user is None or not user.active:
            return False
        if principal.device is None:
            return True
        device = self.snapshot.devices.get(principal.device)
        return (
            device is not None and device.status is UserStatus.ACTIVE and device.owner == user.name
        )

    # -- authorization -------------------------------------------------------------------------

    def authorize(
        self, principal: Principal, action: Action, topic: str, *, now: float
    ) -> Decision:
        """Decide whether `principal` may do `action` on `topic` (a filter when subscribing)."""
        if not self.still_valid(principal):
            return _deny(f"{principal.name} is revoked")
        if action is Action.SUBSCRIBE and ("+" in topic or "#" in topic):
            return self._authorize_wildcard(principal, topic)
        try:
            parsed = parse_topic(topic)
        except TopicError as exc:
            return _deny(str(exc))
        if isinstance(parsed, OwnTracksTopic):
            return self._owntracks(principal, action, parsed)
        if parsed.org != self.snapshot.org:
            return _deny(f"topic {topic!r} belongs to another org")
        if principal.kind is PrincipalKind.SERVICE:
            return self._service(principal, action, parsed)
        return self._user(principal, action, parsed, now)

    def _authorize_wildcard(self, principal: Principal, topic_filter: str) -> Decision:
        try:
            validate_filter(topic_filter)
        except TopicError as exc:
            return _deny(str(exc))
        if principal.kind is PrincipalKind.SERVICE:
            if topic_filter.startswith((self._org_prefix, "owntracks/")):
                return _allow("services may subscribe across the org")
            return _deny(f"filter {topic_filter!r} reaches outside the org")
        public = self.allowed_filters()
        if topic_filter in public:
            return _allow("key records and presence are public within the org")
        return _deny(
            f"wildcard filter {topic_filter!r} is not allowed; subscribe to each group, or to "
            f"{' and '.join(public)}"
        )

    def _group(self, dept: str, name: str, now: float) -> Group | None:
        group = self.snapshot.groups.get((dept, name))
        if group is None or group.expired(now):
            return None
        return group

    def _user(self, principal: Principal, action: Action, topic: Topic, now: float) -> Decision:
        user = self.snapshot.users[principal.name]
        reading = action is not Action.PUBLISH
        match topic:
            case GroupTopic() | RosterTopic():
                return self._group_access(user, reading, topic, now)
            case InboxTopic() | PresenceTopic() | TelemetryTopic():
                return self._device_topic(principal, user, reading, topic, now)
            case KeyTopic(user=owner):
                if reading or owner == user.name:
                    return _allow("key records are public; users publish their own")
                return _deny(f"only {owner} publishes {owner}'s key record")
            case ServiceTopic(service=service) if service == GEOFENCE_SERVICE and not topic.reply:
                return self._geofence_topic(principal, reading, topic)
            case ServiceTopic():
                return self._service_request(user, reading, topic)
        return _deny("no rule allows this")

    @staticmethod
    def _geofence_topic(principal: Principal, reading: bool, topic: ServiceTopic) -> Decision:
        """The geofence's reader certificate is public; a key share is its device's alone.

        ``_s/geofence`` holds the worker's signed reader certificate (retained): anyone in the
        org may read it. ``_s/geofence/{device}`` holds a device's telemetry key share, sealed
        to the worker: only that device (by its own token) may publish it, and only the
        geofence service reads it.
        """
        if topic.requester is None:
            if reading:
                return _allow("the geofence's reader certificate is public within the org")
            return _deny("only the geofence service publishes its reader certificate")
        if reading:
            return _deny("only the geofence service reads telemetry key shares")
        return AccessPolicy._own_device(principal, topic.requester, "geofence key share")

    @staticmethod
    def _service_request(user: User, reading: bool, topic: ServiceTopic) -> Decision:
        """Users send requests under their own name and read only their own replies."""
        own = topic.requester is not None and hmac.compare_digest(topic.requester, user.name)
        if reading:
            if own and topic.reply:
                return _allow(f"{user.name} reads the replies to their own requests")
            return _deny("only the service itself reads its requests")
        if own and not topic.reply:
            return _allow("anyone in the org may send a service a request in their own name")
        if topic.requester is None:
            return _deny(f"send requests to {topic.topic}/{user.name}, in your own name")
        return _deny(f"{user.name} may send requests only in their own name")

    def _device_topic(
        self,
        principal: Principal,
        user: User,
        reading: bool,
        topic: InboxTopic | PresenceTopic | TelemetryTopic,
        now: float,
    ) -> Decision:
        what = {InboxTopic: "inbox", PresenceTopic: "presence", TelemetryTopic: "telemetry"}
        if not reading:
            if isinstance(topic, InboxTopic):
                return _allow("anyone in the org may write to a device's inbox")
            return self._own_device(principal, topic.device, what[type(topic)])
        if isinstance(topic, PresenceTopic):
            return _allow("presence is public within the org")
        if isinstance(topic, TelemetryTopic):
            return self._read_telemetry(principal, user, topic.device, now)
        return self._own_device(principal, topic.device, "inbox")

    def _group_access(
        self, user: User, reading: bool, topic: GroupTopic | RosterTopic, now: float
    ) -> Decision:
        group = self._group(topic.dept, topic.group, now)
        if group is None:
            return _deny(f"no group {topic.dept}/{topic.group}")
        if user.name not in group.members:
            return _deny(f"{user.name} is not a member of {group.path}")
        if isinstance(topic, RosterTopic):
            if reading:
                return _allow("members read the roster")
            return _deny("rosters are published by the directory")
        if reading or not group.announcement:
            return _allow(f"{user.name} is a member of {group.path}")
        if self._may_announce(user, group):
            return _allow(f"{user.role.value} may post in announcement group {group.path}")
        return _deny(
            f"{group.path} is an announcement group: {user.name} lacks group.post-announcement"
        )

    @staticmethod
    def _may_announce(user: User, group: Group) -> bool:
        return may_announce(user, group)

    @staticmethod
    def _own_device(principal: Principal, device: str, what: str) -> Decision:
        if principal.device is not None and hmac.compare_digest(principal.device, device):
            return _allow(f"a device uses its own {what}")
        return _deny(f"only the device {device} uses its {what}")

    def _read_telemetry(
        self, principal: Principal, user: User, device: str, now: float
    ) -> Decision:
        if principal.device == device or user.role is Role.ADMIN:
            return _allow("the device itself and admins read telemetry")
        found = self.snapshot.devices.get(device)
        owner = self.snapshot.users.get(found.owner) if found else None
        if owner is None:
            return _deny(f"no device {device}")
        if owner.dept == user.dept:
            return _allow(f"telemetry of {device} is readable within {owner.dept}")
        # A device shares its telemetry key with the people of its dispatch group, which can
        # be in another department: whoever shares a group with the device may read.
        for group in self._groups_with(owner.name):
            if user.name in group.members and not group.expired(now):
                return _allow(f"{user.name} shares {group.path} with {device}")
        return _deny(f"telemetry of {device} is readable within {owner.dept} and its groups only")

    def _groups_with(self, member: str) -> list[Group]:
        """The groups `member` is in (computed once per snapshot)."""
        if self._groups_of is None:
            groups_of: dict[str, list[Group]] = {}
            for group in self.snapshot.groups.values():
                for name in group.members:
                    groups_of.setdefault(name, []).append(group)
            self._groups_of = groups_of
        return self._groups_of.get(member, [])

    def _service(self, principal: Principal, action: Action, topic: Topic) -> Decision:
        name = principal.name
        if action is not Action.PUBLISH:
            if isinstance(topic, ServiceTopic) and topic.service != name:
                return _deny(f"only the service {topic.service} reads its requests")
            return _allow("services read across the org")
        match topic:
            case ServiceTopic(service=service) if service != name:
                return _deny(f"{name} publishes only on its own service topics, not {service}'s")
            case ServiceTopic() | InboxTopic():
                return _allow("services answer requests and write to inboxes")
            case RosterTopic(dept=dept):
                if name == DIRECTORY_SERVICE or (
                    name == GEOFENCE_SERVICE and dept == SITES_DEPARTMENT
                ):
                    return _allow(f"{name} publishes rosters of {dept}")
                return _deny(f"{name} may not publish rosters of {dept}")
            case KeyTopic() if name == DIRECTORY_SERVICE:
                return _allow("the directory publishes key records")
            case GroupTopic() if name in {GEOFENCE_SERVICE, DIRECTORY_SERVICE}:
                return _allow(f"{name} may post notices")
        return _deny(f"{name} may not publish here")

    def _owntracks(self, principal: Principal, action: Action, topic: OwnTracksTopic) -> Decision:
        if principal.kind is PrincipalKind.SERVICE:
            if action is not Action.PUBLISH:
                return _allow("services read OwnTracks fixes")
            if principal.name == GEOFENCE_SERVICE and topic.suffix == "cmd":
                return _allow("the geofence pushes site regions to phones (setWaypoints)")
            return _deny("services do not publish OwnTracks messages")
        if topic.user == principal.name:
            return _allow("users publish and read their own OwnTracks topics")
        return _deny(f"owntracks/{topic.user} belongs to {topic.user}")

    def allowed_filters(self) -> list[str]:
        """Filters every user may subscribe to with wildcards (shown in refusals and docs)."""
        return [f"{self._org_prefix}_k/+", f"{self._org_prefix}_p/+"]


def may_announce(user: User, group: Group) -> bool:
    """Whether `user` may post in `group` when it is an announcement group, and mention @all.

    The group's posting roles decide; a manager only in their own department's groups.
    """
    if user.role not in group.post_roles:
        return False
    return user.role is not Role.MANAGER or user.dept == group.dept


@functools.cache
def _dummy_hash() -> str:
    """A real argon2id hash of a random secret: checking against it costs what a real check does."""
    return hash_password(secrets.token_urlsafe(16))
