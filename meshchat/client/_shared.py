"""What every part of one client works with: its identity, session, store, link and events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from meshchat.client.events import ClientEvent
from meshchat.client.store import ClientStore
from meshchat.client.transport import Transport
from meshchat.e2ee import DeviceSession

logger = logging.getLogger(__name__)

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face


SERVICE_TIMEOUT: Final = 10.0
"""Seconds to wait for a service (the directory, the archiver) to answer, and for the broker
to confirm the first subscriptions."""


@dataclass(frozen=True, slots=True)
class Shared:
    """The client's own objects, handed to each part it is composed of."""

    org: str
    user: str
    device: str
    session: DeviceSession
    store: ClientStore
    transport: Transport
    clock: Callable[[], float]
    """The time, read through the client: a clock swapped in later reaches every part."""
    emit: Callable[[ClientEvent], None]
    """Report an event (`Client.events`)."""
    outbox_changed: asyncio.Event
    """Wakes the send loop: something to seal or publish."""
    records_changed: asyncio.Event
    """Set when a key record arrives (sealing and work orders wait for members' records)."""


def log_failure(task: asyncio.Task[None]) -> None:
    """A done-callback for background tasks: log what ended one with an error."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("client task %s failed", task.get_name(), exc_info=task.exception())
