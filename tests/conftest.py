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


@pytest.fixture(params=["embedded", "mosquitto"])
async def any_broker(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[str, int]]:
    """(host, port) of each broker in turn: the same test runs against amqtt and Mosquitto."""
    if request.param == "embedded":
        async with embedded_broker() as running:
            listener = running.listener("mqtt")
            yield listener.host, listener.port
    else:
        with mosquitto_broker(tmp_path) as external:
            yield external.host, external.port
