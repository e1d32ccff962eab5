"""`meshchat deploy mosquitto`: a real Mosquitto enforces the directory like the embedded broker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import aiomqtt
import pytest
from typer.testing import CliRunner

from cli import app
from meshchat.archive import Archiver, ArchiveStore
from meshchat.broker import (
    MOSQUITTO_MAX_PACKET_SIZE,
    MOSQUITTO_SERVICES,
    BrokerSettings,
    MosquittoFiles,
    MosquittoOptions,
    mosquitto_files,
)
from meshchat.broker.core import DEFAULT_MAX_OFFLINE_QUEUE
from meshchat.client import Transport
from meshchat.datadir import DataDir
from meshchat.directory import (
    AccessPolicy,
    Action,
    Directory,
    DirectorySnapshot,
    GroupKind,
    Principal,
    PrincipalKind,
    Role,
)
from meshchat.directory.credentials import mosquitto_hash
from meshchat.directory.policy import SERVICE_PREFIX
from meshchat.envelope import GroupMessage, encode
from meshchat.errors import ConfigError
from meshchat.server import SiteServer
from meshchat.topics import matches
from tests.brokers import MOSQUITTO_MISSING, find_mosquitto, free_port, wait_for_port
from tests.cli.running import MESHCHAT, LineReader, read_line_matching

ORG = "acme"
PASSWORDS = {
    "root": "root password",
    "bob": "bob password",
    "carol": "carol password",
    "erin": "erin password",
    "dave": "dave password",
    "mallory": "mallory password",
}
DEVICE_ACCOUNTS = ("truck-2", "van-7")
MARKERS = f"mc/{ORG}/_k/+"
"""Every account may read every key record: markers travel there."""
DEADLINE = 5.0

G = f"mc/{ORG}/ops/line1"
NEWS = f"mc/{ORG}/ops/news"
FINANCE = f"mc/{ORG}/finance/all"
VAN_INBOX = f"mc/{ORG}/_d/van-7"


@dataclass(frozen=True, slots=True)
class World:
    """One directory for every test of this module."""

    data: Path
    tokens: Mapping[str, str]

    def secret(self, name: str) -> str:
        return self.tokens[name] if name in self.tokens else PASSWORDS[name]

    def snapshot(self) -> tuple[DirectorySnapshot, dict[str, str]]:
        with Directory.in_data_dir(self.data) as directory:
            return directory.snapshot(), directory.broker_credentials()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    data = tmp_path_factory.mktemp("world") / "data"
    DataDir(data).ensure()
    with Directory.in_data_dir(data) as directory:
        directory.init_org(ORG, admin="root", password=PASSWORDS["root"])
        add = directory.add_user
        add("root", "bob", dept="ops", role=Role.MANAGER, password=PASSWORDS["bob"])
        for name in ("carol", "erin", "mallory"):
            add("root", name, dept="ops", password=PASSWORDS[name])
        add("root", "dave", dept="finance", password=PASSWORDS["dave"])
        add("root", "frank", dept="ops")  # no password: cannot log in anywhere
        add("root", "van-7", dept="ops", role=Role.DEVICE)
        add("root", "truck-2", dept="finance", role=Role.DEVICE)
        tokens = {
            "van-7": directory.add_device("root", "van-7", owner="van-7", kind="vehicle"),
            "truck-2": directory.add_device("root", "truck-2", owner="truck-2", kind="vehicle"),
            "carol-phone": directory.add_device("carol", "carol-phone", owner="carol"),
        }
        directory.create_group("bob", "ops/line1")
        directory.add_members("bob", "ops/line1", ["carol", "mallory"])
        directory.create_group("bob", "ops/news", announcement=True)
        directory.add_members("bob", "ops/news", ["carol"])
        directory.create_group("root", "finance/all", announcement=True)
        directory.add_members("root", "finance/all", ["bob", "dave"])
        directory.create_group(
            "bob", "ops/tmp", kind=GroupKind.TEMPORARY, expires_at=time.time() - 60
        )
        directory.add_members("bob", "ops/tmp", ["carol"])
        directory.create_group("root", "finance/trucks")
        directory.add_members("root", "finance/trucks", ["truck-2", "erin"])
        directory.remove_user("root", "mallory")
    return World(data, tokens)


def _files(world: World, out: Path | None = None) -> MosquittoFiles:
    snapshot, credentials = world.snapshot()
    options = MosquittoOptions(out or Path("/srv/mosquitto"))
    return mosquitto_files(snapshot, credentials, options, now=time.time())


def _acl_sections(acl: str) -> dict[str, list[tuple[str, str]]]:
    """The ACL file as Mosquitto reads it: per user, (access, topic filter) lines."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in acl.splitlines():
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword == "user":
            current = sections.setdefault(rest, [])
        else:
            assert keyword == "topic", line
            assert current is not None, "topic lines before any user line apply to anonymous"
            access, topic_filter = rest.split(" ")
            current.append((access, topic_filter))
    return sections


