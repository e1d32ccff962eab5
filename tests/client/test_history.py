"""History from the archiver: a new device reads what was said before it existed."""

from __future__ import annotations

import asyncio

import pytest

from meshchat.client.core import Client, Message
from meshchat.client.login import login
from meshchat.errors import MeshchatError
from tests.client.conftest import PASSWORDS, Site


async def said(client: Client, text: str) -> None:
    async with asyncio.timeout(10):
        async for event in client.events():
            if isinstance(event, Message) and event.text == text:
                return


async def test_a_new_device_fetches_and_decrypts_older_history(site: Site) -> None:
    bob_profile = await site.login("bob")
    carol_laptop = await site.login("carol")
    async with Client(bob_profile) as bob, Client(carol_laptop) as laptop:
        await bob.send("ops/line1", "shift notes: belt 4 slipping")
        await bob.send("ops/line1", "ordered a new belt")
        await said(laptop, "ordered a new belt")  # archived by now: the archiver saw it first
        phone_profile = await login(
            site.clients / "carol-phone",  # another machine: its own data directory
            broker=site.url,
            org="acme",
            user="carol",
            password=PASSWORDS["carol"],
            device="carol-phone",
        )
        async with Client(phone_profile) as phone:
            assert phone.store.history("mc/acme/ops/line1") == []
            async with asyncio.timeout(20):
                fetched = await phone.fetch_history("ops/line1")
                # The phone had no keys for bob's chain: it asks bob's device, which shares
                # them because carol was a member when bob wrote.
                while len(phone.store.history("mc/acme/ops/line1")) < 2:
                    await said(phone, "ordered a new belt")
            assert fetched == 0  # nothing was readable until the keys came
            assert [m.body for m in phone.store.history("mc/acme/ops/line1")] == [
                "shift notes: belt 4 slipping",
                "ordered a new belt",
            ]
            assert phone.store.search("belt")  # and it is searchable on the phone


async def test_a_non_member_gets_a_clear_refusal(site: Site) -> None:
    dave_profile = await site.login("dave")
    async with Client(dave_profile) as dave:
        # A client that wrongly believes it is in the group: the archiver still refuses.
        dave._groups.add("ops/line1")
        with pytest.raises(MeshchatError, match="member"):
            async with asyncio.timeout(10):
                await dave.fetch_history("ops/line1")
