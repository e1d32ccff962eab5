"""Device telemetry, sans-IO: the status and GPS fix schemas, their compact codec, key shares.

A report is msgpack, schema-checked both ways: building a `Status` or `GpsFix` with a bad field
raises `TelemetryError` naming the field (on the device, before anything is sent), and a reader
that opens a report that breaks the schema gets the same error (and drops the report).

Wire forms (before encryption; `meshchat.e2ee.telemetry` seals them):

- GPS fix, an array of 7: ``[ts, lat_e7, lon_e7, accuracy_m, speed_cm_s, heading_deg, battery]``
  where latitude and longitude are integers of 1e-7 degrees (about 1 cm), accuracy whole metres
  (rounded up), speed centimetres per second, heading whole degrees, battery percent; the last
  four may be nil. A full fix is 24 to 28 bytes, 54 to 58 once sealed.
- Status, a map with small integer keys, absent fields left out: ``0`` ts, ``1`` battery (%),
  ``2`` temperature (tenths of a degree Celsius), ``3`` load (tenths of a percent), ``4`` signal
  (dBm), ``5`` uptime (s), ``6`` state (text), ``7`` extra (a map of name to number, text or
  boolean, for what a device reports beyond these).

The geofence worker calls `open_key_share` on what a device publishes on
``mc/{org}/_s/geofence/{device}`` (retained), then `decode_fix` on each payload of
``mc/{org}/_t/{device}/gps``. Dispatchers' clients get the key in their inbox instead, as a
`Kind.TELEMETRY_KEY` direct message, and read through a `TelemetryKeyring`. A reader that
gets a report under a key it never received asks the device for it (`seal_key_request`, the same
kind without keys); the device answers its current readers only, once per key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import msgpack

from meshchat.e2ee import (
    BoxKeyPair,
    Inner,
    Kind,
    PairKind,
    SigningKeyPair,
    decode_inner,
    encode_inner,
    open_pairwise,
    seal_pairwise,
)
from meshchat.e2ee.telemetry import (
    OpenedTelemetry,
    TelemetryKey,
    open_telemetry,
    telemetry_topic,
)
from meshchat.envelope import Sealed, Telemetry, decode, encode
from meshchat.errors import DecryptError, EnvelopeError, TelemetryError
from meshchat.topics import ServiceTopic, TelemetryTopic
from meshchat.wire import unpack

__all__ = [
    "GEOFENCE_READER",
    "MAX_EXTRA",
    "MAX_STATE_LEN",
    "ExtraValue",
    "GpsFix",
    "Report",
    "Status",
    "decode_fix",
    "decode_gps",
    "decode_status",
    "encode_gps",
    "encode_status",
    "geofence_share_topic",
    "is_key_request",
    "key_from_inner",
    "key_request_inner",
    "key_share_inner",
    "open_key_share",
    "read_report",
    "seal_key_request",
    "seal_key_share",
]

GEOFENCE_READER: Final = "geofence"
"""The recipient name of the geofence worker's key share (and its service name)."""
MAX_STATE_LEN: Final = 64
MAX_EXTRA: Final = 16
"""Extra status fields per report."""
MAX_TS: Final = 2**32 - 1
_EXTRA_NAME: Final = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,31}\Z")
_MAX_PLAINTEXT: Final = 2048
_E7: Final = 10_000_000

ExtraValue: TypeAlias = int | float | str | bool


def _bad(field_name: str, message: str) -> TelemetryError:
    return TelemetryError(message, field=field_name)


def _ts(value: object) -> int:
    if type(value) is not int or not 0 < value <= MAX_TS:
        raise _bad("ts", f"ts {value!r} must be unix seconds (an integer, 1..2**32-1)")
    return value


