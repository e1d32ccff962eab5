"""A site server and a scripted conversation for the chat app's tests and its screenshot.

`python -m tests.cli.chat_site docs/chat.svg` writes the README's screenshot: the same
conversation the snapshot test pins, plus a message arriving in another group.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Final

from cli.chatapp import ChatApp
from meshchat.broker import BrokerSettings
from meshchat.client import Client, DeviceProfile, Message, login
from meshchat.datadir import DataDir
from meshchat.directory import Directory, Role
from meshchat.e2ee import Kind
from meshchat.server import SiteServer

__all__ = ["START", "ChatSite", "FixedClock", "converse", "open_site"]

START: Final = 1741942800
"""2025-03-14 09:00 UTC: the conversation's clocks start here, so its screens never change."""
FLOOR, NIGHT = "ops/floor", "ops/night"


@dataclass
class FixedClock:
    """A clock that moves only when told."""

    now: float = START

    def __call__(self) -> float:
        """The time it shows."""
        return self.now

    def at(self, minutes: int) -> None:
        """Show `minutes` past the start."""
        self.now = START + 60 * minutes


@dataclass
class ChatSite:
    """A running site server and its directory."""

    server: SiteServer
    directory: Directory
    url: str
    clients: Path
    _devices: dict[str, Iterator[int]] = field(default_factory=dict)

    def group(self, path: str, *users: str) -> str:
        """A new group of `users`, created by the first (a manager)."""
        self.directory.create_group(users[0], path)
        self.directory.add_members(users[0], path, list(users[1:]))
        return path

    async def login(self, user: str) -> DeviceProfile:
        """A fresh device of `user`, with its own profile directory."""
        device = f"{user}-{next(self._devices.setdefault(user, itertools.count(1)))}"
        return await login(
            self.clients / device,
            broker=self.url,
            org="acme",
            user=user,
            password=f"{user} password",
            device=device,
        )


@contextlib.asynccontextmanager
async def open_site(root: Path, users: dict[str, Role]) -> AsyncIterator[ChatSite]:
    """A site server of org acme with `users` in department ops (password: "USER password")."""
    data = root / "server"
    data.mkdir()
    with Directory(data / "directory.db") as directory:
        directory.init_org("acme", admin="root", password="root password")
        for user, role in users.items():
            directory.add_user("root", user, dept="ops", role=role, password=f"{user} password")
        async with SiteServer(DataDir(data), BrokerSettings(port=0)) as server:
            port = server.broker.listener("mqtt").port
            yield ChatSite(server, directory, f"mqtt://127.0.0.1:{port}", root / "clients")


async def _read(client: Client, text: str, kind: Kind = Kind.TEXT) -> Message:
    async with asyncio.timeout(10):
        async for event in client.events():
            if isinstance(event, Message) and event.text == text and event.kind is kind:
                return event
    raise AssertionError(f"{client.profile.user} never read {text!r}")


async def _settle(client: Client, *groups: str) -> None:
    async with asyncio.timeout(10):
        while not set(groups) <= set(client.groups):
            await anext(aiter(client.events()))
        for group in groups:
            await client.wait_roster(group)


async def converse(site: ChatSite, clock: FixedClock) -> DeviceProfile:
    """Lena and Omar talk in ops/floor; returns Omar's device, which read it all.

    Every client is closed again, with nothing left to send, when this returns.
    """
    site.group(FLOOR, "lena", "omar")
    site.group(NIGHT, "lena", "omar")
    lena_device, omar_device = await site.login("lena"), await site.login("omar")
    async with (
        Client(lena_device, clock=clock, send_receipts=False) as lena,
        Client(omar_device, clock=clock, send_receipts=False) as omar,
    ):
        await _settle(lena, FLOOR, NIGHT)
        await _settle(omar, FLOOR, NIGHT)
        clock.at(2)
        await lena.send(FLOOR, "Morning! **Forklift 3** is back in service.")
        first = await _read(omar, "Morning! **Forklift 3** is back in service.")
        clock.at(5)
        await omar.reply(FLOOR, first.message_id, "Great, I'll move the pallets from bay 2.")
        await _read(lena, "Great, I'll move the pallets from bay 2.", Kind.REPLY)
        clock.at(12)
        await lena.send(FLOOR, "Delivery from *Nordfracht* at 11:00, dock door 4.")
        delivery = await _read(omar, "Delivery from *Nordfracht* at 11:00, dock door 4.")
        clock.at(13)
        await lena.edit(
            FLOOR, delivery.message_id, "Delivery from *Nordfracht* at 11:00, dock door 5."
        )
        await _read(omar, "Delivery from *Nordfracht* at 11:00, dock door 5.", Kind.EDIT)
        clock.at(30)
        await lena.urgent(FLOOR, "Fire drill at 10:30: meet at assembly point B.")
        await _read(omar, "Fire drill at 10:30: meet at assembly point B.", Kind.URGENT)
        async with asyncio.timeout(10):
            await lena.flush()
            await omar.flush()
    return omar_device


async def _screenshot(out: Path) -> None:
    clock = FixedClock()
    with tempfile.TemporaryDirectory() as tmp:
        async with open_site(Path(tmp), {"lena": Role.MANAGER, "omar": Role.MEMBER}) as site:
            omar = await converse(site, clock)
            lena = await site.login("lena")
            async with (
                Client(lena, clock=clock, send_receipts=False) as sender,
                Client(omar, clock=clock, send_receipts=False) as client,
            ):
                app = ChatApp(client, clock=clock, tz=UTC)
                async with app.run_test(size=(80, 24)) as pilot:
                    clock.at(41)
                    await sender.send(NIGHT, "@omar can you cover the night shift on Friday?")
                    item = app.group_list.item(NIGHT)
                    async with asyncio.timeout(10):
                        while item is None or not item.unread:
                            await pilot.pause(0.05)
                    app.clear_notifications()
                    await pilot.pause()
                    app.save_screenshot(out.name, str(out.parent))


if __name__ == "__main__":
    asyncio.run(_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/chat.svg")))