def _mosquitto_allows(lines: list[tuple[str, str]], access: str, topic: str) -> bool:
    return any(
        have in {access, "readwrite"} and matches(topic_filter, topic)
        for have, topic_filter in lines
    )


# -- the generator ------------------------------------------------------------------------------


def test_output_is_deterministic_whatever_order_the_directory_lists_things(world: World) -> None:
    snapshot, credentials = world.snapshot()
    shuffled = replace(
        snapshot,
        users=dict(reversed(list(snapshot.users.items()))),
        devices=dict(reversed(list(snapshot.devices.items()))),
        groups=dict(reversed(list(snapshot.groups.items()))),
    )
    options = MosquittoOptions(Path("/srv/mosquitto"))
    now = time.time()
    first = mosquitto_files(snapshot, credentials, options, now=now)
    second = mosquitto_files(shuffled, dict(reversed(list(credentials.items()))), options, now=now)
    assert first == second
    assert first.passwords == second.passwords
    assert list(_acl_sections(first.acl)) == sorted(_acl_sections(first.acl))


def test_only_accounts_that_can_log_in_get_a_password_and_an_acl(world: World) -> None:
    files = _files(world)
    expected = ["bob", "carol", "dave", "erin", "root", "truck-2", "van-7"]
    assert list(files.accounts) == expected
    assert [line.split(":")[0] for line in files.passwords.splitlines()] == expected
    assert list(_acl_sections(files.acl)) == expected
    # mallory is revoked, frank has no password, carol-phone is a person's device.
    for absent in ("mallory", "frank", "carol-phone"):
        assert absent not in files.passwords
        assert f"user {absent}\n" not in files.acl
    assert files.unsupported_devices == ("carol-phone",)


def test_announcement_groups_are_read_only_for_members_without_the_right(world: World) -> None:
    sections = _acl_sections(_files(world).acl)
    assert ("read", NEWS) in sections["carol"]
    assert ("readwrite", NEWS) in sections["bob"]  # the manager of ops posts in ops/news
    assert ("read", FINANCE) in sections["bob"]  # ... but not in finance's
    assert ("read", FINANCE) in sections["dave"]
    assert ("readwrite", FINANCE) in sections["root"]
    assert ("readwrite", G) in sections["carol"]
    assert ("read", f"{G}/_r") in sections["carol"]


def test_expired_temporary_groups_are_left_out(world: World) -> None:
    acl = _files(world).acl
    assert f"mc/{ORG}/ops/tmp" not in acl


