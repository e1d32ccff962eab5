"""meshchat's own GPS telemetry into fixes: the geofence worker's key shares and keyring, no IO.

Devices seal each fix under their telemetry key (`meshchat.e2ee.telemetry`) and leave the
fixes-only copy of that key for the worker on ``mc/{org}/_s/geofence/{device}`` (retained),
sealed to the worker's reader key and signed by the device. `GpsIntake`:

- opens a share only when the device's signature checks out against the Ed25519 key the
  directory lists for it (the same key its signed key record carries) and the sender is the
  device the topic names; a share from a device that is unknown or revoked is refused, and
  kept (one per device, `MAX_UNVERIFIED` in all) in case the directory names it a moment later:
  a device added while the worker runs may publish before the worker reads the directory again;
- keeps the keys in a `TelemetryKeyring` (the newest few per device: a restart or the weekly
  rotation brings a new key, and fixes sealed under the one before still open);
- opens each fix; a fix whose key is not here yet is parked in the keyring (at most
  `MAX_PARKED` per device, the oldest pushed out and counted; at most the keyring's device
  limit in all) and opened when its share comes;
- forgets a device's keys and parked fixes when the directory no longer lists it as active.

Restarts: the keyring is never written to disk. The shares are retained by the broker, so a
restarted worker gets every device's current share again when it subscribes, and fixes queued
for its persistent session are parked until then.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from meshchat.device.telemetry import GEOFENCE_READER, GpsFix, decode_gps, open_key_share
from meshchat.e2ee import BoxKeyPair, OpenedTelemetry, TelemetryKeyring
from meshchat.errors import DecryptError, E2EEError, EnvelopeError, TelemetryError
from meshchat.geofence.rules import Fix
from meshchat.topics import TelemetryTopic

__all__ = ["MAX_FIX_BYTES", "MAX_SHARE_BYTES", "MAX_UNVERIFIED", "GpsIntake", "Intake"]

MAX_SHARE_BYTES: Final = 1024
"""A key share is about 300 bytes; anything much larger is refused unread."""
MAX_FIX_BYTES: Final = 256
"""A sealed fix is under 60 bytes."""
MAX_UNVERIFIED: Final = 1024
"""Shares from devices the directory does not name (yet) kept for a retry, one per device."""


@dataclass(slots=True)
class Intake:
    """What one message gave: fixes by device, and why it was refused (None: it was not)."""

    fixes: list[tuple[str, Fix]] = field(default_factory=list)
    refused: str | None = None
    parked: bool = False
    shares: int = 0


def to_fix(gps: GpsFix) -> Fix:
    """The state machine's view of a device's fix."""
    return Fix(float(gps.ts), gps.lat, gps.lon, gps.accuracy)


class GpsIntake:
    """The worker's telemetry reader: key shares in, fixes out (see the module docstring)."""

    def __init__(self, reader: BoxKeyPair) -> None:
        """Read with `reader`, the worker's X25519 key (never logged)."""
        self._reader = reader
        self.keyring = TelemetryKeyring()
        self._unverified: OrderedDict[str, bytes] = OrderedDict()
        self._signing: Mapping[str, bytes] = {}

    @property
    def unverified(self) -> int:
        """Shares kept because their device was not (yet) known."""
        return len(self._unverified)

    @property
    def dropped(self) -> int:
        """Fixes pushed out of the keyring's parking before their key came."""
        return self.keyring.dropped

    @staticmethod
    def _opened(opened: Iterable[OpenedTelemetry]) -> list[tuple[str, Fix]]:
        fixes = []
        for report in opened:
            if report.kind != "gps":
                continue
            try:
                fixes.append((report.device, to_fix(decode_gps(report.plaintext))))
            except (TelemetryError, ValueError):
                continue  # a device's bug: that fix is dropped, the others still count
        return fixes

    def share(self, device: str, payload: bytes) -> Intake:  # noqa: PLR0911  # one return per refusal
        """Take what arrived on ``_s/geofence/{device}``."""
        if not payload:
            return Intake()  # a cleared retained share
        if len(payload) > MAX_SHARE_BYTES:
            return Intake(refused="oversize")
        signing = self._signing
        try:
            sender, key = open_key_share(
                payload, reader=self._reader, signing_key=signing.get, recipient=GEOFENCE_READER
            )
        except DecryptError as exc:
            if exc.reason == "unknown-sender" and device not in signing:
                self._unverified[device] = payload
                self._unverified.move_to_end(device)
                while len(self._unverified) > MAX_UNVERIFIED:
                    self._unverified.popitem(last=False)
            return Intake(refused=exc.reason or "bad-share")
        except (EnvelopeError, E2EEError):
            return Intake(refused="bad-share")
        if not hmac.compare_digest(sender.encode(), device.encode()):
            # Signed by one device, left on another's topic: the broker's ACL should have
            # stopped it; refuse it all the same.
            return Intake(refused="share-mismatch")
        self._unverified.pop(device, None)
        try:
            opened = self.keyring.add(device, key.gps_only())
        except E2EEError:
            return Intake(refused="too-many-devices")
        return Intake(fixes=self._opened(opened), shares=1)

    def fix(self, topic: TelemetryTopic, payload: bytes) -> Intake:  # noqa: PLR0911  # one return per refusal
        """Take what arrived on ``_t/{device}/gps`` (the caller checked org and kind)."""
        # A device the directory does not name (yet) has no key here: its fixes are parked
        # like any others (the broker let them through, so it knows the device: the worker
        # reads the directory again within a second).
        if len(payload) > MAX_FIX_BYTES:
            return Intake(refused="oversize")
        try:
            opened = self.keyring.open(topic, payload)
        except DecryptError as exc:
            return Intake(refused=exc.reason or "bad-ciphertext")
        except EnvelopeError:
            return Intake(refused="bad-telemetry")
        except E2EEError:
            return Intake(refused="too-many-devices")
        if opened is None:
            return Intake(parked=True)
        if not opened.fresh:
            return Intake(refused="replayed")
        fixes = self._opened([opened])
        return Intake(fixes=fixes) if fixes else Intake(refused="bad-telemetry")

    def directory_changed(self, signing: Mapping[str, bytes]) -> Intake:
        """Follow the directory's active devices: forget the gone, retry kept shares.

        Args:
            signing: every active device's Ed25519 public key, by name.

        Returns:
            The shares kept that open now, and the parked fixes they open.
        """
        before, self._signing = self._signing, dict(signing)
        for device, key in before.items():
            now = signing.get(device)
            if now is None or not hmac.compare_digest(key, now):
                self.keyring.forget(device)  # revoked, removed, or re-keyed: old shares are void
        out = Intake()
        retry = [device for device in self._unverified if device in signing]
        for device in retry:
            payload = self._unverified.pop(device)
            opened = self.share(device, payload)
            out.fixes.extend(opened.fixes)
            out.shares += opened.shares
        return out
