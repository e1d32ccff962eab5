"""A directory with an org, an ops manager, ops members and a finance member."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshchat.directory import Directory, Role

ADMIN_PASSWORD = "correct horse battery"


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Directory]:
    with Directory(tmp_path / "directory.db") as opened:
        opened.init_org("acme", admin="root", password=ADMIN_PASSWORD)
        opened.add_user("root", "bob", dept="ops", role=Role.MANAGER)
        opened.add_user("root", "carol", dept="ops")
        opened.add_user("root", "dave", dept="finance")
        yield opened
