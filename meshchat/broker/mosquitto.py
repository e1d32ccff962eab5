"""Mosquitto 2.0 as an external broker: mosquitto.conf, password and ACL files from the directory.

Pure: `mosquitto_files` turns a `DirectorySnapshot` and the directory's Mosquitto-format hashes
(`Directory.broker_credentials`) into the text of the three files and does no IO; the CLI
(`meshchat deploy mosquitto`) writes them. Every per-user ACL line comes from asking the access
policy (DESIGN.md section 3) about the concrete topics of the directory, so Mosquitto and the
embedded broker answer alike; the few org-wide lines (key records and presence readable,
inboxes and service requests writable) are written as single wildcard lines.

What a Mosquitto password and ACL file cannot do, and the generated mosquitto.conf repeats:

- ``use_username_as_clientid``: every connection's client id is its MQTT user name, so nobody
  can take over another's session, and each account has one connection at a time (a second one
  takes over the first).
- Devices registered to a person are not supported: the password file holds one secret per user
  name, and a person's session (client id = user name) speaks for no device, so people have no
  ``_d``, ``_p`` or ``_t`` topics of their own. Device accounts (role ``device``, whose device
  has their name) log in as themselves with their token and have all three.
- Mosquitto grants every SUBSCRIBE and filters on delivery: a topic the user may not read
  delivers nothing. The embedded broker refuses the SUBSCRIBE instead, and also refuses wildcard
  filters other than the public key-record and presence filters, even when every topic they
  match is readable; Mosquitto grants such a filter and delivers exactly those topics.
- Offboarding: the embedded broker disconnects a revoked account within a second by itself.
  Mosquitto does so when the command runs again and Mosquitto gets SIGHUP: it reloads both
  files and disconnects accounts that are no longer in the password file.
- meshchat's services log in as ``svc.NAME`` with a secret `meshchat deploy mosquitto` keeps in
  the data directory (``services/NAME.secret``); their ACL lines are the policy's answers for
  the filters each service subscribes and publishes with (all groups, rosters, telemetry, its
  own requests, inboxes; the geofence: OwnTracks, site rosters, its certificate). Mosquitto
  gives one connection per user name, so the archive account serves one archiver: archivers
  that split the load through a shared subscription need the embedded broker or an account
  each.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from meshchat.broker.core import DEFAULT_MAX_OFFLINE_QUEUE
from meshchat.directory.model import Role, User, UserStatus
from meshchat.directory.policy import (
    ARCHIVE_SERVICE,
    DIRECTORY_SERVICE,
    GEOFENCE_SERVICE,
    SERVICE_PREFIX,
    AccessPolicy,
    Action,
    DirectorySnapshot,
    Principal,
    PrincipalKind,
)
from meshchat.envelope import MAX_ENVELOPE_LEN
from meshchat.errors import ConfigError
from meshchat.topics import (
    TELEMETRY_KINDS,
    GroupTopic,
    InboxTopic,
    KeyTopic,
    OwnTracksTopic,
    PresenceTopic,
    ServiceTopic,
    TelemetryTopic,
    matches,
)

__all__ = [
    "MOSQUITTO_MAX_PACKET_SIZE",
    "MOSQUITTO_SERVICES",
    "MosquittoFiles",
    "MosquittoOptions",
    "mosquitto_files",
]

MOSQUITTO_SERVICES: Final = (ARCHIVE_SERVICE, GEOFENCE_SERVICE)
"""meshchat's services that run alone against an external broker (`meshchat archive`,
`meshchat geofence`) and so get an account."""

MOSQUITTO_MAX_PACKET_SIZE: Final = MAX_ENVELOPE_LEN + 1024
"""Largest MQTT packet Mosquitto accepts: the largest envelope plus its topic and header.