def _number(value: object, name: str, low: float, high: float, unit: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or not low <= value <= high:
        raise _bad(name, f"{name} {value!r} is outside {low:g}..{high:g}{unit}")
    return float(value)


def _integer(value: object, name: str, low: int, high: int, unit: str = "") -> int:
    if type(value) is not int:
        raise _bad(name, f"{name} must be a whole number, not {type(value).__name__}")
    if not low <= value <= high:
        raise _bad(name, f"{name} {value} is outside {low}..{high}{unit}")
    return value


def _text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _bad(name, f"{name} must be text, not {type(value).__name__}")
    if len(value) > limit:
        raise _bad(name, f"{name} is {len(value)} characters; the limit is {limit}")
    return value


# ----------------------------------------------------------------------------------- GPS fix


@dataclass(frozen=True, slots=True)
class GpsFix:
    """One position report of a device.

    Attributes:
        ts: when it was measured (unix seconds, the device's clock).
        lat: latitude in degrees (kept to 1e-7 degrees on the wire).
        lon: longitude in degrees.
        accuracy: accuracy radius in metres (sent rounded up to whole metres); None if unknown.
        speed: ground speed in metres per second (to 1 cm/s); None if unknown.
        heading: course over ground in degrees, 0 to below 360 (whole degrees); None if unknown.
        battery: battery charge in percent; None if unknown.
    """

    ts: int
    lat: float
    lon: float
    accuracy: float | None = None
    speed: float | None = None
    heading: float | None = None
    battery: int | None = None

    def __post_init__(self) -> None:
        """Check every field; the error names the first bad one.

        Raises:
            TelemetryError: a field is missing, of the wrong type or out of range.
        """
        _ts(self.ts)
        _number(self.lat, "lat", -90.0, 90.0, " degrees")
        _number(self.lon, "lon", -180.0, 180.0, " degrees")
        if self.accuracy is not None:
            _number(self.accuracy, "accuracy", 0.0, 65_535.0, " m")
        if self.speed is not None:
            _number(self.speed, "speed", 0.0, 1_000.0, " m/s")
        if self.heading is not None:
            _number(self.heading, "heading", 0.0, 360.0, " degrees")
        if self.battery is not None:
            _integer(self.battery, "battery", 0, 100, " %")


def encode_gps(fix: GpsFix) -> bytes:
    """The fix's compact plaintext (24 to 28 bytes when every field is given)."""
    fields: list[object] = [
        fix.ts,
        round(fix.lat * _E7),
        round(fix.lon * _E7),
        None if fix.accuracy is None else math.ceil(fix.accuracy),
        None if fix.speed is None else round(fix.speed * 100),
        None if fix.heading is None else round(fix.heading) % 360,
        fix.battery,
    ]
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def _unpack(data: bytes, what: str) -> object:
    if len(data) > _MAX_PLAINTEXT:
        raise TelemetryError(f"{what} is {len(data)} bytes; the limit is {_MAX_PLAINTEXT}")
    return unpack(
        data,
        what,
        strict_map_key=False,
        max_str=_MAX_PLAINTEXT,
        max_bin=0,
        max_array=8,
        max_map=MAX_EXTRA,
        error=TelemetryError,
    )


def _optional_int(value: object, name: str, low: int, high: int) -> int | None:
    return None if value is None else _integer(value, name, low, high)


def decode_gps(data: bytes) -> GpsFix:
    """A fix from its plaintext.

    Raises:
        TelemetryError: malformed, or a field breaks the schema (named in the message).
    """
    items = _unpack(data, "GPS fix")
    if not isinstance(items, list) or len(items) != 7:
        raise TelemetryError("a GPS fix must be an array of 7 fields")
    ts, lat, lon, accuracy, speed, heading, battery = items
    lat_e7 = _integer(lat, "lat", -90 * _E7, 90 * _E7)
    lon_e7 = _integer(lon, "lon", -180 * _E7, 180 * _E7)
    acc = _optional_int(accuracy, "accuracy", 0, 65_535)
    cms = _optional_int(speed, "speed", 0, 100_000)
    deg = _optional_int(heading, "heading", 0, 359)
    return GpsFix(
        ts=_ts(ts),
        lat=lat_e7 / _E7,
        lon=lon_e7 / _E7,
        accuracy=None if acc is None else float(acc),
        speed=None if cms is None else cms / 100,
        heading=None if deg is None else float(deg),
        battery=_optional_int(battery, "battery", 0, 100),
    )


# ------------------------------------------------------------------------------------ status


def _extra(extra: Mapping[str, ExtraValue]) -> dict[str, ExtraValue]:
    if not isinstance(extra, Mapping):
        raise _bad("extra", f"extra must be a mapping of names to values, not {type(extra)}")
    if len(extra) > MAX_EXTRA:
        raise _bad("extra", f"{len(extra)} extra fields; the limit is {MAX_EXTRA}")
    checked: dict[str, ExtraValue] = {}
    for name, value in extra.items():
        if type(name) is not str or not _EXTRA_NAME.match(name):
            raise _bad(
                "extra", f"extra field name {name!r} must be 1-32 characters of a-z, 0-9, _ and -"
            )
        where = f"extra.{name}"
        if isinstance(value, bool):
            checked[name] = value
        elif isinstance(value, int):
            checked[name] = _integer(value, where, -(2**63), 2**64 - 1)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _bad(where, f"{where} {value!r} is not a finite number")
            checked[name] = value
        elif isinstance(value, str):
            checked[name] = _text(value, where, MAX_STATE_LEN)
        else:
            raise _bad(
                where, f"{where} must be a number, text or boolean, not {type(value).__name__}"
            )
    return checked


@dataclass(frozen=True, slots=True)
class Status:
    """A device's status report (published retained: the last one is always there).

    Attributes:
        ts: when it was taken (unix seconds, the device's clock).
        battery: battery charge in percent.
        temperature: temperature in degrees Celsius (to 0.1), -100 to 200.
        load: load in percent (to 0.1), for gateways and PLCs.
        signal: radio signal strength in dBm, -200 to 0.
        uptime: seconds since the device started.
        state: a short word or phrase (``"ok"``, ``"door open"``), at most 64 characters.
        extra: up to 16 further readings by name (a-z, 0-9, ``_``, ``-``): numbers, text up to
            64 characters, or booleans.
    """

    ts: int
    battery: int | None = None
    temperature: float | None = None
    load: float | None = None
    signal: int | None = None
    uptime: int | None = None
    state: str | None = None
    extra: Mapping[str, ExtraValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every field; the error names the first bad one.

        Raises:
            TelemetryError: a field is of the wrong type or out of range.
        """
        _ts(self.ts)
        if self.battery is not None:
            _integer(self.battery, "battery", 0, 100, " %")
        if self.temperature is not None:
            _number(self.temperature, "temperature", -100.0, 200.0, " degrees C")
        if self.load is not None:
            _number(self.load, "load", 0.0, 100.0, " %")
        if self.signal is not None:
            _integer(self.signal, "signal", -200, 0, " dBm")
        if self.uptime is not None:
            _integer(self.uptime, "uptime", 0, MAX_TS, " s")
        if self.state is not None:
            _text(self.state, "state", MAX_STATE_LEN)
        object.__setattr__(self, "extra", _extra(self.extra))


def encode_status(status: Status) -> bytes:
    """The status's compact plaintext: only the fields it has."""
    fields: dict[int, object] = {0: status.ts}
    if status.battery is not None:
        fields[1] = status.battery
    if status.temperature is not None:
        fields[2] = round(status.temperature * 10)
    if status.load is not None:
        fields[3] = round(status.load * 10)
    if status.signal is not None:
        fields[4] = status.signal
    if status.uptime is not None:
        fields[5] = status.uptime
    if status.state is not None:
        fields[6] = status.state
    if status.extra:
        fields[7] = dict(status.extra)
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


_STATUS_KEYS: Final = frozenset(range(8))


def decode_status(data: bytes) -> Status:
    """A status from its plaintext.

    Raises:
        TelemetryError: malformed, an unknown field, or a field breaks the schema.
    """
    items = _unpack(data, "status")
    if not isinstance(items, dict):
        raise TelemetryError("a status must be a map of fields")
    unknown = [key for key in items if type(key) is not int or key not in _STATUS_KEYS]
    if unknown:
        raise TelemetryError(f"status has unknown field {unknown[0]!r}", field=str(unknown[0]))
    if 0 not in items:
        raise _bad("ts", "status has no ts")
    temperature = _optional_int(items.get(2), "temperature", -1000, 2000)
    load = _optional_int(items.get(3), "load", 0, 1000)
    extra = items.get(7, {})
    if not isinstance(extra, dict):
        raise _bad("extra", "status extra must be a map")
    return Status(
        ts=_ts(items[0]),
        battery=_optional_int(items.get(1), "battery", 0, 100),
        temperature=None if temperature is None else temperature / 10,
        load=None if load is None else load / 10,
        signal=_optional_int(items.get(4), "signal", -200, 0),
        uptime=_optional_int(items.get(5), "uptime", 0, MAX_TS),
        state=None if items.get(6) is None else _text(items[6], "state", MAX_STATE_LEN),
        extra=extra,
    )


Report: TypeAlias = Status | GpsFix


def read_report(opened: OpenedTelemetry) -> Report:
    """The status or fix in a report a `TelemetryKeyring` opened.

    Raises:
        TelemetryError: it breaks the schema of its kind.
    """
    if opened.kind == "gps":
        return decode_gps(opened.plaintext)
    return decode_status(opened.plaintext)


def decode_fix(payload: bytes, *, topic: TelemetryTopic | str, key: TelemetryKey) -> GpsFix:
    """Open and decode one GPS fix: the geofence worker's hook.

    Sans-IO and stateless: it does not track which fixes were seen (the geofence judges fixes by
    their own timestamps).

    Args:
        payload: what arrived on ``mc/{org}/_t/{device}/gps``.
        topic: that topic (its device and kind are authenticated).
        key: the device's telemetry key, from `open_key_share` (a fixes-only copy is enough).

    Raises:
        EnvelopeError: not a telemetry envelope, or not a GPS topic.
        DecryptError: another key (``unknown-key``) or it fails authentication.
        TelemetryError: the fix breaks the schema.
    """
    parsed = telemetry_topic(topic)
    if parsed.kind != "gps":
        raise EnvelopeError(f"{parsed.topic} is not a GPS topic")
    envelope = decode(payload)
    if not isinstance(envelope, Telemetry):
        raise EnvelopeError(f"{type(envelope).__name__} envelope on a telemetry topic")
    return decode_gps(open_telemetry(envelope, parsed, key))


# ------------------------------------------------------------------------------- key shares


def key_share_inner(key: TelemetryKey, *, ts: int) -> Inner:
    """The direct message that gives a reader a telemetry key."""
    return Inner(Kind.TELEMETRY_KEY, ts, (key.key_id, key.gps, key.status or b""))


def key_request_inner(key_id: int, *, ts: int) -> Inner:
    """A reader's request for a key it lacks: a `Kind.TELEMETRY_KEY` message without keys."""
    return Inner(Kind.TELEMETRY_KEY, ts, (key_id, b"", b""))


def is_key_request(inner: Inner) -> bool:
    """Whether a `Kind.TELEMETRY_KEY` message asks for a key rather than gives one."""
    return inner.kind is Kind.TELEMETRY_KEY and inner.fields[1] == b""


def key_from_inner(inner: Inner) -> TelemetryKey:
    """The key in a `Kind.TELEMETRY_KEY` message.

    Raises:
        EnvelopeError: it is another kind, or the keys have the wrong length.
    """
    if inner.kind is not Kind.TELEMETRY_KEY:
        raise EnvelopeError(f"a {inner.kind.name.lower()} message is not a telemetry key")
    key_id, gps, status = inner.fields
    assert isinstance(key_id, int)
    assert isinstance(gps, bytes)
    assert isinstance(status, bytes)
    try:
        return TelemetryKey(key_id, gps, status or None)
    except Exception as exc:
        raise EnvelopeError(f"the telemetry key message is malformed: {exc}") from exc


def geofence_share_topic(org: str, device: str) -> str:
    """Where a device leaves its key for the geofence worker (retained, sealed to the worker)."""
    return ServiceTopic(org, GEOFENCE_READER, device).topic


def seal_key_share(
    key: TelemetryKey,
    *,
    device: str,
    signing: SigningKeyPair,
    recipient: str,
    recipient_box: bytes,
    ts: int,
) -> bytes:
    """A key share for one reader: sealed to its X25519 key, signed by the device.

    Returns:
        The `Sealed` envelope to publish (to the reader's inbox, or the geofence's share topic).
    """
    sealed = seal_pairwise(
        sender=device,
        sender_key=signing,
        recipient=recipient,
        recipient_box=recipient_box,
        kind=PairKind.DIRECT,
        fields=(encode_inner(key_share_inner(key, ts=ts)),),
    )
    return encode(sealed)


def seal_key_request(
    key_id: int,
    *,
    sender: str,
    signing: SigningKeyPair,
    device: str,
    device_box: bytes,
    ts: int,
) -> bytes:
    """A reader's request to `device` for its telemetry key `key_id` (sealed, signed).

    A reader asks when a report arrives under a key it never got (the share went to its inbox
    before its device first connected, say). The device answers readers only, once per key.
    """
    sealed = seal_pairwise(
        sender=sender,
        sender_key=signing,
        recipient=device,
        recipient_box=device_box,
        kind=PairKind.DIRECT,
        fields=(encode_inner(key_request_inner(key_id, ts=ts)),),
    )
    return encode(sealed)


def open_key_share(
    payload: bytes,
    *,
    reader: BoxKeyPair,
    signing_key: Callable[[str], bytes | None],
    recipient: str = GEOFENCE_READER,
) -> tuple[str, TelemetryKey]:
    """Verify and open a key share sent to `recipient` (the geofence worker by default).

    Args:
        payload: the retained message on ``mc/{org}/_s/geofence/{device}``.
        reader: the reader's X25519 key.
        signing_key: the Ed25519 public key of a device by name (from its verified key record
            or the directory), or None for a device that is unknown or revoked.
        recipient: the reader's name, as the device sealed it.

    Returns:
        The device's name (authenticated by its signature) and its key.

    Raises:
        DecryptError: unknown device, bad signature, sealed to someone else.
        EnvelopeError: not a key share.
    """
    envelope = decode(payload)
    if not isinstance(envelope, Sealed):
        raise EnvelopeError(f"a key share is a sealed envelope, not {type(envelope).__name__}")
    public = signing_key(envelope.sender)
    if public is None:
        raise DecryptError(
            f"key share from unknown or revoked device {envelope.sender}", reason="unknown-sender"
        )
    opened = open_pairwise(envelope, recipient=recipient, box_key=reader, sender_key=public)
    if opened.kind is not PairKind.DIRECT:
        raise EnvelopeError(f"a key share is a direct payload, not {opened.kind.name.lower()}")
    raw = opened.fields[0]
    assert isinstance(raw, bytes)
    return envelope.sender, key_from_inner(decode_inner(raw))
