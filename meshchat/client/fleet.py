"""What a person's client knows of the devices it dispatches: telemetry keys, reports, presence.

Devices send their telemetry key to the devices of the people in their dispatch groups, as a
signed direct message (`Kind.TELEMETRY_KEY`); the `Client` hands those to its `Fleet`, which
keeps them in a `TelemetryKeyring` saved in the client store, opens the reports that arrive on
the telemetry topics the client watches (`Client.watch_devices`), and keeps each device's last
status (saved), last fix and presence. A report that breaks its schema is dropped with a log
line; one whose key has not come yet waits for it (bounded).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

import msgpack

from meshchat.client.store import ClientStore
from meshchat.device.core import OFFLINE, ONLINE
from meshchat.device.telemetry import (
    GpsFix,
    Status,
    decode_status,
    encode_status,
    is_key_request,
    key_from_inner,
    read_report,
)
from meshchat.e2ee import Inner
from meshchat.e2ee.telemetry import OpenedTelemetry, TelemetryKeyring
from meshchat.errors import DecryptError, E2EEError, EnvelopeError, TelemetryError
from meshchat.topics import PresenceTopic, TelemetryTopic

__all__ = ["Fleet"]

logger = logging.getLogger(__name__)

ASK_AGAIN: Final = 30.0
"""Seconds before a reader asks a device again for a key it still lacks."""
KEYRING_KEY: Final = "telemetry.keys"
STATUS_KEY: Final = "telemetry.status"


class Fleet:
    """Telemetry keys, last reports and presence of the devices this client reads."""

    def __init__(
        self,
        store: ClientStore,
        *,
        ask: Callable[[str, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Load the keyring and the last statuses from the client store.

        Args:
            store: the client store (keys and last statuses are kept there).
            ask: sends a device a request for one of its keys (device, key id); reports under a
                key that never came make the fleet ask, at most every `ASK_AGAIN` seconds.
            clock: a monotonic time source.
        """
        self._store = store
        self._ask = ask
        self._clock = clock
        self._asked: dict[tuple[str, int], float] = {}
        raw = store.get(KEYRING_KEY)
        self.keyring = TelemetryKeyring()
        if raw is not None:
            try:
                self.keyring = TelemetryKeyring.from_bytes(raw)
            except E2EEError as exc:
                logger.warning("starting with no telemetry keys: %s", exc)
        self._status: dict[str, Status] = {}
        saved = store.get(STATUS_KEY)
        if saved is not None:
            self._restore_statuses(saved)
        self._fixes: dict[str, GpsFix] = {}
        self._presence: dict[str, bool] = {}
        self._refused: dict[str, int] = {}
        self._changed = asyncio.Event()

    def _restore_statuses(self, saved: bytes) -> None:
        try:
            items = msgpack.unpackb(saved, raw=False, strict_map_key=True)
            for device, plaintext in items.items():
                self._status[str(device)] = decode_status(plaintext)
        except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as exc:
            logger.warning("dropped the saved device statuses: %s", exc)

    def _save(self) -> None:
        self._store.put(KEYRING_KEY, self.keyring.to_bytes())
        packed: bytes = msgpack.packb(
            {device: encode_status(status) for device, status in self._status.items()},
            use_bin_type=True,
        )
        self._store.put(STATUS_KEY, packed)

    # ------------------------------------------------------------------------------ input

    def take_key(self, device: str, inner: Inner) -> None:
        """A telemetry key arrived from `device` (its signature was checked by the session)."""
        if is_key_request(inner):
            return  # a copy of this user's own request, from another of their devices
        try:
            key = key_from_inner(inner)
        except EnvelopeError as exc:
            logger.warning("refused a telemetry key from %s: %s", device, exc)
            return
        for opened in self.keyring.add(device, key):
            self._take(opened)
        self._save()
        self._changed.set()

    def on_message(self, topic: TelemetryTopic | PresenceTopic, payload: bytes) -> None:
        """A message on a watched device topic: a report, or a presence change."""
        if isinstance(topic, TelemetryTopic):
            self.on_telemetry(topic, payload)
        else:
            self.on_presence(topic, payload)

    def on_telemetry(self, topic: TelemetryTopic, payload: bytes) -> None:
        """A report arrived on a watched telemetry topic."""
        if not payload:
            return  # a cleared retained status
        try:
            opened = self.keyring.open(topic, payload)
        except (DecryptError, EnvelopeError) as exc:
            self._refused[topic.device] = self._refused.get(topic.device, 0) + 1
            logger.warning("dropped a %s report of %s: %s", topic.kind, topic.device, exc)
            return
        if opened is None:
            self._ask_missing(topic.device)
        else:
            self._take(opened)
            if opened.kind == "status":
                self._save()
        self._changed.set()

    def _ask_missing(self, device: str) -> None:
        if self._ask is None:
            return
        now = self._clock()
        for key_id in self.keyring.missing(device):
            asked = self._asked.get((device, key_id))
            if asked is None or now - asked >= ASK_AGAIN:
                self._asked[(device, key_id)] = now
                self._ask(device, key_id)

    def _take(self, opened: OpenedTelemetry) -> None:
        try:
            report = read_report(opened)
        except TelemetryError as exc:
            self._refused[opened.device] = self._refused.get(opened.device, 0) + 1
            logger.warning(
                "dropped a malformed %s report of %s: %s", opened.kind, opened.device, exc
            )
            return
        match report:
            case Status():
                last = self._status.get(opened.device)
                if last is None or report.ts >= last.ts:
                    self._status[opened.device] = report
            case GpsFix():
                last_fix = self._fixes.get(opened.device)
                if last_fix is None or report.ts >= last_fix.ts:
                    self._fixes[opened.device] = report

    def on_presence(self, topic: PresenceTopic, payload: bytes) -> None:
        """A device's presence changed (retained: the last one arrives on subscribing)."""
        if payload in {ONLINE, OFFLINE}:
            self._presence[topic.device] = payload == ONLINE
            self._changed.set()

    # ------------------------------------------------------------------------------ state

    def status(self, device: str) -> Status | None:
        """The device's newest status read here (kept between runs)."""
        return self._status.get(device)

    def fix(self, device: str) -> GpsFix | None:
        """The device's newest GPS fix read since the client started."""
        return self._fixes.get(device)

    def presence(self, device: str) -> bool | None:
        """True online, False offline, None not known (not watched, or never connected)."""
        return self._presence.get(device)

    def has_key(self, device: str) -> bool:
        """Whether this client holds a telemetry key of the device (it is one of its readers)."""
        return self.keyring.key(device) is not None

    def waiting(self, device: str) -> int:
        """Reports of the device that arrived without their key (not readable here, yet)."""
        return self.keyring.parked(device)

    def refused(self, device: str) -> int:
        """Reports of the device dropped as forged or malformed."""
        return self._refused.get(device, 0)

    async def wait_until(self, check: Callable[[], bool]) -> None:
        """Wait until `check()` holds after a change (bound it with `asyncio.timeout`)."""
        while not check():
            self._changed.clear()
            await self._changed.wait()