``max_packet_size`` counts the whole packet (Mosquitto 2.0 recommends it over the payload-only
``message_size_limit``) and disconnects a client that sends a bigger one.
"""

_READ: Final = "read"
_WRITE: Final = "write"
_ANY: Final = "x"
"""A placeholder name: concrete topics built with it become filters with `_any_last`."""

_FORBIDDEN_CHARS: Final = frozenset(string.whitespace) | {"#"}


def _config_value(value: str, what: str) -> str:
    """A value for mosquitto.conf: one token, since the file splits lines at spaces."""
    if not value or any(char in _FORBIDDEN_CHARS for char in value):
        raise ConfigError(
            f"{what} {value!r} cannot be written to mosquitto.conf: it must be non-empty, with "
            "no spaces, line breaks or '#'"
        )
    return value


def _config_path(path: Path, what: str) -> str:
    if not path.is_absolute():
        raise ConfigError(
            f"{what} {path} must be an absolute path: Mosquitto would resolve it from the "
            "directory it is started in"
        )
    return _config_value(str(path), what)


@dataclass(frozen=True, slots=True)
class MosquittoOptions:
    """Where the generated files live and how Mosquitto listens.

    Attributes:
        out_dir: the directory of the three files (absolute: mosquitto.conf names the others
            by full path); Mosquitto's persistence database goes to ``persistence/`` inside it.
        host: the address to listen on.
        port: MQTT over TCP.
        tls_cert: PEM certificate chain; with `tls_key`, also MQTT over TLS on `tls_port`.
        tls_key: PEM private key of `tls_cert`.
        tls_port: MQTT over TLS.
        run_as: the system user Mosquitto switches to when started as root (Mosquitto's own
            default, ``mosquitto``, when None); it must be able to read the password and ACL
            files and write the persistence directory.
    """

    out_dir: Path
    host: str = "127.0.0.1"
    port: int = 1883
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_port: int = 8883
    run_as: str | None = None

    def __post_init__(self) -> None:
        """Reject options Mosquitto could not use, naming the option."""
        _config_path(self.out_dir, "output directory")
        _config_value(self.host, "host")
        for name in ("port", "tls_port"):
            value = getattr(self, name)
            if not 1 <= value <= 65535:
                raise ConfigError(f"{name.replace('_', '-')} {value} is outside 1..65535")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.tls_cert is not None and self.tls_key is not None:
            _config_path(self.tls_cert, "TLS certificate")
            _config_path(self.tls_key, "TLS key")
            if self.tls_port == self.port:
                raise ConfigError(f"tls-port {self.tls_port} is the same as port {self.port}")
        if self.run_as is not None:
            _config_value(self.run_as, "run-as user")

    @property
    def conf_path(self) -> Path:
        """mosquitto.conf: start Mosquitto with ``mosquitto -c`` and this path."""
        return self.out_dir / "mosquitto.conf"

    @property
    def password_path(self) -> Path:
        """The password file (secret: mode 0600)."""
        return self.out_dir / "passwd"

    @property
    def acl_path(self) -> Path:
        """The ACL file (who may read and write where: mode 0600)."""
        return self.out_dir / "acl"

    @property
    def persistence_path(self) -> Path:
        """Mosquitto's persistence directory (sessions and queued messages)."""
        return self.out_dir / "persistence"


@dataclass(frozen=True, slots=True)
class MosquittoFiles:
    """The text of the three files, and who they let in.

    Attributes:
        conf: mosquitto.conf.
        passwords: the password file, ``user:$7$...`` lines.
        acl: the ACL file, a ``user`` section per account.
        accounts: the MQTT user names that may log in: the directory's, sorted, then the
            services' (``svc.NAME``).
        unsupported_devices: active devices registered to a person, which cannot log in to
            Mosquitto (see the module docstring), sorted.
    """

    conf: str
    passwords: str = field(repr=False)
    acl: str
    accounts: tuple[str, ...]
    unsupported_devices: tuple[str, ...]


def _is_device_account(snapshot: DirectorySnapshot, user: User) -> bool:
    device = snapshot.devices.get(user.name)
    return (
        user.role is Role.DEVICE
        and device is not None
        and device.owner == user.name
        and device.status is UserStatus.ACTIVE
    )