def test_every_acl_answer_is_the_policys(world: World) -> None:
    """Mosquitto's reading of the ACL file equals the policy on every topic of the directory."""
    snapshot, credentials = world.snapshot()
    now = time.time()
    services = {name: mosquitto_hash(name, iterations=1000) for name in MOSQUITTO_SERVICES}
    options = MosquittoOptions(Path("/srv/m"))
    files = mosquitto_files(snapshot, credentials, options, now=now, services=services)
    policy = AccessPolicy(replace(snapshot, service_tokens=services))
    topics = ["mc/other/ops/line1", f"mc/{ORG}/_s/archive", f"mc/{ORG}/_s/dir"]
    topics += [f"mc/{ORG}/_s/geofence", f"mc/{ORG}/_s/geofence/van-7"]
    topics += [f"mc/{ORG}/_s/archive/carol", f"mc/{ORG}/_s/archive/carol/reply"]
    topics += [f"mc/{ORG}/_s/dir/carol/reply", "owntracks/carol/phone/cmd"]
    for dept, name in snapshot.groups:
        topics += [f"mc/{ORG}/{dept}/{name}", f"mc/{ORG}/{dept}/{name}/_r"]
    # Registered devices only: nobody may publish telemetry of an unknown device, so the file
    # leaves out what the policy would let admins read there.
    for device in snapshot.devices:
        topics += [f"mc/{ORG}/_d/{device}", f"mc/{ORG}/_p/{device}"]
        topics += [f"mc/{ORG}/_t/{device}/gps", f"mc/{ORG}/_t/{device}/status"]
    for user in snapshot.users:
        topics += [f"mc/{ORG}/_k/{user}", f"owntracks/{user}/phone", f"owntracks/{user}/p/event"]
    checked = 0
    sections = _acl_sections(files.acl)
    assert {"svc.archive", "svc.geofence"} <= set(sections)
    for name, lines in sections.items():
        own = name if name in DEVICE_ACCOUNTS else None
        principal = Principal(PrincipalKind.USER, name, name, own)
        if name.startswith(SERVICE_PREFIX):
            principal = Principal(PrincipalKind.SERVICE, name.removeprefix(SERVICE_PREFIX), name)
        for topic in topics:
            for action, access in ((Action.RECEIVE, "read"), (Action.PUBLISH, "write")):
                decision = policy.authorize(principal, action, topic, now=now)
                got = _mosquitto_allows(lines, access, topic)
                assert got is decision.allowed, f"{name} {access} {topic}: {decision.reason}"
                checked += 1
    assert checked > 500


def test_conf_enforces_logins_and_names_its_files(world: World, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    options = MosquittoOptions(
        tmp_path / "out", host="10.1.2.3", port=1884, tls_cert=cert, tls_key=key, run_as="mqtt"
    )
    snapshot, credentials = world.snapshot()
    conf = mosquitto_files(snapshot, credentials, options, now=time.time()).conf
    settings = [line for line in conf.splitlines() if line and not line.startswith("#")]
    assert settings[0] == "per_listener_settings false"  # Mosquitto wants it before the rest
    out = tmp_path / "out"
    for line in (
        "allow_anonymous false",
        f"password_file {out}/passwd",
        f"acl_file {out}/acl",
        "persistence true",
        f"persistence_location {out}/persistence/",
        f"max_packet_size {MOSQUITTO_MAX_PACKET_SIZE}",
        f"max_queued_messages {DEFAULT_MAX_OFFLINE_QUEUE}",
        "user mqtt",
        f"certfile {cert}",
        f"keyfile {key}",
        "tls_version tlsv1.2",
    ):
        assert line in settings
    listeners = [i for i, line in enumerate(settings) if line.startswith("listener ")]
    assert [settings[i] for i in listeners] == ["listener 1884 10.1.2.3", "listener 8883 10.1.2.3"]
    assert settings.count("use_username_as_clientid true") == 2
    assert MOSQUITTO_MAX_PACKET_SIZE > 256 * 1024  # room for a full envelope and its topic
    assert "Devices registered to a person are not supported" in conf


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"out_dir": Path("relative")}, "must be an absolute path"),
        ({"out_dir": Path("/srv/with space")}, "no spaces"),
        ({"tls_cert": Path("/etc/cert.pem")}, "needs both a certificate"),
        ({"port": 0}, "port 0 is outside"),
        ({"run_as": "a b"}, "run-as user"),
    ],
)
def test_options_mosquitto_could_not_use_are_refused(
    change: dict[str, object], message: str
) -> None:
    options: dict[str, object] = {"out_dir": Path("/srv/mosquitto")} | change
    with pytest.raises(ConfigError, match=message):
        MosquittoOptions(**options)  # type: ignore[arg-type]  # the cases vary the field types


def _mosquitto_verify(line: str, password: str) -> bool:
    """Check a password-file line the way Mosquitto 2.0 does ($7$: PBKDF2-SHA512)."""
    _user, hashed = line.split(":", 1)
    _, kind, iterations, salt, digest = hashed.split("$")
    assert kind == "7"
    expected = base64.b64decode(digest)
    computed = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), base64.b64decode(salt), int(iterations), len(expected)
    )
    return hmac.compare_digest(computed, expected)


