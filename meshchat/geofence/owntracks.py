"""OwnTracks messages as the apps send them (sans-IO): parsing, decryption, region push.

OwnTracks phones publish JSON to ``owntracks/{user}/{device}`` (``location``, and the broker's
``lwt`` on the same topic) and ``owntracks/{user}/{device}/event`` (``transition``), optionally
encrypted: ``{"_type": "encrypted", "data": base64(nonce(24) || secretbox)}``, where the key is
the app's passphrase as UTF-8, cut to 32 bytes and padded with zero bytes (libsodium
``crypto_secretbox``, XSalsa20-Poly1305; the apps and the OwnTracks Recorder do the same).

Everything here is untrusted input from phones, and parsing is strict where it matters and
tolerant where the apps are known to be sloppy (the quirks of the shared samples):

- payloads are bounded (`MAX_PAYLOAD`) and must be one JSON object; NaN and Infinity are refused;
- ``lat`` and ``lon`` must be JSON numbers in range (the OwnTracks schema requires numbers; a
  position as a string is refused);
- ``tst``, ``acc``, ``rad``, ``wtst`` may be numbers or numeric strings (the booklet's own examples
  send ``"rad": "50"`` and ``"tst": "1385997757"``);
- a missing ``acc`` (Android leaves zero out) or ``acc: 0`` means unknown: the state machine
  assumes about 50 m. A negative ``acc`` marks the coordinates themselves as invalid (Core
  Location's convention; Queclink trackers send -1 without a fix): the message is accepted and
  no fix is taken from it;
- ``lwt`` arrives on the location topic and is never a fix; cards, waypoints, commands and types
  this module does not know are accepted and ignored;
- transitions are hints: the phone's idea of its own regions decides nothing. Where a circular
  region transition carries a position it is a fix like any other; a beacon transition's
  position is only the last one the phone had, so it is not used.

The MQTT topic names the user and device; a ``topic`` field inside the payload (HTTP mode) is
used only when there is no MQTT topic (imports), never to override it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import nacl.exceptions
import nacl.secret
import nacl.utils

from meshchat.errors import EnvelopeError, TopicError
from meshchat.geofence.rules import MAX_TIMESTAMP, Fix
from meshchat.topics import OwnTracksTopic, parse_topic

__all__ = [
    "DECRYPT_REASONS",
    "KEY_LEN",
    "MAX_PAYLOAD",
    "Command",
    "Ignored",
    "LastWill",
    "Location",
    "OwnTracksError",
    "OwnTracksMessage",
    "RecLine",
    "Region",
    "Transition",
    "Waypoints",
    "derive_key",
    "encrypt_payload",
    "parse_payload",
    "parse_rec_line",
    "region_id",
    "set_waypoints",
]

MAX_PAYLOAD: Final = 64 * 1024
"""The largest OwnTracks payload accepted (a card with a face photo is the biggest one)."""
KEY_LEN: Final = nacl.secret.SecretBox.KEY_SIZE
_NONCE_LEN: Final = nacl.secret.SecretBox.NONCE_SIZE
_MAC_LEN: Final = nacl.secret.SecretBox.MACBYTES
_MAX_WAYPOINTS: Final = 1000
_MAX_TEXT: Final = 256
_COERCIBLE: Final = frozenset({"tst", "acc", "rad", "wtst"})


class OwnTracksError(EnvelopeError):
    """An OwnTracks payload was refused.

    Attributes:
        reason: a short machine-readable reason: ``"too-large"``, ``"not-json"``,
            ``"bad-field"``, ``"no-topic"``, ``"no-key"``, ``"bad-base64"``, ``"too-short"`` or
            ``"bad-ciphertext"``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        """Create the error with its reason."""
        super().__init__(message)
        self.reason = reason


DECRYPT_REASONS: Final = frozenset({"no-key", "bad-base64", "too-short", "bad-ciphertext"})
"""The reasons that mean an encrypted payload could not be opened."""


@dataclass(frozen=True, slots=True)
class Location:
    """A ``location`` message.

    Attributes:
        user: the OwnTracks user (a directory user).
        device: the OwnTracks device.
        fix: the fix, or None when the message marks its coordinates invalid.
        trigger: the app's ``t`` (``p`` ping, ``u`` manual, ``c`` region, ...), if any.
        encrypted: whether it arrived encrypted.
    """

    user: str
    device: str
    fix: Fix | None
    trigger: str | None = None
    encrypted: bool = False