def _check_hash(name: str, secret: str) -> None:
    if not secret.startswith("$7$") or ":" in secret or any(c.isspace() for c in secret):
        raise ConfigError(f"the broker hash of {name!r} is not a Mosquitto $7$ hash")


def _accounts(snapshot: DirectorySnapshot, credentials: Mapping[str, str]) -> dict[str, str]:
    """Hashes of the users who may log in: active, and device accounts only with their device."""
    accounts = {}
    for name in sorted(credentials):
        user = snapshot.users.get(name)
        if user is None or not user.active:
            continue
        if user.role is Role.DEVICE and not _is_device_account(snapshot, user):
            continue
        secret = credentials[name]
        _check_hash(name, secret)
        accounts[name] = secret
    return accounts


def _any_last(topic: str, levels: int = 1) -> str:
    """`topic` with its last `levels` levels replaced by ``+``: every name at those levels."""
    kept = topic.split("/")[:-levels]
    return "/".join([*kept, *["+"] * levels])


def _any_at(topic: str, level: int) -> str:
    """`topic` with level number `level` (from 0) replaced by ``+``."""
    levels = topic.split("/")
    levels[level] = "+"
    return "/".join(levels)


class _Rules:
    """One account's ACL lines: topic (or filter) to the set of accesses it grants."""

    def __init__(self) -> None:
        self.lines: dict[str, set[str]] = {}
        self._wide: list[tuple[str, str]] = []

    def grant(self, topic: str, access: str, *, wide: bool = False) -> None:
        """Add a line; `wide` ones (org-wide filters) make narrower lines redundant."""
        self.lines.setdefault(topic, set()).add(access)
        if wide:
            self._wide.append((topic, access))

    def covers(self, topic: str, access: str) -> bool:
        """Whether a wide line already grants `access` on `topic`."""
        return any(have == access and matches(line, topic) for line, have in self._wide)

    def render(self) -> list[str]:
        """``topic ACCESS TOPIC`` lines, sorted by topic."""
        rendered = []
        for topic in sorted(self.lines):
            granted = self.lines[topic]
            access = "readwrite" if granted == {_READ, _WRITE} else next(iter(granted))
            rendered.append(f"topic {access} {topic}")
        return rendered


