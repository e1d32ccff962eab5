"""A real site server with users bob (manager), carol and dave, for client tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshchat.broker import BrokerSettings
from meshchat.client import Backoff, DeviceProfile
from meshchat.client.login import login
from meshchat.datadir import DataDir
from meshchat.directory import Directory, Role
from meshchat.server import SiteServer

PASSWORDS = {"bob": "bob password", "carol": "carol password", "dave": "dave password"}
FAST = Backoff(initial=0.05, maximum=0.2)


@dataclass
class Site:
    server: SiteServer
    directory: Directory
    url: str
    clients: Path

    async def login(self, user: str, device: str | None = None) -> DeviceProfile:
        return await login(
            self.clients / user,
            broker=self.url,
            org="acme",
            user=user,
            password=PASSWORDS[user],
            device=device or f"{user}-laptop",
        )


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    data = tmp_path / "server"
    data.mkdir()
    with Directory(data / "directory.db") as directory:
        directory.init_org("acme", admin="root", password="root password")
        for user, password in PASSWORDS.items():
            role = Role.MANAGER if user == "bob" else Role.MEMBER
            directory.add_user("root", user, dept="ops", role=role, password=password)
        directory.create_group("bob", "ops/line1")
        directory.add_members("bob", "ops/line1", ["carol"])
        async with SiteServer(DataDir(data), BrokerSettings(port=0)) as server:
            port = server.broker.listener("mqtt").port
            yield Site(server, directory, f"mqtt://127.0.0.1:{port}", tmp_path / "clients")
