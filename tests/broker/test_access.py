"""The broker enforces the directory: logins, group membership, roles, live changes, revocation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from meshchat.broker import BrokerSettings
from meshchat.broker.access import ConnectLimit
from meshchat.datadir import DataDir
from meshchat.directory import Directory, Role, read_import
from meshchat.server import SiteServer

GROUP = "mc/acme/ops/line1"
PASSWORDS = {"bob": "bob password", "carol": "carol password", "erin": "erin password"}


@dataclass
class Site:
    server: SiteServer
    directory: Directory  # a second connection, as an admin command in another process has
    port: int

    def client(
        self, user: str, password: str | None = None, suffix: str = "test"
    ) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            username=user,
            password=PASSWORDS.get(user, "") if password is None else password,
            identifier=f"{user}.{suffix}",
            timeout=10,
        )

    async def policy_shows(self, check: object) -> None:
        watcher = self.server.watcher
        assert watcher is not None
        assert callable(check)
        async with asyncio.timeout(1.0):  # the bound: effective within a second
            await watcher.wait_for(check)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    data = tmp_path / "data"
    data.mkdir()
    with Directory(data / "directory.db") as directory:
        directory.init_org("acme", admin="root", password="root password")
        directory.add_user("root", "bob", dept="ops", role=Role.MANAGER, password=PASSWORDS["bob"])
        directory.add_user("root", "carol", dept="ops", password=PASSWORDS["carol"])
        directory.add_user("root", "erin", dept="ops", password=PASSWORDS["erin"])
        directory.create_group("bob", "ops/line1")
        directory.add_members("bob", "ops/line1", ["carol"])
        async with SiteServer(DataDir(data), BrokerSettings(port=0)) as server:
            assert server.bootstrap is None  # the org existed
            yield Site(server, directory, server.broker.listener("mqtt").port)


async def _first_message(client: aiomqtt.Client, deadline: float = 5.0) -> aiomqtt.Message:
    async with asyncio.timeout(deadline):
        async for message in client.messages:
            return message
    raise AssertionError("no message")


async def test_member_receives_what_a_member_publishes(site: Site) -> None:
    async with site.client("carol") as carol, site.client("bob") as bob:
        granted = await carol.subscribe(GROUP, qos=1)
        assert list(granted) == [1]
        await bob.publish(GROUP, b"envelope", qos=1)
        message = await _first_message(carol)
        assert message.payload == b"envelope"


@pytest.mark.parametrize(
    ("user", "password", "identifier"),
    [
        ("carol", "wrong password", "carol.test"),
        ("nobody", "carol password", "nobody.test"),
        ("carol", "carol password", "bob.test"),  # another user's client id
        (None, None, "anon.test"),
    ],
)
async def test_bad_logins_are_refused(
    site: Site, user: str | None, password: str | None, identifier: str
) -> None:
    client = aiomqtt.Client(
        "127.0.0.1", site.port, username=user, password=password, identifier=identifier, timeout=10
    )
    with pytest.raises(aiomqtt.MqttCodeError):
        async with client:
            pass


async def test_non_member_can_neither_subscribe_nor_publish(site: Site) -> None:
    async with site.client("erin") as erin, site.client("carol") as carol:
        assert list(await erin.subscribe(GROUP, qos=1)) == [128]
        await carol.subscribe(GROUP, qos=1)
        await erin.publish(GROUP, b"intruder", qos=1)
        await carol.publish(GROUP, b"member", qos=1)
        # Carol's own later message arrives; erin's earlier one never does.
        assert (await _first_message(carol)).payload == b"member"


async def test_membership_change_in_another_process_takes_effect_within_a_second(
    site: Site,
) -> None:
    async with site.client("erin") as erin, site.client("bob") as bob:
        assert list(await erin.subscribe(GROUP, qos=1)) == [128]
        site.directory.add_members("bob", "ops/line1", ["erin"])
        await site.policy_shows(lambda p: "erin" in p.snapshot.groups["ops", "line1"].members)
        assert list(await erin.subscribe(GROUP, qos=1)) == [1]
        await bob.publish(GROUP, b"welcome", qos=1)
        assert (await _first_message(erin)).payload == b"welcome"

        site.directory.remove_members("bob", "ops/line1", ["erin"])
        await site.policy_shows(lambda p: "erin" not in p.snapshot.groups["ops", "line1"].members)
        await erin.subscribe("mc/acme/_k/+", qos=1)
        await bob.publish(GROUP, b"after removal", qos=1)
        await bob.publish("mc/acme/_k/bob", b"marker", qos=1)
        # Erin is still subscribed to the group but receives only the later marker.
        message = await _first_message(erin)
        assert str(message.topic) == "mc/acme/_k/bob"


async def test_revoked_user_is_disconnected_within_a_second_and_cannot_return(site: Site) -> None:
    async with site.client("carol") as carol:
        await carol.subscribe(GROUP, qos=1)
        site.directory.remove_user("root", "carol")
        with pytest.raises(aiomqtt.MqttError):
            await _first_message(carol, deadline=1.5)
    with pytest.raises(aiomqtt.MqttCodeError):
        async with site.client("carol"):
            pass


async def test_announcement_group_only_lets_permitted_roles_post(site: Site) -> None:
    site.directory.create_group("bob", "ops/news", announcement=True)
    site.directory.add_members("bob", "ops/news", ["carol"])
    await site.policy_shows(lambda p: ("ops", "news") in p.snapshot.groups)
    news = "mc/acme/ops/news"
    async with site.client("carol") as carol, site.client("bob") as bob:
        await bob.subscribe(news, qos=1)
        await carol.publish(news, b"from a member", qos=1)
        await bob.publish(news, b"from the manager", qos=1)
        assert (await _first_message(bob)).payload == b"from the manager"


async def test_offboarding_through_org_import_disconnects_within_a_second(
    site: Site, tmp_path: Path
) -> None:
    hr = tmp_path / "hr.csv"
    hr.write_text("user,dept,role\nroot,admin,admin\nbob,ops,manager\nerin,ops,member\n")
    async with site.client("carol") as carol, site.client("erin") as erin:
        await carol.subscribe(GROUP, qos=1)
        plan = site.directory.apply_import("root", read_import(hr))
        assert plan.offboard == ("carol",)
        with pytest.raises(aiomqtt.MqttError):
            await _first_message(carol, deadline=1.5)
        # erin, still in the file, stays connected and can still publish her key record.
        await erin.publish("mc/acme/_k/erin", b"still here", qos=1)
    with pytest.raises(aiomqtt.MqttCodeError):
        async with site.client("carol"):
            pass


async def test_a_client_that_reconnects_too_often_is_refused_and_others_are_not(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with Directory(data / "directory.db") as directory:
        directory.init_org("acme", admin="root", password="root password")
        directory.add_user("root", "carol", dept="ops", password=PASSWORDS["carol"])
        limit = ConnectLimit(per_client=3, per_address=100, window=600)
        async with SiteServer(DataDir(data), BrokerSettings(port=0), connect_limit=limit) as server:
            site = Site(server, directory, server.broker.listener("mqtt").port)
            for _ in range(3):
                async with site.client("carol", suffix="flappy"):
                    pass
            with pytest.raises(aiomqtt.MqttCodeError):
                async with site.client("carol", suffix="flappy"):
                    pass
            async with site.client("carol", suffix="steady") as steady:
                await steady.publish("mc/acme/_k/carol", b"still served", qos=1)
