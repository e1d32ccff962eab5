"""Topic strings of meshchat: the only place that builds, parses, validates and matches them."""

from meshchat.topics.matching import MAX_TOPIC_BYTES, matches, validate_filter, validate_topic
from meshchat.topics.names import MAX_NAME_LEN, NAME_CHARS, RESERVED_DEPARTMENTS, validate_name
from meshchat.topics.tree import (
    OWNTRACKS_PREFIX,
    PREFIX,
    SITES_DEPARTMENT,
    TELEMETRY_KINDS,
    GroupTopic,
    InboxTopic,
    KeyTopic,
    OwnTracksTopic,
    PresenceTopic,
    RosterTopic,
    ServiceTopic,
    TelemetryKind,
    TelemetryTopic,
    Topic,
    parse_topic,
)

__all__ = [
    "MAX_NAME_LEN",
    "MAX_TOPIC_BYTES",
    "NAME_CHARS",
    "OWNTRACKS_PREFIX",
    "PREFIX",
    "RESERVED_DEPARTMENTS",
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
    "matches",
    "parse_topic",
    "validate_filter",
    "validate_name",
    "validate_topic",
]
