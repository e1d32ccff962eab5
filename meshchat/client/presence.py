"""Who is online: people's presence, read from their devices' retained last-will topics.

Every client publishes ``online`` on ``mc/{org}/_p/{device}`` when it connects and the broker
publishes its last will, ``offline``, when the link drops (both retained, so a subscriber learns
the current state at once). A `PresenceTracker` keeps what the watched devices said, and when this
client last saw each of them online; a person is online while any of their devices is. It only
reads: nothing here publishes.

The payloads come from the network: anything but the two known words is ignored, and the number
of devices tracked is bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import msgpack

from meshchat.client.store import ClientStore
from meshchat.device.core import OFFLINE, ONLINE

__all__ = ["MAX_TRACKED", "OFFLINE", "ONLINE", "PresenceTracker", "Seen"]

logger = logging.getLogger(__name__)

MAX_TRACKED: Final = 50_000
"""Devices tracked at most (each one's state is a few bytes)."""
SEEN_KEY: Final = "presence.last-seen"


@dataclass(frozen=True, slots=True)
class Seen:
    """What this client knows of one person's presence.

    Attributes:
        user: the person.
        online: True while any of their devices is connected, False when all said offline,
            None when none of their devices has reported (or they have none).
        last_seen: for someone offline, when this client last saw one of their devices online
            (unix seconds); None when it never did.
        devices: how many devices their key record lists.
    """

    user: str
    online: bool | None
    last_seen: int | None
    devices: int


class PresenceTracker:
    """The last presence word of each watched device, and when each was last seen online."""

    def __init__(self, store: ClientStore, *, clock: Callable[[], float] = time.time) -> None:
        """Load the last-seen times kept in the client store."""
        self._store = store
        self._clock = clock
        self._online: dict[str, bool] = {}
        self._last_seen: dict[str, int] = {}
        raw = store.get(SEEN_KEY)
        if raw is not None:
            try:
                saved = msgpack.unpackb(raw, raw=False, strict_map_key=True)
                self._last_seen = {str(d): int(ts) for d, ts in dict(saved).items()}
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                logger.warning("dropped the saved last-seen times: %s", exc)

    def on_presence(self, device: str, payload: bytes) -> bool | None:
        """A device's presence word arrived; returns its new state if it changed, else None."""
        if payload not in {ONLINE, OFFLINE}:
            return None  # an empty (cleared) retained message, or garbage
        online = payload == ONLINE
        was = self._online.get(device)
        if was is None and len(self._online) >= MAX_TRACKED:
            return None
        self._online[device] = online
        if was is online:
            return None
        if was is True and not online:
            # Seen going offline now: that is when it was last seen.
            self._last_seen[device] = int(self._clock())
            self._save()
        return online

    def device(self, device: str) -> bool | None:
        """True online, False offline, None never heard of (not watched, or never connected)."""
        return self._online.get(device)

    def of(self, user: str, devices: Iterable[str]) -> Seen:
        """The presence of `user`, whose key record lists `devices`."""
        names = list(devices)
        states = [self._online.get(name) for name in names]
        online: bool | None = None
        if any(state is True for state in states):
            online = True
        elif any(state is False for state in states):
            online = False
        seen = [self._last_seen[name] for name in names if name in self._last_seen]
        last = int(self._clock()) if online else max(seen, default=None)
        return Seen(user, online, last, len(names))

    def _save(self) -> None:
        newest = sorted(self._last_seen.items(), key=lambda item: item[1])[-MAX_TRACKED:]
        self._last_seen = dict(newest)
        packed: bytes = msgpack.packb(self._last_seen, use_bin_type=True)
        self._store.put(SEEN_KEY, packed)