@dataclass(frozen=True, slots=True)
class Transition:
    """A ``transition`` message: a hint that the phone thinks it entered or left a region.

    Attributes:
        user: the OwnTracks user.
        device: the OwnTracks device.
        event: ``enter`` or ``leave``.
        region: the region's ``desc``, if any.
        fix: the position where it fired, for circular regions; None for beacons.
        encrypted: whether it arrived encrypted.
    """

    user: str
    device: str
    event: str
    region: str | None
    fix: Fix | None
    encrypted: bool = False


@dataclass(frozen=True, slots=True)
class LastWill:
    """An ``lwt`` message: the broker says the phone's connection dropped."""

    user: str
    device: str
    tst: float | None


@dataclass(frozen=True, slots=True)
class Region:
    """One OwnTracks waypoint (a circular region).

    Attributes:
        desc: its name.
        lat: centre latitude.
        lon: centre longitude.
        rad: radius in metres.
        tst: when it was created (its identity in the apps).
        rid: the region id, if any.
    """

    desc: str
    lat: float
    lon: float
    rad: float
    tst: int
    rid: str | None = None


@dataclass(frozen=True, slots=True)
class Waypoints:
    """A ``waypoint`` or ``waypoints`` message: regions the phone defined.

    Regions never become sites; iOS's dynamic ``+follow`` regions are dropped.
    """

    user: str
    device: str
    regions: tuple[Region, ...]


@dataclass(frozen=True, slots=True)
class Command:
    """A ``cmd`` message (what a backend sends to a phone, e.g. ``setWaypoints``)."""

    user: str
    device: str
    action: str
    regions: tuple[Region, ...] = ()


@dataclass(frozen=True, slots=True)
class Ignored:
    """A well-formed message of a type the geofence has no use for (``card``, ``steps``, ...)."""

    user: str
    device: str
    type: str


OwnTracksMessage = Location | Transition | LastWill | Waypoints | Command | Ignored
KeyLookup = Callable[[str, str], bytes | None]


def derive_key(secret: str) -> bytes:
    """The secretbox key of an OwnTracks passphrase: UTF-8, cut to 32 bytes, zero-padded.

    Raises:
        ValueError: the passphrase is empty.
    """
    raw = secret.encode("utf-8")
    if not raw:
        raise ValueError("the OwnTracks encryption passphrase is empty")
    return raw[:KEY_LEN].ljust(KEY_LEN, b"\0")


def encrypt_payload(key: bytes, plaintext: bytes, *, nonce: bytes | None = None) -> bytes:
    """The ``encrypted`` JSON message carrying `plaintext`, as the apps expect it."""
    box = nacl.secret.SecretBox(key)
    sealed = box.encrypt(plaintext, nonce or nacl.utils.random(_NONCE_LEN))
    data = base64.b64encode(bytes(sealed)).decode("ascii")
    return json.dumps({"_type": "encrypted", "data": data}, separators=(",", ":")).encode()


