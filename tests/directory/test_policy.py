"""The access policy: one table of who may subscribe, publish and receive where; who may connect."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshchat.directory import (
    AccessPolicy,
    Action,
    Directory,
    GroupKind,
    Principal,
    PrincipalKind,
    Role,
    hash_token,
)
from meshchat.errors import AuthenticationError

NOW = 2_000_000_000.0
SUB, PUB, RECV = Action.SUBSCRIBE, Action.PUBLISH, Action.RECEIVE

ROOT = Principal(PrincipalKind.USER, "root", "root.cli")
BOB = Principal(PrincipalKind.USER, "bob", "bob.cli")
CAROL = Principal(PrincipalKind.USER, "carol", "carol-phone", "carol-phone")
DAVE = Principal(PrincipalKind.USER, "dave", "dave.cli")
ERIN = Principal(PrincipalKind.USER, "erin", "erin.cli")
FRED = Principal(PrincipalKind.USER, "fred", "fred.cli")
VAN = Principal(PrincipalKind.USER, "van-7", "van-7", "van-7")
ARCHIVE = Principal(PrincipalKind.SERVICE, "archive", "svc.archive")
GEOFENCE = Principal(PrincipalKind.SERVICE, "geofence", "svc.geofence")
DIR = Principal(PrincipalKind.SERVICE, "dir", "svc.dir")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Directory, dict[str, str]]]:
    path: Path = tmp_path_factory.mktemp("policy") / "directory.db"
    clock = iter(range(1, 10_000))
    with Directory(path, clock=lambda: NOW - 1000 + next(clock)) as directory:
        directory.init_org("acme", admin="root", password="root password")
        directory.add_user("root", "bob", dept="ops", role=Role.MANAGER, password="bob password")
        directory.add_user("root", "carol", dept="ops", password="carol password")
        directory.add_user("root", "dave", dept="finance", password="dave password")
        directory.add_user("root", "erin", dept="ops")
        directory.add_user("root", "fred", dept="finance", password="fred password")
        directory.add_user("root", "van-7", dept="ops", role=Role.DEVICE)
        tokens = {
            "carol-phone": directory.add_device("carol", "carol-phone", owner="carol"),
            "van-7": directory.add_device("root", "van-7", owner="van-7", kind="vehicle"),
        }
        directory.create_group("bob", "ops/line1")
        directory.add_members("bob", "ops/line1", ["carol"])
        directory.create_group("bob", "ops/news", announcement=True)
        directory.add_members("bob", "ops/news", ["carol"])
        directory.create_group("root", "finance/all", announcement=True)
        directory.add_members("root", "finance/all", ["bob", "dave"])
        directory.create_group("bob", "ops/tmp", kind=GroupKind.TEMPORARY, expires_at=NOW - 1)
        directory.create_group("root", "finance/vans")  # a dispatch group across departments
        directory.add_members("root", "finance/vans", ["van-7", "fred"])
        directory.add_site("root", "plant-3", lat=48.1, lon=11.5, radius_m=200)
        yield directory, tokens


@pytest.fixture(scope="module")
def policy(world: tuple[Directory, dict[str, str]]) -> AccessPolicy:
    services = {name: hash_token(f"{name}-token") for name in ("archive", "geofence", "dir")}
    return AccessPolicy(world[0].snapshot(services))


G = "mc/acme/ops/line1"
TABLE = [
    # group topics: members read and write, others nothing
    (CAROL, SUB, G, True),
    (CAROL, PUB, G, True),
    (CAROL, RECV, G, True),
    (BOB, PUB, G, True),
    (ERIN, SUB, G, False),
    (ERIN, PUB, G, False),
    (ERIN, RECV, G, False),
    (DAVE, SUB, G, False),
    (ROOT, SUB, G, False),  # admins administer; they do not read groups they are not in
    (CAROL, SUB, "mc/acme/ops/nope", False),
    (BOB, SUB, "mc/acme/ops/tmp", False),  # expired temporary group
    (CAROL, SUB, "mc/other/ops/line1", False),
    # announcement groups: members read, only permitted roles post
    (CAROL, SUB, "mc/acme/ops/news", True),
    (CAROL, PUB, "mc/acme/ops/news", False),
    (BOB, PUB, "mc/acme/ops/news", True),
    (BOB, PUB, "mc/acme/finance/all", False),  # a manager of ops, not of finance
    (DAVE, PUB, "mc/acme/finance/all", False),
    (DAVE, RECV, "mc/acme/finance/all", True),
    # rosters: members read, only the directory (and geofence for sites) publish
    (CAROL, SUB, f"{G}/_r", True),
    (CAROL, PUB, f"{G}/_r", False),
    (ERIN, SUB, f"{G}/_r", False),
    (DIR, PUB, f"{G}/_r", True),
    (GEOFENCE, PUB, f"{G}/_r", False),
    (GEOFENCE, PUB, "mc/acme/sites/plant-3/_r", True),
    # device inboxes: only the device reads, anyone writes
    (CAROL, SUB, "mc/acme/_d/carol-phone", True),
    (BOB, SUB, "mc/acme/_d/carol-phone", False),
    (BOB, PUB, "mc/acme/_d/carol-phone", True),
    (ARCHIVE, PUB, "mc/acme/_d/carol-phone", True),
    # key records: public, each user publishes their own
    (ERIN, SUB, "mc/acme/_k/carol", True),
    (CAROL, PUB, "mc/acme/_k/carol", True),
    (BOB, PUB, "mc/acme/_k/carol", False),
    # presence and telemetry: only the device itself writes
    (VAN, PUB, "mc/acme/_p/van-7", True),
    (CAROL, PUB, "mc/acme/_p/van-7", False),
    (DAVE, SUB, "mc/acme/_p/van-7", True),
    (VAN, PUB, "mc/acme/_t/van-7/gps", True),
    (VAN, PUB, "mc/acme/_t/carol-phone/gps", False),
    (CAROL, SUB, "mc/acme/_t/van-7/status", True),  # same department
    (DAVE, SUB, "mc/acme/_t/van-7/status", False),
    (ROOT, SUB, "mc/acme/_t/van-7/gps", True),
    (GEOFENCE, SUB, "mc/acme/_t/van-7/gps", True),
    (FRED, SUB, "mc/acme/_t/van-7/gps", True),  # shares finance/vans with the van
    (FRED, RECV, "mc/acme/_t/van-7/status", True),
    (FRED, PUB, "mc/acme/_t/van-7/gps", False),
    # the geofence's reader certificate is public; a device's key share is for the geofence
    (CAROL, SUB, "mc/acme/_s/geofence", True),
    (CAROL, PUB, "mc/acme/_s/geofence", False),
    (GEOFENCE, PUB, "mc/acme/_s/geofence", True),
    (VAN, PUB, "mc/acme/_s/geofence/van-7", True),
    (VAN, PUB, "mc/acme/_s/geofence/carol-phone", False),
    (CAROL, PUB, "mc/acme/_s/geofence/van-7", False),
    (BOB, PUB, "mc/acme/_s/geofence/bob", False),  # a person's session speaks for no device
    (CAROL, SUB, "mc/acme/_s/geofence/van-7", False),
    (VAN, SUB, "mc/acme/_s/geofence/van-7", False),
    (GEOFENCE, SUB, "mc/acme/_s/geofence/+", True),
    (ARCHIVE, PUB, "mc/acme/_s/geofence", False),  # services publish on their own topics only
    (ARCHIVE, PUB, "mc/acme/_s/dir/bob/reply", False),
    (DIR, PUB, "mc/acme/_s/archive/bob/reply", False),
    # services
    (BOB, PUB, "mc/acme/_s/archive", False),  # requests name their sender
    (BOB, PUB, "mc/acme/_s/archive/bob", True),
    (BOB, PUB, "mc/acme/_s/archive/carol", False),
    (BOB, PUB, "mc/acme/_s/archive/bob/reply", False),
    (BOB, SUB, "mc/acme/_s/dir/bob/reply", True),
    (BOB, SUB, "mc/acme/_s/dir/carol/reply", False),
    (BOB, SUB, "mc/acme/_s/dir/bob", False),
    (ARCHIVE, SUB, "mc/acme/_s/archive/+", True),
    (ARCHIVE, PUB, "mc/acme/_s/archive/bob/reply", True),
    (BOB, SUB, "mc/acme/_s/archive", False),
    (ARCHIVE, SUB, "mc/acme/_s/archive", True),
    (GEOFENCE, SUB, "mc/acme/_s/archive", False),
    (ARCHIVE, SUB, "mc/acme/+/+", True),
    (ARCHIVE, RECV, G, True),
    (ARCHIVE, PUB, G, False),
    (ARCHIVE, SUB, "#", False),
    # wildcards: users get the public namespaces only
    (CAROL, SUB, "mc/acme/_k/+", True),
    (CAROL, SUB, "mc/acme/_p/+", True),
    (CAROL, SUB, "mc/acme/ops/+", False),
    (CAROL, SUB, "mc/acme/#", False),
    (CAROL, SUB, "#", False),
    (CAROL, SUB, "mc/acme/ops/line1/#", False),
    # OwnTracks: users own their own topics; the geofence reads them
    (CAROL, PUB, "owntracks/carol/phone", True),
    (CAROL, PUB, "owntracks/bob/phone", False),
    (GEOFENCE, SUB, "owntracks/+/+", True),
    (GEOFENCE, RECV, "owntracks/carol/phone/event", True),
    (CAROL, SUB, "owntracks/+/+", False),
    # outside the tree
    (ROOT, SUB, "$SYS/broker/uptime", False),
    (ROOT, PUB, "random/topic", False),
]


@pytest.mark.parametrize(
    ("principal", "action", "topic", "allowed"),
    TABLE,
    ids=[f"{p.name}-{a.value}-{t}" for p, a, t, _ in TABLE],
)
def test_acl_table(
    policy: AccessPolicy, principal: Principal, action: Action, topic: str, allowed: bool
) -> None:
    decision = policy.authorize(principal, action, topic, now=NOW)
    assert decision.allowed is allowed, decision.reason
    assert decision.reason


def test_refusals_say_why(policy: AccessPolicy) -> None:
    assert policy.authorize(ERIN, SUB, G, now=NOW).reason == "erin is not a member of ops/line1"
    reason = policy.authorize(CAROL, PUB, "mc/acme/ops/news", now=NOW).reason
    assert "lacks group.post-announcement" in reason


def test_password_and_device_token_login(
    policy: AccessPolicy, world: tuple[Directory, dict[str, str]]
) -> None:
    _, tokens = world
    bob = policy.authenticate("bob", "bob password", "bob.laptop")
    assert (bob.kind, bob.name, bob.device) == (PrincipalKind.USER, "bob", None)
    carol = policy.authenticate("carol", tokens["carol-phone"], "carol-phone")
    assert carol.device == "carol-phone"
    assert policy.authenticate("carol", "carol password", "carol-phone").device == "carol-phone"
    van = policy.authenticate("van-7", tokens["van-7"], "van-7")
    assert van.device == "van-7"
    service = policy.authenticate("svc.archive", "archive-token", "svc.archive.1")
    assert service.kind is PrincipalKind.SERVICE


@pytest.mark.parametrize(
    ("username", "password", "client_id"),
    [
        ("bob", "wrong password", "bob.laptop"),
        ("nobody", "bob password", "nobody.x"),
        ("erin", "", "erin.x"),  # no password set
        ("bob", "bob password", "carol-phone"),  # someone else's device
        ("carol", "carol password", "bob.laptop"),  # someone else's client id space
        ("van-7", "van password", "van-7"),  # device accounts have tokens, no passwords
        ("svc.archive", "wrong", "svc.archive"),
        ("svc.nope", "x", "svc.nope"),
        (None, "x", "x"),
    ],
)
def test_bad_logins_are_refused(
    policy: AccessPolicy, username: str | None, password: str, client_id: str
) -> None:
    with pytest.raises(AuthenticationError):
        policy.authenticate(username, password, client_id)


def test_revocation_takes_effect_in_the_next_snapshot(tmp_path: Path) -> None:
    with Directory(tmp_path / "d.db") as directory:
        directory.init_org("acme", admin="root", password="root password")
        directory.add_user("root", "carol", dept="ops", password="carol password")
        directory.create_group("root", "ops/line1")
        directory.add_members("root", "ops/line1", ["carol"])
        token = directory.add_device("carol", "carol-phone", owner="carol")
        before = AccessPolicy(directory.snapshot())
        carol = before.authenticate("carol", token, "carol-phone")
        assert before.authorize(carol, RECV, G, now=NOW)
        directory.remove_user("root", "carol")
        after = AccessPolicy(directory.snapshot())
        assert not after.still_valid(carol)
        assert after.authorize(carol, RECV, G, now=NOW).reason == "carol is revoked"
        with pytest.raises(AuthenticationError):
            after.authenticate("carol", token, "carol-phone")
