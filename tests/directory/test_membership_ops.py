"""`join` and `leave` on the directory service (`_s/dir`): who may, and what a change sets off."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshchat.datadir import DataDir
from meshchat.directory import Directory, Role
from meshchat.directory.service import DirectoryResponder
from meshchat.directory.signing import OrgKeys
from meshchat.e2ee import Roster
from meshchat.envelope import Signed, decode
from meshchat.rpc import Reply, Request, decode_reply

LINE1, LINE2, PLANT = "ops/line1", "ops/line2", "sites/plant-3"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An org made once (its keys cost a second of argon2id); each test copies it."""
    data = tmp_path_factory.mktemp("template") / "data"
    DataDir(data).ensure()
    with Directory.in_data_dir(data) as directory:
        directory.init_org("acme", admin="root", password="root password")
        directory.add_user("root", "bob", dept="ops", role=Role.MANAGER)
        directory.add_user("root", "carol", dept="ops")
        directory.add_user("root", "dave", dept="finance")
        directory.create_group("bob", LINE1)
        directory.add_members("bob", LINE1, ["carol"])
        directory.create_group("root", LINE2)
        directory.add_site("root", "plant-3", lat=52.5, lon=13.4, radius_m=100)
        directory.add_members("root", PLANT, ["carol"])
        keys = OrgKeys.create(data, "acme", "a root passphrase")
        keys.ensure_identities(directory)
    return data


@pytest.fixture
def responder(template: Path, tmp_path: Path) -> Iterator[DirectoryResponder]:
    data = tmp_path / "data"
    shutil.copytree(template, data)
    opened = DirectoryResponder(data)
    for publication in opened.changes():  # what the service publishes at start
        opened.published(publication)
    try:
        yield opened
    finally:
        opened.close()


def ask(responder: DirectoryResponder, user: str, op: str, *args: object) -> Reply:
    published = responder.handle(f"mc/acme/_s/dir/{user}", Request(op, args).encode())
    assert published is not None
    assert published.topic == f"mc/acme/_s/dir/{user}/reply"
    return decode_reply(published.payload)


def members(responder: DirectoryResponder, path: str) -> frozenset[str]:
    return frozenset(responder.directory.group(path).members)


def published_roster(responder: DirectoryResponder, path: str) -> Roster:
    """The roster the service would publish now for `path` (it must have changed)."""
    changes = {p.topic: p.payload for p in responder.changes()}
    envelope = decode(changes[f"mc/acme/{path}/_r"])
    assert isinstance(envelope, Signed)
    return Roster.decode(envelope.payload)


def test_anyone_may_leave_and_the_change_is_audited_re_signed_and_rotates(
    responder: DirectoryResponder,
) -> None:
    reply = ask(responder, "carol", "leave", LINE1)
    assert reply.ok, reply.value
    assert reply.value == [PLANT]  # her groups now
    assert members(responder, LINE1) == {"bob"}
    assert responder.take_changed()  # the service publishes and reloads the broker's policy
    assert responder.directory.group(LINE1).rotation_pending
    (entry,) = responder.directory.audit_entries(last=1)
    assert (entry.actor, entry.action, entry.target) == ("carol", "group.remove", LINE1)
    assert entry.details_dict == {"users": ["carol"]}
    roster = published_roster(responder, LINE1)
    assert roster.members == ("bob",)
    assert roster.epoch >= 2  # a new epoch, hash-linked to the one carol was in


def test_leaving_a_group_one_is_not_in_says_so(responder: DirectoryResponder) -> None:
    for group in (LINE2, "ops/no-such-group"):  # the same answer: no hint what exists
        reply = ask(responder, "carol", "leave", group)
        assert not reply.ok
        assert reply.value == f"carol is not a member of {group}: there is nothing to leave"
    assert not responder.take_changed()


def test_a_site_channel_is_left_by_walking_away(responder: DirectoryResponder) -> None:
    reply = ask(responder, "carol", "leave", PLANT)
    assert not reply.ok
    assert isinstance(reply.value, str)
    assert "permission denied: group.manage for department sites" in reply.value
    assert "geofence" in reply.value
    assert "carol" in members(responder, PLANT)


def test_joining_needs_the_right_to_add_people_to_the_group(
    responder: DirectoryResponder,
) -> None:
    for user in ("carol", "dave"):  # a member of ops; someone of another department
        reply = ask(responder, user, "join", LINE2)
        assert not reply.ok
        assert isinstance(reply.value, str)
        assert reply.value.startswith("permission denied: group.manage for department ops")
        assert reply.value.endswith(f"meshchat group add {LINE2} {user}")
        assert user not in members(responder, LINE2)
    assert not responder.take_changed()
    reply = ask(responder, "bob", "join", LINE2)  # a manager of ops
    assert reply.ok, reply.value
    assert reply.value == [LINE1, LINE2]
    assert "bob" in members(responder, LINE2)
    assert responder.take_changed()
    (entry,) = responder.directory.audit_entries(last=1)
    assert (entry.actor, entry.action, entry.target) == ("bob", "group.add", LINE2)
    assert "bob" in published_roster(responder, LINE2).members


def test_bad_group_names_and_unknown_groups_get_clear_refusals(
    responder: DirectoryResponder,
) -> None:
    assert ask(responder, "root", "join", "ops/no-such-group").value == (
        "no group 'ops/no-such-group'"
    )
    for bad in ("ops", "ops/+", "ops/line1/_r", "x" * 5000):
        reply = ask(responder, "carol", "join", bad)
        assert not reply.ok
        assert isinstance(reply.value, str)
        assert "is not a group" in reply.value
        assert len(reply.value) <= 500
    assert not ask(responder, "carol", "join").ok  # no group at all
    assert not responder.take_changed()
