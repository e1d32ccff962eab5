"""The directory service inside a real site server: registration, rosters and key records."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nacl.public
import pytest

from meshchat.broker import BrokerSettings
from meshchat.client import Transport
from meshchat.datadir import DataDir
from meshchat.directory import Directory, Role
from meshchat.e2ee import BoxKeyPair, OrgTrust, SigningKeyPair
from meshchat.envelope import Signed, decode
from meshchat.errors import PermissionDeniedError
from meshchat.rpc import Reply, Request, decode_reply
from meshchat.server import SiteServer

PASSWORDS = {"bob": "bob password", "carol": "carol password"}
LINE1_ROSTER = "mc/acme/ops/line1/_r"


@dataclass
class Site:
    server: SiteServer
    directory: Directory
    url: str

    def transport(self, user: str, *, client_id: str | None = None) -> Transport:
        return Transport(
            self.url,
            client_id=client_id or f"{user}.test",
            username=user,
            password=PASSWORDS[user],
            clean_session=True,
        )


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    data = tmp_path / "data"
    data.mkdir()
    with Directory(data / "directory.db") as directory:
        directory.init_org("acme", admin="root", password="root password")
        directory.add_user("root", "bob", dept="ops", role=Role.MANAGER, password=PASSWORDS["bob"])
        directory.add_user("root", "carol", dept="ops", password=PASSWORDS["carol"])
        directory.create_group("bob", "ops/line1")
        async with SiteServer(DataDir(data), BrokerSettings(port=0)) as server:
            yield Site(server, directory, f"mqtt://127.0.0.1:{server.broker.listener('mqtt').port}")


async def ask(transport: Transport, user: str, request: Request) -> Reply:
    reply_topic = f"mc/acme/_s/dir/{user}/reply"
    await transport.subscribe(reply_topic)
    await transport.publish(f"mc/acme/_s/dir/{user}", request.encode())
    async with asyncio.timeout(10):
        async for message in transport.messages():
            if message.topic == reply_topic:
                reply = decode_reply(message.payload)
                if reply.id == request.id:
                    return reply
    raise AssertionError("no reply")


async def retained(transport: Transport, topic: str, check: object) -> Signed:
    """Wait for a retained envelope on `topic` that satisfies `check`."""
    assert callable(check)
    await transport.subscribe(topic)
    async with asyncio.timeout(10):
        async for message in transport.messages():
            if message.topic == topic and message.payload:
                envelope = decode(message.payload)
                assert isinstance(envelope, Signed)
                if check(envelope):
                    return envelope
    raise AssertionError(f"nothing on {topic}")


async def test_login_registers_a_device_and_publishes_its_keys(site: Site) -> None:
    signing, box = SigningKeyPair.generate(), BoxKeyPair.generate()
    async with site.transport("carol") as carol:
        reply = await ask(
            carol, "carol", Request("register", ("carol-laptop", signing.public, box.public))
        )
        assert reply.ok, reply.value
        assert isinstance(reply.value, list)
        bundle, sealed_token, groups = reply.value
        trust = OrgTrust.decode(bundle)
        assert trust.org == "acme"
        token = nacl.public.SealedBox(nacl.public.PrivateKey(box.secret)).decrypt(sealed_token)
        assert groups == []
        keys = trust.key_directory()
        record = await retained(carol, "mc/acme/_k/carol", lambda e: b"carol-laptop" in e.payload)
        accepted = keys.accept(record, arrived_on_user="carol")
        assert [(d.name, d.signing, d.box) for d in accepted.devices] == [
            ("carol-laptop", signing.public, box.public)
        ]
    # The sealed token is the device's broker login.
    async with Transport(
        site.url,
        client_id="carol-laptop",
        username="carol",
        password=token.decode(),
        clean_session=False,
    ) as device:
        await device.subscribe("mc/acme/_d/carol-laptop")


async def test_a_membership_change_publishes_a_new_linked_roster(site: Site) -> None:
    async with site.transport("bob") as bob:
        trust = OrgTrust.decode((await ask(bob, "bob", Request("trust"))).value)  # type: ignore[arg-type]
        rosters = trust.roster_tracker()
        first = await retained(bob, LINE1_ROSTER, lambda _: True)
        assert rosters.accept(first, arrived_on="mc/acme/ops/line1").members == ("bob",)
    site.directory.add_members("bob", "ops/line1", ["carol"])
    async with site.transport("bob", client_id="bob.second") as bob:
        second = await retained(bob, LINE1_ROSTER, lambda e: b"carol" in e.payload)
        roster = rosters.accept(second, arrived_on="mc/acme/ops/line1")
        assert roster.members == ("bob", "carol")
        assert roster.epoch == 2


async def test_requests_in_another_users_name_are_refused(site: Site) -> None:
    async with site.transport("carol") as carol:
        with pytest.raises(PermissionDeniedError):
            await carol.subscribe("mc/acme/_s/dir/bob/reply")
        reply = await ask(carol, "carol", Request("groups"))
        assert reply.ok
        assert reply.value == []
        refused = await ask(carol, "carol", Request("unmake-me-admin", ()))
        assert not refused.ok
        assert "does not know" in str(refused.value)


async def test_a_taken_device_name_is_a_clear_refusal(site: Site) -> None:
    signing, box = SigningKeyPair.generate(), BoxKeyPair.generate()
    async with site.transport("carol") as carol:
        request = Request("register", ("bob", signing.public, box.public))
        reply = await ask(carol, "carol", request)
        assert not reply.ok
        assert "taken" in str(reply.value)