def test_password_lines_verify_like_mosquitto_passwd_lines(world: World, tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip(MOSQUITTO_MISSING)
    reference = tmp_path / "reference"
    subprocess.run([tool, "-b", "-c", str(reference), "u", "a secret"], check=True, timeout=30)
    line = reference.read_text().strip()
    assert _mosquitto_verify(line, "a secret")  # the checker agrees with Mosquitto's own tool
    assert not _mosquitto_verify(line, "another")
    lines = {line.split(":")[0]: line for line in _files(world).passwords.splitlines()}
    assert _mosquitto_verify(lines["bob"], PASSWORDS["bob"])
    assert not _mosquitto_verify(lines["bob"], PASSWORDS["carol"])
    assert _mosquitto_verify(lines["van-7"], world.tokens["van-7"])


# -- both brokers, over real MQTT connections ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Broker:
    """A running broker that enforces the world's directory."""

    kind: Literal["embedded", "mosquitto"]
    port: int
    world: World
    process: subprocess.Popen[bytes] | None = None

    def client(
        self,
        name: str,
        secret: str | None = None,
        identifier: str = "",
        *,
        clean_session: bool = True,
    ) -> aiomqtt.Client:
        """A client for `name`: device accounts use their name as client id, people NAME.x."""
        if not identifier:
            identifier = name if name in DEVICE_ACCOUNTS else f"{name}.acl"
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            username=name,
            password=self.world.secret(name) if secret is None else secret,
            identifier=identifier,
            clean_session=clean_session,
            timeout=DEADLINE,
        )