class _AclBuilder:
    """Asks the access policy about every topic an account could use, as Mosquitto will."""

    def __init__(self, snapshot: DirectorySnapshot, now: float) -> None:
        self.snapshot = snapshot
        self.policy = AccessPolicy(snapshot)
        self.now = now
        self.org = snapshot.org
        self.devices = sorted(
            device.name
            for device in snapshot.devices.values()
            if device.status is UserStatus.ACTIVE
        )
        self._telemetry_reads: dict[tuple[Role, str], tuple[list[str], set[str]]] = {}

    def _allowed(self, principal: Principal, action: Action, topic: str) -> bool:
        return self.policy.authorize(principal, action, topic, now=self.now).allowed

    def _ask(self, rules: _Rules, principal: Principal, topic: str, *, read: bool = True) -> None:
        """Add what the policy allows on `topic` that no org-wide line grants yet."""
        actions = [(Action.RECEIVE, _READ)] if read else []
        for action, access in [*actions, (Action.PUBLISH, _WRITE)]:
            if self._allowed(principal, action, topic) and not rules.covers(topic, access):
                rules.grant(topic, access)

    def _public(self, rules: _Rules, principal: Principal) -> None:
        """The org-wide lines, each written only if the policy grants its example topic."""
        org = self.org
        reads = [(f, f.replace("+", _ANY)) for f in self.policy.allowed_filters()]
        writes = [(_any_last(t), t) for t in (InboxTopic(org, _ANY).topic,)]
        # Requests in the principal's own name to each service, and the replies to them (for
        # the geofence, a device's key share), and the geofence's public reader certificate.
        for service in (ARCHIVE_SERVICE, DIRECTORY_SERVICE, GEOFENCE_SERVICE):
            request = ServiceTopic(org, service, principal.name).topic
            writes.append((request, request))
            reply = ServiceTopic(org, service, principal.name, reply=True).topic
            reads.append((reply, reply))
        certificate = ServiceTopic(org, GEOFENCE_SERVICE).topic
        reads.append((certificate, certificate))
        for line, example in reads:
            if self._allowed(principal, Action.RECEIVE, example):
                rules.grant(line, _READ, wide=True)
        for line, example in writes:
            if self._allowed(principal, Action.PUBLISH, example):
                rules.grant(line, _WRITE, wide=True)
        owntracks = (
            (OwnTracksTopic(principal.name, _ANY).topic, 1),
            (OwnTracksTopic(principal.name, _ANY, _ANY).topic, 2),
        )
        for example, levels in owntracks:
            for action, access in ((Action.RECEIVE, _READ), (Action.PUBLISH, _WRITE)):
                if self._allowed(principal, action, example):
                    rules.grant(_any_last(example, levels), access)

    def _telemetry_topics(self, device: str) -> list[str]:
        return [
            TelemetryTopic(self.org, device, "status" if kind == "status" else "gps").topic
            for kind in sorted(TELEMETRY_KINDS)
        ]

    def _readable_telemetry(self, user: User) -> list[str]:
        """Lines for the telemetry `user` reads as a reader, not as the device itself.

        The policy decides by the reader's role and department, and lets a reader in another
        department read the devices it shares a group with (a dispatch group). The first part
        is asked once per (role, department), with the first account of it, except for the
        devices that account shares a group with: asking per account and device would take
        minutes in a large org. Those devices, and the ones each account shares a group with,
        are asked per account. One line per device covers every kind when all are readable.
        """
        key = (user.role, user.dept)
        cached = self._telemetry_reads.get(key)
        if cached is None:
            apart = self._devices_sharing(user.name)
            cached = (self._telemetry_lines(user, lambda d: d not in apart), apart)
            self._telemetry_reads[key] = cached
        lines, apart = cached
        personal = apart | self._devices_sharing(user.name)
        extra = self._telemetry_lines(user, personal.__contains__)
        return lines + [line for line in extra if line not in lines]

    def _devices_sharing(self, name: str) -> set[str]:
        """Active devices whose account is in a group with `name`."""
        owners = {
            member
            for group in self.snapshot.groups.values()
            if name in group.members and not group.expired(self.now)
            for member in group.members
        }
        return {
            device.name
            for device in self.snapshot.devices.values()
            if device.status is UserStatus.ACTIVE and device.owner in owners
        }

    def _telemetry_lines(self, user: User, which: Callable[[str], bool]) -> list[str]:
        """Telemetry lines `user` may read, of the devices `which` picks."""
        reader = Principal(PrincipalKind.USER, user.name, user.name)
        lines: list[str] = []
        for device in self.devices:
            if not which(device):
                continue
            topics = self._telemetry_topics(device)
            readable = [t for t in topics if self._allowed(reader, Action.RECEIVE, t)]
            lines += [_any_last(topics[0])] if readable == topics else readable
        return lines

    def rules(self, user: User) -> _Rules:
        """The ACL lines of one account."""
        device = user.name if _is_device_account(self.snapshot, user) else None
        # On Mosquitto the client id is always the user name (use_username_as_clientid).
        principal = Principal(PrincipalKind.USER, user.name, user.name, device)
        rules = _Rules()
        self._public(rules, principal)
        self._ask(rules, principal, KeyTopic(self.org, user.name).topic)
        for (dept, name), group in sorted(self.snapshot.groups.items(), key=lambda g: g[0]):
            if user.name in group.members:  # the policy refuses everyone else
                group_topic = GroupTopic(self.org, dept, name)
                self._ask(rules, principal, group_topic.topic)
                self._ask(rules, principal, group_topic.roster.topic)
        for line in self._readable_telemetry(user):
            rules.grant(line, _READ)
        if device is not None:
            # Only a device's own inbox, presence and telemetry differ from the org-wide lines.
            self._ask(rules, principal, InboxTopic(self.org, device).topic)
            self._ask(rules, principal, PresenceTopic(self.org, device).topic)
            own = self._telemetry_topics(device)
            # Writes stay per kind, so a device cannot publish a kind the policy does not know.
            reads_all = _any_last(own[0]) in rules.lines
            for topic in own:
                self._ask(rules, principal, topic, read=not reads_all)
        return rules

    def service_rules(self, name: str) -> _Rules:
        """The ACL lines of the service account ``svc.NAME``.

        Services read across the org and write where their work lands; the policy is asked
        about one example topic per line for the org-wide lines (its service rules do not
        depend on the names there) and about each group for the group and roster lines, so
        that no line grants more than the policy would.
        """
        org = self.org
        principal = Principal(PrincipalKind.SERVICE, name, f"{SERVICE_PREFIX}{name}")
        rules = _Rules()
        for (dept, group_name), _group in sorted(self.snapshot.groups.items(), key=lambda g: g[0]):
            group = GroupTopic(org, dept, group_name)
            self._ask(rules, principal, group.topic)
            self._ask(rules, principal, group.roster.topic)
        own = ServiceTopic(org, name).topic
        requests = ServiceTopic(org, name, _ANY).topic
        replies = ServiceTopic(org, name, _ANY, reply=True).topic
        wide: list[tuple[str, str, str]] = [
            (_any_last(InboxTopic(org, _ANY).topic), InboxTopic(org, _ANY).topic, "rw"),
            (_any_last(KeyTopic(org, _ANY).topic), KeyTopic(org, _ANY).topic, "rw"),
            (_any_last(PresenceTopic(org, _ANY).topic), PresenceTopic(org, _ANY).topic, "rw"),
            (_any_last(self._telemetry_topics(_ANY)[0], 2), self._telemetry_topics(_ANY)[0], "rw"),
            (own, own, "rw"),
            (_any_last(requests), requests, "rw"),
            (_any_at(replies, 4), replies, "rw"),
            (_any_last(OwnTracksTopic(_ANY, _ANY).topic, 2), OwnTracksTopic(_ANY, _ANY).topic, "r"),
        ]
        event = OwnTracksTopic(_ANY, _ANY, _ANY).topic
        wide.append((_any_last(event, 3), event, "r"))
        command = OwnTracksTopic(_ANY, _ANY, "cmd").topic
        wide.append((_any_at(_any_at(command, 1), 2), command, "w"))
        for line, example, accesses in wide:
            for action, access, letter in (
                (Action.RECEIVE, _READ, "r"),
                (Action.PUBLISH, _WRITE, "w"),
            ):
                if letter in accesses and self._allowed(principal, action, example):
                    rules.grant(line, access)
        return rules


