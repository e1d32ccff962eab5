"""Shared fixtures: real brokers on free ports, never a fixed one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from meshchat.broker import EmbeddedBroker
from tests.brokers import Mosquitto, embedded_broker, mosquitto_broker

settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci")


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    """The embedded amqtt broker, in-process on a free loopback port."""
    async with embedded_broker() as running:
        yield running


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto on a free loopback port (skipped only when it cannot be installed)."""
    with mosquitto_broker(tmp_path) as running:
        yield running