def deploy(data: Path, out: Path, port: int, *extra: str) -> dict[str, object]:
    """Run `meshchat deploy mosquitto` as a user does; returns its --json output."""
    run_as = ["--run-as", "root"] if os.geteuid() == 0 else []  # tmp dirs are root-only
    result = CliRunner().invoke(
        app,
        [
            "deploy",
            "mosquitto",
            "--out",
            str(out),
            "--port",
            str(port),
            "--data",
            str(data),
            "--json",
            *run_as,
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


@contextlib.contextmanager
def deployed_mosquitto(world: World, workdir: Path) -> Iterator[Broker]:
    """A real Mosquitto on a free port, configured only by `meshchat deploy mosquitto`."""
    binary = find_mosquitto()
    if binary is None:
        pytest.skip(MOSQUITTO_MISSING)
    out = workdir / "mosquitto"
    for _attempt in range(3):  # a port picked free can be taken before Mosquitto binds it
        port = free_port()
        files = deploy(world.data, out, port)["files"]
        assert isinstance(files, dict)
        with (workdir / "mosquitto.log").open("ab") as log:
            process = subprocess.Popen(
                [binary, "-c", files["conf"]], stdout=subprocess.DEVNULL, stderr=log
            )
            try:
                try:
                    wait_for_port(port, proc=process)
                except RuntimeError:  # it exited: the port was taken meanwhile
                    continue
                yield Broker("mosquitto", port, world, process)
                return
            finally:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    pytest.fail(f"Mosquitto did not start on three free ports; see {workdir / 'mosquitto.log'}")


@pytest.fixture(params=["embedded", "mosquitto"])
async def broker(
    request: pytest.FixtureRequest, world: World, tmp_path: Path
) -> AsyncIterator[Broker]:
    if request.param == "embedded":
        async with SiteServer(DataDir(world.data), BrokerSettings(port=0)) as server:
            yield Broker("embedded", server.broker.listener("mqtt").port, world)
    else:
        with deployed_mosquitto(world, tmp_path) as mosquitto:
            yield mosquitto


async def _arrived_before_marker(
    client: aiomqtt.Client, wanted: Callable[[aiomqtt.Message], bool], marker: bytes
) -> bool:
    """Whether a wanted message arrives before `marker` (which was published after it)."""
    arrived = False
    async with asyncio.timeout(DEADLINE):
        async for message in client.messages:
            if message.payload == marker:
                return arrived
            arrived = arrived or wanted(message)
    msg = "the message stream ended before the marker"
    raise AssertionError(msg)


@dataclass(frozen=True, slots=True)
class Row:
    """One ACL question asked through real connections.

    A read row: `actor` subscribes to `subscribe` (default: `topic`), `peer` publishes to
    `topic`, and the actor must (or must not) receive it. A write row: `actor` publishes to
    `topic` and `peer`, subscribed to it, must (or must not) receive it. "Delivers nothing"
    counts as refusing: Mosquitto grants every SUBSCRIBE and filters on delivery.
    """

    actor: str
    verb: Literal["read", "write"]
    topic: str
    peer: str
    allowed: bool
    subscribe: str = ""
    mosquitto: bool | None = None
    """Mosquitto's answer where it cannot give the embedded broker's (see `why`)."""
    why: str = ""

    def expected(self, kind: str) -> bool:
        return (
            self.mosquitto if kind == "mosquitto" and self.mosquitto is not None else self.allowed
        )

    def __str__(self) -> str:
        where = f"{self.topic} via {self.subscribe}" if self.subscribe else self.topic
        return f"{self.actor} {self.verb} {where} ({self.peer})"


ALLOWED, REFUSED = True, False
R: Literal["read"] = "read"
W: Literal["write"] = "write"
ONLY_PUBLIC_WILDCARDS = (
    "the embedded broker refuses wildcard filters other than _k/+ and _p/+; a Mosquitto ACL "
    "file cannot refuse a SUBSCRIBE, so Mosquitto grants it and delivers the topics the user "
    "may read one by one (nothing the user could not subscribe to directly)"
)
TABLE = [
    # groups: members read and write; nobody else does, admins included
    Row("carol", R, G, "bob", ALLOWED),
    Row("carol", W, G, "bob", ALLOWED),
    Row("erin", R, G, "bob", REFUSED),
    Row("erin", W, G, "carol", REFUSED),
    Row("dave", R, G, "carol", REFUSED),
    Row("root", R, G, "carol", REFUSED),
    Row("root", W, G, "carol", REFUSED),
    # announcement groups: members read; only permitted roles post
    Row("carol", R, NEWS, "bob", ALLOWED),
    Row("carol", W, NEWS, "bob", REFUSED),
    Row("bob", W, NEWS, "carol", ALLOWED),
    Row("bob", R, FINANCE, "root", ALLOWED),
    Row("bob", W, FINANCE, "dave", REFUSED),  # a manager of ops, not of finance
    Row("dave", W, FINANCE, "bob", REFUSED),
    Row("root", W, FINANCE, "dave", ALLOWED),
    # rosters: only the directory service publishes them
    Row("carol", W, f"{G}/_r", "bob", REFUSED),
    # device inboxes: the device reads its own; anyone writes to it
    Row("van-7", R, VAN_INBOX, "bob", ALLOWED),
    Row("bob", R, VAN_INBOX, "carol", REFUSED),
    Row("carol", W, VAN_INBOX, "van-7", ALLOWED),
    # key records: public; each account publishes its own
    Row("erin", R, f"mc/{ORG}/_k/carol", "carol", ALLOWED),
    Row("carol", W, f"mc/{ORG}/_k/carol", "erin", ALLOWED),
    Row("bob", W, f"mc/{ORG}/_k/carol", "erin", REFUSED),
    # presence: public; only the device publishes its own
    Row("dave", R, f"mc/{ORG}/_p/van-7", "van-7", ALLOWED),
    Row("van-7", W, f"mc/{ORG}/_p/van-7", "dave", ALLOWED),
    Row("carol", W, f"mc/{ORG}/_p/van-7", "dave", REFUSED),
    Row("van-7", W, f"mc/{ORG}/_p/truck-2", "dave", REFUSED),
    # telemetry: the device publishes; admins and the device's department read ...
    Row("carol", R, f"mc/{ORG}/_t/van-7/status", "van-7", ALLOWED),
    Row("dave", R, f"mc/{ORG}/_t/van-7/status", "van-7", REFUSED),
    Row("dave", R, f"mc/{ORG}/_t/truck-2/gps", "truck-2", ALLOWED),
    # ... and the people who share a group with the device (its dispatch group), any department
    Row("erin", R, f"mc/{ORG}/_t/truck-2/gps", "truck-2", ALLOWED),
    Row("carol", R, f"mc/{ORG}/_t/truck-2/status", "truck-2", REFUSED),
    Row("root", R, f"mc/{ORG}/_t/van-7/gps", "van-7", ALLOWED),
    Row("van-7", W, f"mc/{ORG}/_t/van-7/gps", "root", ALLOWED),
    Row("van-7", W, f"mc/{ORG}/_t/truck-2/gps", "root", REFUSED),
    Row("carol", W, f"mc/{ORG}/_t/van-7/gps", "root", REFUSED),
    # service requests: anyone sends one; only the service reads them
    Row("bob", R, f"mc/{ORG}/_s/archive", "carol", REFUSED),
    # OwnTracks: each user owns their own topics
    Row("carol", W, "owntracks/carol/phone", "carol", ALLOWED),
    Row("carol", W, "owntracks/bob/phone", "bob", REFUSED),
    Row("carol", R, "owntracks/bob/phone", "bob", REFUSED),
    # wildcard filters
    Row("carol", R, f"mc/{ORG}/_k/bob", "bob", ALLOWED, subscribe=MARKERS),
    Row("carol", R, f"mc/{ORG}/_p/van-7", "van-7", ALLOWED, subscribe=f"mc/{ORG}/_p/+"),
    Row("erin", R, G, "carol", REFUSED, subscribe=f"mc/{ORG}/ops/+"),
    Row("erin", R, G, "carol", REFUSED, subscribe="#"),
    Row(
        "carol",
        R,
        G,
        "bob",
        REFUSED,
        f"mc/{ORG}/ops/+",
        mosquitto=ALLOWED,
        why=ONLY_PUBLIC_WILDCARDS,
    ),
    Row("carol", R, G, "bob", REFUSED, "#", mosquitto=ALLOWED, why=ONLY_PUBLIC_WILDCARDS),
    # the broker's own topics: nothing is published, anything delivered counts
    Row("root", R, "", "root", REFUSED, subscribe="$SYS/#"),
]
ACTORS = sorted({row.actor for row in TABLE} | {row.peer for row in TABLE})


async def _ask(clients: Mapping[str, aiomqtt.Client], row: Row, index: int) -> bool:
    """Whether the row's message got through (the other party is told by a later marker)."""
    tag = uuid.uuid4().hex
    payload, marker = f"row {index} {tag}".encode(), f"marker {index} {tag}".encode()
    actor, peer = clients[row.actor], clients[row.peer]
    if row.verb == "read":
        receiver, sender, sender_name = actor, peer, row.peer
        topic_filter = row.subscribe or row.topic
    else:
        receiver, sender, sender_name = peer, actor, row.actor
        topic_filter = row.topic
    await receiver.subscribe(topic_filter, qos=1)
    if row.topic:
        await sender.publish(row.topic, payload, qos=1)

        def wanted(message: aiomqtt.Message) -> bool:
            return message.payload == payload
    else:

        def wanted(message: aiomqtt.Message) -> bool:
            return str(message.topic).startswith("$")

    await sender.publish(f"mc/{ORG}/_k/{sender_name}", marker, qos=1)
    arrived = await _arrived_before_marker(receiver, wanted, marker)
    if topic_filter != MARKERS:
        await receiver.unsubscribe(topic_filter)
    return arrived


async def test_both_brokers_give_the_acl_tables_answers(broker: Broker) -> None:
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, aiomqtt.Client] = {}
        for name in ACTORS:
            clients[name] = await stack.enter_async_context(broker.client(name))
            await clients[name].subscribe(MARKERS, qos=1)
        wrong = [
            f"{row}: expected {'allowed' if row.expected(broker.kind) else 'refused'}"
            for index, row in enumerate(TABLE)
            if await _ask(clients, row, index) is not row.expected(broker.kind)
        ]
    assert not wrong, f"{broker.kind} disagrees with the table:\n" + "\n".join(wrong)


@dataclass(frozen=True, slots=True)
class Login:
    """One CONNECT: `secret` literally, or else the secret of `secret_of` (default: `user`)."""

    user: str
    allowed: bool
    secret: str | None = None
    secret_of: str = ""
    identifier: str = ""
    mosquitto: bool | None = None


LOGINS = [
    Login("bob", ALLOWED),
    Login("bob", REFUSED, secret="wrong password"),
    Login("bob", REFUSED, secret_of="carol"),
    Login("mallory", REFUSED),  # revoked
    Login("frank", REFUSED, secret=""),  # has no password
    Login("nobody", REFUSED, secret="any password"),
    Login("van-7", ALLOWED),  # a device account with its token
    Login("van-7", REFUSED, secret="wrong token"),
    # A device registered to a person: Mosquitto's password file has one secret per user name.
    Login("carol", ALLOWED, secret_of="carol-phone", identifier="carol-phone", mosquitto=REFUSED),
]


async def test_both_brokers_let_in_the_same_accounts(broker: Broker) -> None:
    wrong = []
    for login in LOGINS:
        expected = login.allowed
        if broker.kind == "mosquitto" and login.mosquitto is not None:
            expected = login.mosquitto
        secret = login.secret
        if secret is None:
            secret = broker.world.secret(login.secret_of or login.user)
        try:
            async with broker.client(login.user, secret, login.identifier):
                allowed = True
        except aiomqtt.MqttCodeError:
            allowed = False
        if allowed is not expected:
            wrong.append(f"{login}: expected {'allowed' if expected else 'refused'}")
    anonymous = aiomqtt.Client("127.0.0.1", broker.port, identifier="anon.x", timeout=DEADLINE)
    with pytest.raises(aiomqtt.MqttCodeError):
        async with anonymous:
            pass
    assert not wrong, f"{broker.kind}: " + "; ".join(wrong)


async def _until_disconnected(client: aiomqtt.Client) -> None:
    async with asyncio.timeout(DEADLINE):
        async for _message in client.messages:
            pass


async def test_offboarding_reaches_mosquitto_on_redeploy_and_sighup(tmp_path: Path) -> None:
    data = tmp_path / "data"
    DataDir(data).ensure()
    with Directory.in_data_dir(data) as directory:
        directory.init_org(ORG, admin="root", password=PASSWORDS["root"])
        directory.add_user("root", "carol", dept="ops", password=PASSWORDS["carol"])
    world = World(data, {})
    with deployed_mosquitto(world, tmp_path) as mosquitto:
        assert mosquitto.process is not None
        async with mosquitto.client("carol") as carol:
            await carol.subscribe(MARKERS, qos=1)
            with Directory.in_data_dir(data) as directory:
                directory.remove_user("root", "carol")
            written = deploy(data, tmp_path / "mosquitto", mosquitto.port)
            assert written["accounts"] == ["root", "svc.archive", "svc.geofence"]
            mosquitto.process.send_signal(signal.SIGHUP)
            with pytest.raises(aiomqtt.MqttError):
                await _until_disconnected(carol)
        with pytest.raises(aiomqtt.MqttCodeError):
            async with mosquitto.client("carol"):
                pass


async def test_a_burst_to_an_offline_member_waits_whole_on_mosquitto(
    world: World, tmp_path: Path
) -> None:
    """A shift's worth of group traffic waits for an offline device (Mosquitto keeps 1000)."""
    burst = 2500
    with deployed_mosquitto(world, tmp_path) as mosquitto:
        async with mosquitto.client("carol", identifier="carol", clean_session=False) as carol:
            await carol.subscribe(G, qos=1)
        async with mosquitto.client("bob") as bob:
            for index in range(burst):
                await bob.publish(G, str(index).encode(), qos=1)
        received: set[bytes] = set()
        async with mosquitto.client("carol", identifier="carol", clean_session=False) as carol:
            with contextlib.suppress(TimeoutError):  # the count below says what was lost
                async with asyncio.timeout(60):
                    async for message in carol.messages:
                        assert isinstance(message.payload, bytes)
                        received.add(message.payload)
                        if len(received) == burst:
                            break
        assert len(received) == burst


async def test_the_archiver_runs_on_mosquitto_with_its_service_account(
    world: World, tmp_path: Path
) -> None:
    """`deploy mosquitto` gives the archiver an account that reads every group and no more."""
    with deployed_mosquitto(world, tmp_path) as mosquitto:
        written = deploy(world.data, tmp_path / "mosquitto", mosquitto.port)
        services = written["services"]
        assert isinstance(services, dict)
        secret = _private_secret(Path(services["archive"]["password_file"]))
        url = f"mqtt://127.0.0.1:{mosquitto.port}"
        envelope = encode(GroupMessage(7, 0, os.urandom(40), os.urandom(64)))
        async with (
            Transport(
                url, client_id="svc.archive", username="svc.archive", password=secret
            ) as link,
            asyncio.TaskGroup() as tasks,
        ):
            archiver = Archiver(tmp_path / "archive.db", link, org=ORG)
            runner = tasks.create_task(archiver.run(), name="test.archiver")
            async with asyncio.timeout(DEADLINE * 4):
                await archiver.ready.wait()
                async with mosquitto.client("carol") as carol:
                    await carol.subscribe(G, qos=1)
                    await carol.subscribe(MARKER, qos=1)
                    await carol.publish(G, envelope, qos=1)
                    # The archive account reads every group but may not post in one.
                    await link.publish(G, b"from the archiver")
                    await carol.publish(MARKER, b"marker", qos=1)
                    got = [m.payload async for m in _until_marker(carol, b"marker")]
                    assert envelope in got
                    assert b"from the archiver" not in got
                await archiver.wait_for(lambda stats: stats.stored >= 1)
            runner.cancel()
    with ArchiveStore(tmp_path / "archive.db") as store:
        assert [e.payload for e in store.group_envelopes("ops/line1")] == [envelope]
    again = deploy(world.data, tmp_path / "mosquitto", 1883)
    assert again["services"] == services  # the secrets are kept, not made anew


MARKER = f"mc/{ORG}/_k/carol"


def _private_secret(path: Path) -> str:
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    return path.read_text(encoding="utf-8").strip()


async def _until_marker(client: aiomqtt.Client, marker: bytes) -> AsyncIterator[aiomqtt.Message]:
    async for message in client.messages:
        if message.payload == marker:
            return
        yield message


async def test_the_geofence_worker_runs_on_mosquitto_with_its_service_account(
    tmp_path: Path,
) -> None:
    """`meshchat geofence` logs in as svc.geofence and moves a phone into its site channel."""
    data = tmp_path / "data"
    cli = CliRunner()
    for args, stdin in (
        (["org", "init", "--org", ORG, "--admin", "root", "--password-stdin"], "root password\n"),
        (["user", "add", "carol", "--dept", "ops", "--password-stdin"], "carol password\n"),
        (["site", "add", "plant-3", "--lat", "48.137", "--lon", "11.575", *SITE], None),
        (["geofence", "config", "--join-delay", "0"], None),
    ):
        done = cli.invoke(app, [*args, "--data", str(data)], input=stdin)
        assert done.exit_code == 0, done.output
    world = World(data, {})
    env = os.environ | {"PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    with deployed_mosquitto(world, tmp_path) as mosquitto:
        secret_file = data / "services" / "geofence.secret"
        url = f"mqtt://127.0.0.1:{mosquitto.port}"
        process = subprocess.Popen(  # noqa: ASYNC220  # started once; a thread reads it
            [
                *(MESHCHAT, "geofence", "--broker", url, "--username", "svc.geofence"),
                *("--password-file", str(secret_file), "--data", str(data)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        try:
            assert process.stdout is not None
            reader = LineReader(process.stdout)
            await asyncio.to_thread(read_line_matching, reader, "geofence ready")
            # The archive account reads every roster: it watches the site channel's.
            archive = mosquitto.client("svc.archive", _secret(data, "archive"), "svc.archive")
            fix = {"_type": "location", "lat": 48.137, "lon": 11.575, "tst": int(time.time())}
            async with archive, mosquitto.client("carol") as phone:
                await archive.subscribe(f"mc/{ORG}/sites/plant-3/_r", qos=1)
                await phone.publish("owntracks/carol/phone", json.dumps(fix).encode(), qos=1)
                async with asyncio.timeout(DEADLINE * 4):
                    async for message in archive.messages:
                        assert isinstance(message.payload, bytes)
                        if b"carol" in message.payload:
                            break
        finally:
            process.terminate()
            await asyncio.to_thread(process.wait, 20)
            if process.stdout is not None:
                process.stdout.close()


SITE = ("--radius", "150", "--dwell", "0")


def _secret(data: Path, service: str) -> str:
    return (data / "services" / f"{service}.secret").read_text(encoding="utf-8").strip()