def _header(org: str, what: str) -> list[str]:
    return [
        f"# {what} for the meshchat org {org}, generated by `meshchat deploy mosquitto`.",
        "# Do not edit: after directory changes, run the command again and send Mosquitto SIGHUP.",
    ]


def _acl(
    snapshot: DirectorySnapshot, accounts: Iterable[str], services: Iterable[str], now: float
) -> str:
    services = list(services)
    # The policy knows a service by its token; on Mosquitto the password file checks the
    # secret, so the policy only needs to know that these services exist.
    known = dict(snapshot.service_tokens) | dict.fromkeys(services, "")
    builder = _AclBuilder(dataclasses.replace(snapshot, service_tokens=known), now)
    lines = _header(snapshot.org, "Mosquitto ACL file")
    for name in accounts:
        lines += ["", f"user {name}", *builder.rules(snapshot.users[name]).render()]
    for service in services:
        account = f"{SERVICE_PREFIX}{service}"
        lines += ["", f"user {account}", *builder.service_rules(service).render()]
    return "\n".join(lines) + "\n"


_LIMITS: Final = """\
#
# Differences from the embedded broker of `meshchat up`:
# - Every connection's client id is its user name (use_username_as_clientid), so nobody can
#   take over another's session, and each account has one connection at a time.
# - Devices registered to a person are not supported: the password file holds one secret per
#   user name. Device accounts (role device) log in as their device name with their token.
# - Mosquitto grants every SUBSCRIBE and filters on delivery: a topic the user may not read
#   delivers nothing. Wildcard filters deliver the topics the user may read one by one.
# - Offboarding takes effect when the command runs again and Mosquitto gets SIGHUP, which
#   disconnects accounts no longer in the password file.
# - meshchat's services log in as svc.NAME; one connection per account, so one archiver per
#   archive account (no shared-subscription scale-out on this file)."""


