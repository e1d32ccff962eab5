"""The meshchat topic tree (DESIGN.md section 3): one value class per kind of topic, and the parser.

Every class validates its names on construction and renders its topic string with `.topic`;
`parse_topic` turns a topic string back into the matching class. Nothing else in meshchat builds
or takes apart topic strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final, Literal, TypeAlias

from meshchat.errors import TopicError
from meshchat.topics.matching import validate_topic
from meshchat.topics.names import validate_name

__all__ = [
    "OWNTRACKS_PREFIX",
    "PREFIX",
    "SITES_DEPARTMENT",
    "TELEMETRY_KINDS",
    "GroupTopic",
    "InboxTopic",
    "KeyTopic",
    "OwnTracksTopic",
    "PresenceTopic",
    "RosterTopic",
    "ServiceTopic",
    "TelemetryKind",
    "TelemetryTopic",
    "Topic",
    "parse_topic",
]

PREFIX: Final = "mc"
OWNTRACKS_PREFIX: Final = "owntracks"
SITES_DEPARTMENT: Final = "sites"
ROSTER_LEVEL: Final = "_r"
INBOX_LEVEL: Final = "_d"
KEY_LEVEL: Final = "_k"
PRESENCE_LEVEL: Final = "_p"
TELEMETRY_LEVEL: Final = "_t"
SERVICE_LEVEL: Final = "_s"
REPLY_LEVEL: Final = "reply"

TelemetryKind: TypeAlias = Literal["status", "gps"]
TELEMETRY_KINDS: Final[frozenset[str]] = frozenset({"status", "gps"})


@dataclass(frozen=True, slots=True)
class GroupTopic:
    """``mc/{org}/{dept}/{group}``: a group's E2EE messages; a site channel under ``sites``."""

    org: str
    dept: str
    group: str
    retained: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Validate every name."""
        validate_name(self.org, "org name")
        validate_name(self.dept, "department name")
        validate_name(self.group, "site name" if self.is_site else "group name")

    @classmethod
    def site(cls, org: str, site: str) -> GroupTopic:
        """The channel of a site: ``mc/{org}/sites/{site}``."""
        return cls(org, SITES_DEPARTMENT, site)

    @property
    def is_site(self) -> bool:
        """Whether this is a site channel (the pseudo-department ``sites``)."""
        return self.dept == SITES_DEPARTMENT

    @property
    def path(self) -> str:
        """``dept/group``, the way users and the CLI name a group."""
        return f"{self.dept}/{self.group}"

    @property
    def topic(self) -> str:
        """The topic string."""
        return f"{PREFIX}/{self.org}/{self.dept}/{self.group}"

    @property
    def roster(self) -> RosterTopic:
        """The retained roster topic of this group."""
        return RosterTopic(self.org, self.dept, self.group)


@dataclass(frozen=True, slots=True)
class RosterTopic:
    """``mc/{org}/{dept}/{group}/_r``: the signed roster of a group (retained)."""

    org: str
    dept: str
    group: str
    retained: ClassVar[bool] = True

    def __post_init__(self) -> None:
        """Validate every name."""
        validate_name(self.org, "org name")
        validate_name(self.dept, "department name")
        validate_name(self.group, "group name")

    @property
    def group_topic(self) -> GroupTopic:
        """The group this roster belongs to."""
        return GroupTopic(self.org, self.dept, self.group)

    @property
    def topic(self) -> str:
        """The topic string."""
        return f"{PREFIX}/{self.org}/{self.dept}/{self.group}/{ROSTER_LEVEL}"


@dataclass(frozen=True, slots=True)
class InboxTopic:
    """``mc/{org}/_d/{device}``: a device's inbox (key distributions, direct messages, replies)."""

    org: str
    device: str
    retained: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Validate every name."""
        validate_name(self.org, "org name")
        validate_name(self.device, "device name")

    @property
    def topic(self) -> str:
        """The topic string."""
        return f"{PREFIX}/{self.org}/{INBOX_LEVEL}/{self.device}"


@dataclass(frozen=True, slots=True)
class KeyTopic:
    """``mc/{org}/_k/{user}``: a user's signed public key record (retained)."""

    org: str
    user: str
    retained: ClassVar[bool] = True

    def __post_init__(self) -> None:
        """Validate every name."""
        validate_name(self.org, "org name")
        validate_name(self.user, "user name")

    @property
    def topic(self) -> str:
        """The topic string."""
        return f"{PREFIX}/{self.org}/{KEY_LEVEL}/{self.user}"


