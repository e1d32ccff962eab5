"""A real site server with people (bob, carol, dave in ops) and a way to add device accounts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshchat.broker import BrokerSettings
from meshchat.client import DeviceProfile
from meshchat.client.login import login
from meshchat.datadir import DataDir
from meshchat.directory import Directory, Role
from meshchat.fleet import ProvisionedDevice, add_device
from meshchat.server import SiteServer

PASSWORDS = {"bob": "bob password", "carol": "carol password", "dave": "dave password"}


@dataclass
class Fleet:
    server: SiteServer
    directory: Directory
    url: str
    tmp: Path

    @property
    def data(self) -> Path:
        return self.server.data.path

    async def login(self, user: str) -> DeviceProfile:
        return await login(
            self.tmp / "clients" / user,
            broker=self.url,
            org="acme",
            user=user,
            password=PASSWORDS[user],
            device=f"{user}-laptop",
        )

    async def add_device(
        self, name: str, *, dept: str = "ops", group: str | None = None
    ) -> ProvisionedDevice:
        """Provision a device account, and wait until the broker's policy knows it."""
        made = add_device(
            self.directory,
            self.data,
            actor="root",
            name=name,
            dept=dept,
            kind="tracker",
            broker=self.url,
            out=self.tmp / "devices" / f"{name}.json",
            group=group,
        )
        watcher = self.server.watcher
        assert watcher is not None
        await watcher.reload()
        return made


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    data = tmp_path / "server"
    data.mkdir()
    with Directory(data / "directory.db") as directory:
        directory.init_org("acme", admin="root", password="root password")
        for user, password in PASSWORDS.items():
            role = Role.MANAGER if user == "bob" else Role.MEMBER
            directory.add_user("root", user, dept="ops", role=role, password=password)
        async with SiteServer(DataDir(data), BrokerSettings(port=0)) as server:
            port = server.broker.listener("mqtt").port
            yield Fleet(server, directory, f"mqtt://127.0.0.1:{port}", tmp_path)
