"""Queued delivery under the directory ACL: a member gets what was sent while it was away.

What a persistent session may receive is decided when the message is delivered, while the
access plugin knows who the client is, and against the membership in force then.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt

from meshchat.broker import BrokerSettings
from meshchat.datadir import DataDir
from meshchat.directory import Directory, Role
from meshchat.server import SiteServer
from tests.broker.rawmqtt import messages_until

GROUP = "mc/acme/ops/line1"
MARKER = "mc/acme/_k/bob"


def _client(port: int, user: str, *, clean_session: bool = True) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=f"{user} password",
        identifier=f"{user}.phone",
        clean_session=clean_session,
        timeout=10,
    )


async def test_a_member_gets_what_was_sent_while_away_and_an_ex_member_does_not(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with Directory(data / "directory.db") as directory:
        directory.init_org("acme", admin="root", password="root password")
        for user, role in (("bob", Role.MANAGER), ("carol", Role.MEMBER), ("erin", Role.MEMBER)):
            directory.add_user("root", user, dept="ops", role=role, password=f"{user} password")
        directory.create_group("bob", "ops/line1")
        directory.add_members("bob", "ops/line1", ["carol", "erin"])
        async with SiteServer(DataDir(data), BrokerSettings(port=0)) as server:
            port = server.broker.listener("mqtt").port
            for user in ("carol", "erin"):
                async with _client(port, user, clean_session=False) as member:
                    assert list(await member.subscribe(GROUP, qos=1)) == [1]
                    assert list(await member.subscribe("mc/acme/_k/+", qos=1)) == [1]
            async with _client(port, "bob") as bob:
                await bob.publish(GROUP, b"while you were away", qos=1)
            directory.remove_members("bob", "ops/line1", ["erin"])
            watcher = server.watcher
            assert watcher is not None
            async with asyncio.timeout(5):
                await watcher.wait_for(
                    lambda p: "erin" not in p.snapshot.groups["ops", "line1"].members
                )
            for user, expected in (("carol", [b"while you were away"]), ("erin", [])):
                async with _client(port, user, clean_session=False) as member:
                    async with _client(port, "bob") as bob:
                        await bob.publish(MARKER, b"marker", qos=1)
                    # The directory service also publishes key records on _k: the marker's payload
                    # tells bob's marker apart, and only the group's messages are compared.
                    received = await messages_until(member, MARKER, marker=b"marker")
                    assert [m.payload for m in received if m.topic.value == GROUP] == expected, user
