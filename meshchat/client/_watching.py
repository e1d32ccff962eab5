"""Watching other devices: their telemetry and presence (`Client.fleet`), people's presence."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from meshchat.client._shared import Shared
from meshchat.client.events import PresenceChanged
from meshchat.client.fleet import Fleet
from meshchat.client.presence import PresenceTracker, Seen
from meshchat.device.telemetry import seal_key_request
from meshchat.topics import InboxTopic, PresenceTopic, TelemetryTopic

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face


class Watching:
    """The devices and people a client watches, and what it last heard of them."""

    def __init__(self, shared: Shared, *, presence_clock: Callable[[], float]) -> None:
        """Load what the store remembers; `presence_clock` dates last-seen times."""
        self._org, self._device, self._session = shared.org, shared.device, shared.session
        self._transport, self._clock, self._emit = shared.transport, shared.clock, shared.emit
        self.fleet = Fleet(shared.store, ask=self.ask_telemetry_key)
        """Telemetry and presence of the devices this client reads (`watch_devices`)."""
        self.presence = PresenceTracker(shared.store, clock=presence_clock)
        """Presence of the people whose devices this client watches (`watch_presence`)."""
        self._presence_watched: set[str] = set()

    async def watch_devices(self, devices: Iterable[str]) -> None:
        """Follow devices' presence and telemetry in `fleet` (see `Client.watch_devices`)."""
        for device in devices:
            await self._transport.subscribe(PresenceTopic(self._org, device).topic)
            for kind in ("status", "gps"):
                await self._transport.subscribe(TelemetryTopic(self._org, device, kind).topic)

    async def watch_presence(self, users: Iterable[str]) -> None:
        """Follow the presence of these people's devices (see `Client.watch_presence`)."""
        new = [
            d.name
            for d in self._session.keys.devices_of(users)
            if d.name not in self._presence_watched
        ]
        await asyncio.gather(
            *(self._transport.subscribe(PresenceTopic(self._org, name).topic) for name in new)
        )
        self._presence_watched.update(new)

    def presence_of(self, user: str) -> Seen:
        """What this client knows of a person's presence."""
        record = self._session.keys.record(user)
        devices = [d.name for d in record.devices] if record is not None else []
        return self.presence.of(user, devices)

    def on_message(self, topic: TelemetryTopic | PresenceTopic, payload: bytes) -> None:
        """A watched device's report or presence (`watch_devices`, `watch_presence`)."""
        self.fleet.on_message(topic, payload)
        if isinstance(topic, PresenceTopic):
            online = self.presence.on_presence(topic.device, payload)
            owner = self._session.keys.owner(topic.device)
            if online is not None and owner is not None:
                self._emit(PresenceChanged(owner[0], topic.device, online))

    def ask_telemetry_key(self, device: str, key_id: int) -> None:
        """Ask a device for a telemetry key this client never got (signed, sealed to it)."""
        owner = self._session.keys.owner(device)
        if owner is None:
            return  # its key record is not here yet; the next report asks again
        payload = seal_key_request(
            key_id,
            sender=self._device,
            signing=self._session.signing,
            device=device,
            device_box=owner[1].box,
            ts=int(self._clock()),
        )
        self._transport.publish_nowait(InboxTopic(self._org, device).topic, payload)