def _decrypt(data: object, key: bytes | None) -> bytes:
    if not isinstance(data, str):
        raise OwnTracksError("an encrypted message's data must be a string", reason="bad-field")
    if key is None:
        raise OwnTracksError(
            "an encrypted message arrived for a device with no registered key "
            "(`meshchat site owntracks-key USER DEVICE`)",
            reason="no-key",
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise OwnTracksError(f"encrypted data is not base64: {exc}", reason="bad-base64") from exc
    if len(raw) < _NONCE_LEN + _MAC_LEN:
        raise OwnTracksError(
            f"encrypted data is {len(raw)} bytes, shorter than a nonce and a tag",
            reason="too-short",
        )
    try:
        return bytes(nacl.secret.SecretBox(key).decrypt(raw[_NONCE_LEN:], raw[:_NONCE_LEN]))
    except nacl.exceptions.CryptoError as exc:
        raise OwnTracksError(
            "encrypted data does not open with the device's key", reason="bad-ciphertext"
        ) from exc


def _refuse_constant(name: str) -> float:
    raise OwnTracksError(f"{name} is not a JSON number", reason="not-json")


def _load(payload: bytes) -> dict[str, object]:
    if len(payload) > MAX_PAYLOAD:
        raise OwnTracksError(
            f"payload is {len(payload)} bytes; at most {MAX_PAYLOAD} are accepted",
            reason="too-large",
        )
    try:
        document = json.loads(payload, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise OwnTracksError(f"payload is not JSON: {exc}", reason="not-json") from exc
    if not isinstance(document, dict):
        raise OwnTracksError("payload is not a JSON object", reason="not-json")
    return document


def _number(document: dict[str, object], name: str, *, required: bool = False) -> float | None:
    value = document.get(name)
    if value is None:
        if required:
            raise OwnTracksError(f"{name} is missing", reason="bad-field")
        return None
    if isinstance(value, str) and name in _COERCIBLE and len(value) <= 32:
        text = value
        try:
            value = float(text)
        except ValueError:
            raise OwnTracksError(f"{name} {text!r} is not a number", reason="bad-field") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OwnTracksError(f"{name} must be a number", reason="bad-field")
    number = float(value)
    if not math.isfinite(number):
        raise OwnTracksError(f"{name} is not a finite number", reason="bad-field")
    return number


def _text(document: dict[str, object], name: str) -> str | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise OwnTracksError(f"{name} must be a string", reason="bad-field")
    return value[:_MAX_TEXT]


def _timestamp(document: dict[str, object], name: str, *, required: bool) -> float | None:
    ts = _number(document, name, required=required)
    if ts is not None and not 0 < ts < MAX_TIMESTAMP:
        raise OwnTracksError(f"{name} {ts:g} is not a unix time", reason="bad-field")
    return ts


def _position(document: dict[str, object]) -> tuple[float, float]:
    lat = _number(document, "lat", required=True)
    lon = _number(document, "lon", required=True)
    assert lat is not None
    assert lon is not None
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise OwnTracksError(f"position ({lat:g}, {lon:g}) is out of range", reason="bad-field")
    return lat, lon


def _fix(document: dict[str, object], ts: float) -> Fix | None:
    lat, lon = _position(document)
    acc = _number(document, "acc")
    if acc is not None and acc < 0:
        return None  # the device marks these coordinates invalid
    return Fix(ts, lat, lon, acc)


def _identity(topic: str | None, document: dict[str, object]) -> OwnTracksTopic:
    source = topic
    if source is None:
        inner = document.get("topic")
        if not isinstance(inner, str):
            raise OwnTracksError("no topic names the user and device", reason="no-topic")
        source = inner
    try:
        parsed = parse_topic(source)
    except TopicError as exc:
        raise OwnTracksError(str(exc), reason="no-topic") from exc
    if not isinstance(parsed, OwnTracksTopic):
        raise OwnTracksError(f"{source!r} is not an OwnTracks topic", reason="no-topic")
    return parsed


def _regions(items: object) -> tuple[Region, ...]:
    if not isinstance(items, list) or len(items) > _MAX_WAYPOINTS:
        raise OwnTracksError(
            f"waypoints must be a list of at most {_MAX_WAYPOINTS}", reason="bad-field"
        )
    regions = []
    for item in items:
        if not isinstance(item, dict):
            raise OwnTracksError("a waypoint must be a JSON object", reason="bad-field")
        region = _region(item)
        if region is not None:
            regions.append(region)
    return tuple(regions)


def _region(document: dict[str, object]) -> Region | None:
    desc = _text(document, "desc") or ""
    if desc.startswith("+follow"):
        return None  # iOS moves these with the phone: they are no place
    lat, lon = _position(document)
    rad = _number(document, "rad") or 0.0
    tst = _timestamp(document, "tst", required=True)
    assert tst is not None
    if rad < 0:
        raise OwnTracksError(f"rad {rad:g} is negative", reason="bad-field")
    return Region(desc, lat, lon, rad, int(tst), _text(document, "rid"))


def parse_payload(
    payload: bytes,
    topic: str | None,
    *,
    keys: KeyLookup | None = None,
) -> OwnTracksMessage:
    """Parse one OwnTracks payload that arrived on `topic` (None: take it from the payload).

    Args:
        payload: the MQTT payload (or an HTTP body).
        topic: the MQTT topic, ``owntracks/{user}/{device}[/{suffix}]``.
        keys: the secretbox key of a (user, device), for encrypted payloads.

    Raises:
        OwnTracksError: the payload is refused; `OwnTracksError.reason` says why.
    """
    document = _load(payload)
    identity = _identity(topic, document)
    encrypted = False
    if document.get("_type") == "encrypted":
        key = keys(identity.user, identity.device) if keys is not None else None
        document = _load(_decrypt(document.get("data"), key))
        encrypted = True
        if document.get("_type") == "encrypted":
            raise OwnTracksError("an encrypted message inside an encrypted one", reason="bad-field")
    kind = document.get("_type")
    if not isinstance(kind, str):
        raise OwnTracksError("_type is missing", reason="bad-field")
    parser = _PARSERS.get(kind)
    if parser is None:
        return Ignored(identity.user, identity.device, kind[:_MAX_TEXT])
    return parser(identity.user, identity.device, document, encrypted)


def _location(user: str, device: str, document: dict[str, object], encrypted: bool) -> Location:
    ts = _timestamp(document, "tst", required=True)
    assert ts is not None
    return Location(user, device, _fix(document, ts), _text(document, "t"), encrypted)


def _lwt(user: str, device: str, document: dict[str, object], _encrypted: bool) -> LastWill:
    return LastWill(user, device, _timestamp(document, "tst", required=False))


def _waypoint(user: str, device: str, document: dict[str, object], _encrypted: bool) -> Waypoints:
    region = _region(document)
    return Waypoints(user, device, () if region is None else (region,))


def _waypoints(user: str, device: str, document: dict[str, object], _encrypted: bool) -> Waypoints:
    return Waypoints(user, device, _regions(document.get("waypoints")))


def _command(user: str, device: str, document: dict[str, object], _encrypted: bool) -> Command:
    action = _text(document, "action")
    if action is None:
        raise OwnTracksError("a cmd message needs an action", reason="bad-field")
    regions: tuple[Region, ...] = ()
    if action == "setWaypoints":
        inner = document.get("waypoints")
        if not isinstance(inner, dict):
            raise OwnTracksError("setWaypoints needs waypoints", reason="bad-field")
        regions = _regions(inner.get("waypoints"))
    return Command(user, device, action, regions)


def _transition(user: str, device: str, document: dict[str, object], encrypted: bool) -> Transition:
    event = _text(document, "event")
    if event not in {"enter", "leave"}:
        raise OwnTracksError(
            f"transition event {event!r} is not enter or leave", reason="bad-field"
        )
    ts = _timestamp(document, "tst", required=True)
    assert ts is not None
    _timestamp(document, "wtst", required=False)
    # Check the position even when it is not used: a transition with a bad one is refused.
    fix = _fix(document, ts)
    if _text(document, "t") == "b":
        fix = None  # beacon: the position is merely the phone's last one
    return Transition(user, device, event, _text(document, "desc"), fix, encrypted)


_PARSERS: Final[dict[str, Callable[[str, str, dict[str, object], bool], OwnTracksMessage]]] = {
    "location": _location,
    "transition": _transition,
    "lwt": _lwt,
    "waypoint": _waypoint,
    "waypoints": _waypoints,
    "cmd": _command,
}


@dataclass(frozen=True, slots=True)
class RecLine:
    """One line of an OwnTracks Recorder ``.rec`` file.

    Attributes:
        time: the ISO 8601 time the Recorder stored it.
        kind: ``*`` for a location message, otherwise the topic's suffix (``event``, ...).
        payload: the JSON payload as received.
    """

    time: str
    kind: str
    payload: bytes

    def topic(self, user: str, device: str) -> str:
        """The MQTT topic the payload arrived on, for a file of `user`'s `device`."""
        base = f"owntracks/{user}/{device}"
        return base if self.kind in {"*", ""} else f"{base}/{self.kind}"


def parse_rec_line(line: str) -> RecLine:
    """Split a Recorder line (``time TAB kind TAB json``; the kind is padded with spaces).

    Raises:
        OwnTracksError: the line does not have the three fields.
    """
    parts = line.rstrip("\r\n").split("\t", 2)
    if len(parts) != 3 or not parts[0].strip() or not parts[2].strip():
        raise OwnTracksError("a .rec line is TIME<TAB>KIND<TAB>JSON", reason="not-json")
    return RecLine(parts[0].strip(), parts[1].strip(), parts[2].encode("utf-8"))


def region_id(site: str) -> str:
    """The OwnTracks region id of a site (stable, so a second push updates, not duplicates)."""
    return f"meshchat-{site}"


def set_waypoints(regions: Iterable[Region]) -> bytes:
    """The ``cmd`` message that makes a phone monitor `regions` (``setWaypoints``).

    Phones report transitions for them; the geofence treats those as hints.
    """
    waypoints = [
        {
            "_type": "waypoint",
            "desc": region.desc,
            "lat": round(region.lat, 7),
            "lon": round(region.lon, 7),
            "rad": max(1, math.ceil(region.rad)),
            "tst": region.tst,
            **({"rid": region.rid} if region.rid else {}),
        }
        for region in regions
    ]
    message = {
        "_type": "cmd",
        "action": "setWaypoints",
        "waypoints": {"_type": "waypoints", "_creator": "meshchat", "waypoints": waypoints},
    }
    return json.dumps(message, separators=(",", ":")).encode()