@dataclass(frozen=True, slots=True)
class PresenceTopic:
    """``mc/{org}/_p/{device}``: a device's presence, set by its last will (retained)."""

    org: str
    device: str
    retained: ClassVar[bool] = True

    def __post_init__(self) -> None:
        """Validate every name."""
        validate_name(self.org, "org name")
        validate_name(self.device, "device name")

    @property
    def topic(self) -> str:
        """The topic string."""
        return f"{PREFIX}/{self.org}/{PRESENCE_LEVEL}/{self.device}"


@dataclass(frozen=True, slots=True)
class TelemetryTopic:
    """``mc/{org}/_t/{device}/{kind}``: device telemetry; ``status`` is retained, ``gps`` is not."""

    org: str
    device: str
    kind: TelemetryKind

    def __post_init__(self) -> None:
        """Validate every name and the kind."""
        validate_name(self.org, "org name")
        validate_name(self.device, "device name")
        if self.kind not in TELEMETRY_KINDS:
            raise TopicError(
                f"telemetry kind {self.kind!r} is unknown; expected one of "
                f"{', '.join(sorted(TELEMETRY_KINDS))}",
                part="telemetry kind",
                value=str(self.kind),
            )

    @property
    def retained(self) -> bool:
        """Status is retained so a new subscriber sees the last one; fixes are not."""
        return self.kind == "status"

    @property
    def topic(self) -> str:
        """The topic string."""
        return f"{PREFIX}/{self.org}/{TELEMETRY_LEVEL}/{self.device}/{self.kind}"