def _conf(options: MosquittoOptions, org: str) -> str:
    lines = [
        *_header(org, "Mosquitto 2.0 configuration"),
        "# Start: mosquitto -c " + str(options.conf_path),
        _LIMITS,
        "",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {_config_path(options.password_path, 'password file')}",
        f"acl_file {_config_path(options.acl_path, 'ACL file')}",
        "persistence true",
        # Mosquitto appends the file name to this path, so it must end in a slash.
        f"persistence_location {_config_path(options.persistence_path, 'persistence path')}/",
        f"max_packet_size {MOSQUITTO_MAX_PACKET_SIZE}",
        # Mosquitto keeps 1000 QoS 1 messages per offline session by default and drops the
        # rest: a field device back from a shift would miss most of a busy group's traffic.
        # Keep as many as the embedded broker does.
        f"max_queued_messages {DEFAULT_MAX_OFFLINE_QUEUE}",
    ]
    if options.run_as is not None:
        lines.append(f"user {options.run_as}")
    lines += [
        "",
        f"listener {options.port} {options.host}",
        "use_username_as_clientid true",
    ]
    if options.tls_cert is not None and options.tls_key is not None:
        lines += [
            "",
            f"listener {options.tls_port} {options.host}",
            f"certfile {options.tls_cert}",
            f"keyfile {options.tls_key}",
            "tls_version tlsv1.2",
            "use_username_as_clientid true",
        ]
    return "\n".join(lines) + "\n"


def mosquitto_files(
    snapshot: DirectorySnapshot,
    credentials: Mapping[str, str],
    options: MosquittoOptions,
    *,
    now: float,
    services: Mapping[str, str] | None = None,
) -> MosquittoFiles:
    """The three files that make Mosquitto enforce the directory like the embedded broker.

    The output depends only on the arguments and is sorted throughout, so running it twice on
    an unchanged directory gives identical files.

    Args:
        snapshot: the directory.
        credentials: Mosquitto ``$7$`` hashes by MQTT user name
            (`Directory.broker_credentials`); revoked users and devices in it are left out.
        options: where the files live and how Mosquitto listens.
        now: the time (Unix seconds) at which expired temporary groups are left out.
        services: Mosquitto ``$7$`` hashes of meshchat's service accounts by service name
            (``archive``, ``geofence``); each logs in as ``svc.NAME``.

    Raises:
        ConfigError: a hash is not in Mosquitto's format, or a service name is unknown.
    """
    accounts = _accounts(snapshot, credentials)
    service_hashes = dict(sorted((services or {}).items()))
    for name, secret in service_hashes.items():
        if name not in MOSQUITTO_SERVICES:
            raise ConfigError(
                f"no meshchat service {name!r} (services: {', '.join(MOSQUITTO_SERVICES)})"
            )
        _check_hash(f"{SERVICE_PREFIX}{name}", secret)
    unsupported = tuple(
        sorted(
            device.name
            for device in snapshot.devices.values()
            if device.status is UserStatus.ACTIVE
            and (owner := snapshot.users.get(device.owner)) is not None
            and owner.active
            and not (device.name == owner.name and _is_device_account(snapshot, owner))
        )
    )
    passwords = "".join(f"{name}:{secret}\n" for name, secret in accounts.items())
    passwords += "".join(
        f"{SERVICE_PREFIX}{name}:{secret}\n" for name, secret in service_hashes.items()
    )
    return MosquittoFiles(
        conf=_conf(options, snapshot.org),
        passwords=passwords,
        acl=_acl(snapshot, accounts, service_hashes, now),
        accounts=(*accounts, *(f"{SERVICE_PREFIX}{name}" for name in service_hashes)),
        unsupported_devices=unsupported,
    )