@dataclass(frozen=True, slots=True)
class ServiceTopic:
    """Requests to a service (``archive``, ``dir``, ...) and their replies.

    - ``mc/{org}/_s/{service}``: the service's own level (what it subscribes below);
    - ``mc/{org}/_s/{service}/{requester}``: requests, where the broker's ACL lets each user
      publish under their own name only, so the service knows who asks;
    - ``mc/{org}/_s/{service}/{requester}/reply``: replies to a requester who has no device
      inbox yet (at login); only that user may read them.
    """

    org: str
    service: str
    requester: str | None = None
    reply: bool = False
    retained: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Validate every name."""
        validate_name(self.org, "org name")
        validate_name(self.service, "service name")
        if self.requester is not None:
            validate_name(self.requester, "requester name")
        elif self.reply:
            msg = "a reply topic needs the requester's name"
            raise TopicError(msg, part="requester", value="")

    @property
    def topic(self) -> str:
        """The topic string."""
        base = f"{PREFIX}/{self.org}/{SERVICE_LEVEL}/{self.service}"
        if self.requester is None:
            return base
        base = f"{base}/{self.requester}"
        return f"{base}/{REPLY_LEVEL}" if self.reply else base


@dataclass(frozen=True, slots=True)
class OwnTracksTopic:
    """``owntracks/{user}/{device}[/{suffix}]``: an OwnTracks phone, accepted as the app sends it.

    The suffix is ``event`` for transitions, and ``waypoint``, ``cmd``, ``info``, ... for the
    app's other message types; ``None`` for location fixes.
    """

    user: str
    device: str
    suffix: str | None = None

    def __post_init__(self) -> None:
        """Validate every name."""
        validate_name(self.user, "OwnTracks user name")
        validate_name(self.device, "OwnTracks device name")
        if self.suffix is not None:
            validate_name(self.suffix, "OwnTracks topic suffix")

    @property
    def topic(self) -> str:
        """The topic string."""
        base = f"{OWNTRACKS_PREFIX}/{self.user}/{self.device}"
        return base if self.suffix is None else f"{base}/{self.suffix}"


Topic: TypeAlias = (
    GroupTopic
    | RosterTopic
    | InboxTopic
    | KeyTopic
    | PresenceTopic
    | TelemetryTopic
    | ServiceTopic
    | OwnTracksTopic
)

_SINGLE_NAME: Final[dict[str, type[InboxTopic | PresenceTopic | KeyTopic | ServiceTopic]]] = {
    INBOX_LEVEL: InboxTopic,
    PRESENCE_LEVEL: PresenceTopic,
    KEY_LEVEL: KeyTopic,
    SERVICE_LEVEL: ServiceTopic,
}
_NAMESPACE_LEVELS: Final = frozenset({*_SINGLE_NAME, TELEMETRY_LEVEL})


def _bad(topic: str, why: str) -> TopicError:
    return TopicError(f"topic {topic!r} {why}", part="topic", value=topic)


def _parse_service(topic: str, org: str, rest: list[str]) -> ServiceTopic:
    match rest:
        case [service, requester]:
            return ServiceTopic(org, service, requester)
        case [service, requester, level] if level == REPLY_LEVEL:
            return ServiceTopic(org, service, requester, reply=True)
    raise _bad(topic, "is not _s/{service}[/{requester}[/reply]]")


def _parse_mc(topic: str, levels: list[str]) -> Topic:
    if len(levels) < 4:
        raise _bad(topic, f"has {len(levels)} levels; meshchat topics have at least 4")
    org, third = levels[1], levels[2]
    rest = levels[3:]
    if not third.startswith("_"):
        match rest:
            case [group]:
                return GroupTopic(org, third, group)
            case [group, level] if level == ROSTER_LEVEL:
                return RosterTopic(org, third, group)
            case [_, level] if level.startswith("_"):
                raise _bad(topic, f"has the unknown group namespace {level!r}")
        raise _bad(topic, f"has {len(levels)} levels; a group topic has 4 and a roster 5")
    if third not in _NAMESPACE_LEVELS:
        raise _bad(topic, f"has the unknown system namespace {third!r}")
    if third == TELEMETRY_LEVEL:
        return _parse_telemetry(topic, org, rest)
    if len(rest) == 1:
        return _SINGLE_NAME[third](org, rest[0])
    if third == SERVICE_LEVEL:
        return _parse_service(topic, org, rest)
    raise _bad(topic, f"has {len(levels)} levels; the namespace {third!r} takes 4")


def _parse_telemetry(topic: str, org: str, rest: list[str]) -> TelemetryTopic:
    if len(rest) == 2:
        device, kind = rest
        if kind not in TELEMETRY_KINDS:
            raise _bad(topic, f"has the unknown telemetry kind {kind!r}")
        return TelemetryTopic(org, device, "status" if kind == "status" else "gps")
    raise _bad(topic, f"has {len(rest) + 3} levels; the namespace '_t' takes 5")


def parse_topic(topic: str) -> Topic:
    """Turn a topic string into the value class of its kind.

    Raises:
        TopicError: the string is not a valid MQTT topic, is outside meshchat's tree, or holds
            an invalid name; the message names the bad part.
    """
    validate_topic(topic)
    levels = topic.split("/")
    if levels[0] == PREFIX:
        return _parse_mc(topic, levels)
    if levels[0] == OWNTRACKS_PREFIX:
        match levels[1:]:
            case [user, device]:
                return OwnTracksTopic(user, device)
            case [user, device, suffix]:
                return OwnTracksTopic(user, device, suffix)
        raise _bad(topic, "is not owntracks/{user}/{device}[/{suffix}]")
    raise _bad(topic, f"is outside meshchat's tree (first level {levels[0]!r})")
