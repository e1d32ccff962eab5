"""The compact telemetry profile: a device's status and GPS fixes under a per-device key, sans-IO.

A GPS fix must fit 100 bytes of MQTT payload on a thin link; the signed group profile spends 64
bytes on a signature alone. Telemetry therefore uses its own profile:

- Each device makes a fresh `TelemetryKey` every time it starts (never restored from a file, so a
  counter is never reused after a crash or a restored backup) and again when a reader leaves.
  The key is two random 32-byte keys, one per kind (``status``, ``gps``), and a random 32-bit id.
- The device sends the key to each reader over the pairwise channel: sealed to the reader's
  X25519 key and signed by the device's Ed25519 key (`meshchat.device.telemetry` builds the
  payload). Readers are the devices of the people in the device's dispatch groups, which get
  both kinds, and the geofence worker, which gets the ``gps`` key only.
- Each report is one `Telemetry` envelope: XChaCha20-Poly1305 under the kind's key, the nonce
  being the key's message counter (24 bytes: 16 zero bytes and the counter, big-endian), the AAD
  binding header, key id, counter and the topic (org, device and kind), so a report cannot be
  moved to another device's or kind's topic. 26 to 30 bytes of overhead in all (header, array,
  key id, counter, bin header, tag); a full GPS fix is under 60 bytes on the wire.

Authenticity, stated plainly: there is no per-message signature. The tag proves a report was
made by someone holding the device's telemetry key: the device, or any current reader of that
key (a dispatcher's device, or the geofence worker for fixes). A reader could therefore forge
telemetry in the device's name; it would still have to get it past the broker, whose access
policy lets only the device publish on its own ``_t`` topics. The broker and the archiver hold no
telemetry key and can neither read nor forge a report; they can withhold, delay or replay one,
which readers notice by key id and counter (`TelemetryKeyring` flags reports that are not newer
than one already read) and by the report's own timestamp. Work orders, acknowledgements and
alerts are not telemetry: they travel signed like any message.

The geofence worker's reader key, and how a device knows it is the worker's: the worker holds
an X25519 key of its own (``DATA/keys/geofence-telemetry.key``). Its `ReaderCert` binds that key
to the org, signed with the geofence worker's roster key, which the org root already certifies
in the trust bundle (signer ``geofence``). The worker publishes the certificate retained on
``mc/{org}/_s/geofence``; a device checks it against the trust bundle it got with its
credentials (`open_reader_cert`) before it seals a key share to that key, so neither the broker
nor anyone else can slip a key of their own in. The trust bundle and its root are untouched:
no passphrase is needed to make, renew or replace the reader key.
"""

from __future__ import annotations

import enum
import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final, Self

import msgpack
import nacl.bindings
import nacl.exceptions

from meshchat.e2ee.keys import SigningKeyPair, verify
from meshchat.e2ee.trust import OrgTrust
from meshchat.envelope import Telemetry, decode, encode
from meshchat.errors import DecryptError, E2EEError, EnvelopeError, TopicError
from meshchat.topics import TelemetryTopic, parse_topic
from meshchat.wire import unpack

__all__ = [
    "MAX_PARKED",
    "MAX_TELEMETRY_KEY_AGE",
    "MAX_TELEMETRY_MESSAGES",
    "READER_SIGNER",
    "OpenedTelemetry",
    "ReaderCert",
    "TelemetryKey",
    "TelemetryKeyring",
    "TelemetrySealer",
    "certify_reader",
    "open_reader_cert",
    "open_telemetry",
    "telemetry_topic",
]

KEY_LEN: Final = 32
NONCE_LEN: Final = 24
MAX_TELEMETRY_MESSAGES: Final = 2**32 - 1
"""A key's counter never passes this (the envelope field is 32 bits); the device rekeys first."""
MAX_TELEMETRY_KEY_AGE: Final = 7 * 24 * 3600
"""A device rekeys its telemetry at least this often (seconds), like a group chain."""
KEYS_PER_DEVICE: Final = 4
"""Keys a reader keeps per device: the current one and a few before it (late reports)."""
MAX_PARKED: Final = 64
"""Reports a reader keeps per device while it waits for their key."""
MAX_DEVICES: Final = 100_000
_AAD_DOMAIN: Final = b"mc-tlm-aad1"
_STATE_VERSION: Final = 1
READER_SIGNER: Final = "geofence"
"""The trust bundle's signer that certifies the geofence worker's telemetry reader key."""
_READER_DOMAIN: Final = b"mc-tlm-reader1"
_READER_VERSION: Final = 1
_MAX_READER_CERT: Final = 256


class _Kind(enum.StrEnum):
    STATUS = "status"
    GPS = "gps"


def telemetry_topic(topic: TelemetryTopic | str) -> TelemetryTopic:
    """The parsed telemetry topic.

    Raises:
        EnvelopeError: it is not a telemetry topic.
    """
    if isinstance(topic, TelemetryTopic):
        return topic
    try:
        parsed = parse_topic(topic)
    except TopicError as exc:
        raise EnvelopeError(f"not a telemetry topic: {exc}") from exc
    if not isinstance(parsed, TelemetryTopic):
        raise EnvelopeError(f"{topic!r} is not a telemetry topic")
    return parsed


@dataclass(frozen=True, slots=True)
class TelemetryKey:
    """One device's telemetry key: an id and a key per kind.

    Attributes:
        key_id: names the key in every envelope it sealed.
        gps: the key of GPS fixes.
        status: the key of status reports; None in the geofence worker's copy (fixes only).
    """

    key_id: int
    gps: bytes = field(repr=False)
    status: bytes | None = field(repr=False)

    def __post_init__(self) -> None:
        """Check the id and the key lengths."""
        if type(self.key_id) is not int or not 0 <= self.key_id <= 2**32 - 1:
            raise E2EEError(f"telemetry key id {self.key_id!r} is outside 0..2**32-1")
        if len(self.gps) != KEY_LEN or (self.status is not None and len(self.status) != KEY_LEN):
            raise E2EEError(f"telemetry keys are {KEY_LEN} bytes")

    @classmethod
    def generate(cls) -> Self:
        """A fresh random key (both kinds)."""
        return cls(secrets.randbits(32), secrets.token_bytes(KEY_LEN), secrets.token_bytes(KEY_LEN))

    def gps_only(self) -> TelemetryKey:
        """The copy for a reader of fixes only (the geofence worker)."""
        return TelemetryKey(self.key_id, self.gps, None)

    def key_for(self, kind: str) -> bytes:
        """The key of one kind.

        Raises:
            DecryptError: this copy does not hold that kind's key (``key-unavailable``).
        """
        if kind == _Kind.GPS:
            return self.gps
        if kind == _Kind.STATUS and self.status is not None:
            return self.status
        raise DecryptError(
            f"telemetry key {self.key_id} does not open {kind} reports", reason="key-unavailable"
        )


def _nonce(counter: int) -> bytes:
    return bytes(NONCE_LEN - 8) + struct.pack(">Q", counter)


def _aad(key_id: int, counter: int, topic: TelemetryTopic) -> bytes:
    return (
        _AAD_DOMAIN
        + Telemetry.header()
        + struct.pack(">II", key_id, counter)
        + topic.topic.encode("utf-8")
    )


@dataclass(slots=True)
class TelemetrySealer:
    """The sending side: one key and its counter. Never saved: a restart makes a new key."""

    key: TelemetryKey
    created_at: float
    counter: int = 0

    @classmethod
    def new(cls, *, now: float) -> Self:
        """A sealer with a fresh key."""
        return cls(TelemetryKey.generate(), now)

    def needs_rotation(self, *, now: float) -> bool:
        """Whether the key is worn out (counter exhausted, or older than a week)."""
        return (
            self.counter >= MAX_TELEMETRY_MESSAGES or now - self.created_at >= MAX_TELEMETRY_KEY_AGE
        )

    def seal(self, topic: TelemetryTopic, plaintext: bytes) -> bytes:
        """Encrypt one report for `topic`; returns the envelope to publish.

        Raises:
            E2EEError: the counter is exhausted (rotate first).
        """
        if self.counter >= MAX_TELEMETRY_MESSAGES:
            raise E2EEError("the telemetry key's counter is exhausted: rotate the key first")
        counter = self.counter
        self.counter += 1
        key_id = self.key.key_id
        box = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext, _aad(key_id, counter, topic), _nonce(counter), self.key.key_for(topic.kind)
        )
        return encode(Telemetry(key_id, counter, bytes(box)))


def open_telemetry(envelope: Telemetry, topic: TelemetryTopic, key: TelemetryKey) -> bytes:
    """Authenticate and decrypt one report.

    Args:
        envelope: the decoded envelope.
        topic: the topic it arrived on (device and kind are bound into the AAD).
        key: the device's key with `envelope.key_id`.

    Raises:
        DecryptError: another key id (``unknown-key``), a copy without this kind's key
            (``key-unavailable``), or it fails authentication (``bad-ciphertext``: forged,
            altered, or moved from another topic).
    """
    if envelope.key_id != key.key_id:
        raise DecryptError(
            f"report of {topic.device} is under telemetry key {envelope.key_id}, not {key.key_id}",
            reason="unknown-key",
        )
    try:
        plaintext: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            envelope.box,
            _aad(envelope.key_id, envelope.counter, topic),
            _nonce(envelope.counter),
            key.key_for(topic.kind),
        )
    except nacl.exceptions.CryptoError as exc:
        raise DecryptError(
            f"{topic.kind} report of {topic.device} failed authentication (forged, altered, or "
            "moved from another topic)",
            reason="bad-ciphertext",
        ) from exc
    return plaintext


@dataclass(frozen=True, slots=True)
class OpenedTelemetry:
    """A report a reader opened.

    Attributes:
        device: the device it came from (from the topic, bound into the AAD).
        kind: ``status`` or ``gps``.
        key_id: the key that opened it.
        counter: its position under that key.
        plaintext: the report's bytes (`meshchat.device.telemetry` decodes them).
        fresh: newer than every report of this device and kind read before under this key;
            False for a redelivery, a retained copy seen before, or a replay.
    """

    device: str
    kind: str
    key_id: int
    counter: int
    plaintext: bytes
    fresh: bool


@dataclass(slots=True)
class _DeviceKeys:
    keys: OrderedDict[int, TelemetryKey] = field(default_factory=OrderedDict)
    highest: dict[tuple[int, str], int] = field(default_factory=dict)
    parked: list[tuple[str, bytes]] = field(default_factory=list)


class TelemetryKeyring:
    """A reader's telemetry keys, by device: opens reports, parks those whose key is not here.

    Keys are added only from payloads whose signature the caller verified against the sending
    device's key record, and filed under that device: nobody can add a key for another device.
    """

    def __init__(self) -> None:
        """An empty keyring."""
        self._devices: dict[str, _DeviceKeys] = {}
        self.dropped = 0
        """Parked reports pushed out by newer ones before their key came (`MAX_PARKED`)."""

    def forget(self, device: str) -> None:
        """Drop every key and parked report of `device` (revoked, or gone from the directory)."""
        self._devices.pop(device, None)

    @property
    def devices(self) -> list[str]:
        """Devices this keyring holds a key of, by name."""
        return sorted(name for name, entry in self._devices.items() if entry.keys)

    @property
    def held(self) -> list[str]:
        """Devices this keyring holds a key or a parked report of, by name."""
        return sorted(self._devices)

    def key(self, device: str, key_id: int | None = None) -> TelemetryKey | None:
        """The device's key with `key_id`, or its newest key."""
        entry = self._devices.get(device)
        if entry is None or not entry.keys:
            return None
        if key_id is None:
            return next(reversed(entry.keys.values()))
        return entry.keys.get(key_id)

    def missing(self, device: str) -> list[int]:
        """Ids of the keys that reports of `device` wait for."""
        entry = self._devices.get(device)
        if entry is None:
            return []
        wanted = set()
        for _, payload in entry.parked:
            envelope = decode(payload)
            if isinstance(envelope, Telemetry):
                wanted.add(envelope.key_id)
        return sorted(wanted)

    def parked(self, device: str) -> int:
        """How many reports of `device` wait for their key."""
        entry = self._devices.get(device)
        return 0 if entry is None else len(entry.parked)

    def _entry(self, device: str) -> _DeviceKeys:
        entry = self._devices.get(device)
        if entry is None:
            if len(self._devices) >= MAX_DEVICES:
                raise E2EEError(f"the telemetry keyring holds {MAX_DEVICES} devices already")
            entry = self._devices[device] = _DeviceKeys()
        return entry

    def add(self, device: str, key: TelemetryKey) -> list[OpenedTelemetry]:
        """Keep a key of `device` (already authenticated); returns parked reports it opens."""
        entry = self._entry(device)
        entry.keys[key.key_id] = key
        entry.keys.move_to_end(key.key_id)
        while len(entry.keys) > KEYS_PER_DEVICE:
            old, _ = entry.keys.popitem(last=False)
            entry.highest = {k: v for k, v in entry.highest.items() if k[0] != old}
        parked, entry.parked = entry.parked, []
        opened = []
        for topic, payload in parked:
            try:
                report = self.open(topic, payload)
            except (DecryptError, EnvelopeError):
                continue  # refused now that its key is here: forged, or for another kind
            if report is not None:
                opened.append(report)
        return opened

    def open(self, topic: TelemetryTopic | str, payload: bytes) -> OpenedTelemetry | None:
        """Open a report; None when its key is not here yet (it is parked until it comes).

        Raises:
            EnvelopeError: not a telemetry topic, or not a telemetry envelope.
            DecryptError: it fails authentication, or this keyring holds the key without
                that kind (``key-unavailable``: a fixes-only reader got a status report).
        """
        parsed = telemetry_topic(topic)
        envelope = decode(payload)
        if not isinstance(envelope, Telemetry):
            raise EnvelopeError(f"{type(envelope).__name__} envelope on a telemetry topic")
        key = self.key(parsed.device, envelope.key_id)
        if key is None:
            entry = self._entry(parsed.device)
            if (parsed.topic, payload) not in entry.parked:  # a redelivery waits once
                entry.parked.append((parsed.topic, payload))
                if len(entry.parked) > MAX_PARKED:
                    self.dropped += len(entry.parked) - MAX_PARKED
                    del entry.parked[:-MAX_PARKED]
            return None
        plaintext = open_telemetry(envelope, parsed, key)
        entry = self._devices[parsed.device]
        marker = (envelope.key_id, parsed.kind)
        highest = entry.highest.get(marker, -1)
        fresh = envelope.counter > highest
        if fresh:
            entry.highest[marker] = envelope.counter
        return OpenedTelemetry(
            parsed.device, parsed.kind, envelope.key_id, envelope.counter, plaintext, fresh
        )

    # ----------------------------------------------------------------------- persistence

    def to_bytes(self) -> bytes:
        """The keyring's state (it holds secret keys: keep it with the device's keys)."""
        state = [
            _STATE_VERSION,
            [
                [
                    device,
                    [[k.key_id, k.gps, k.status] for k in entry.keys.values()],
                    [[key_id, kind, counter] for (key_id, kind), counter in entry.highest.items()],
                ]
                for device, entry in sorted(self._devices.items())
                if entry.keys
            ],
        ]
        packed: bytes = msgpack.packb(state, use_bin_type=True)
        return packed

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Restore a keyring saved with `to_bytes`.

        Raises:
            E2EEError: the state is corrupt or of another version.
        """
        keyring = cls()
        try:
            version, devices = msgpack.unpackb(data, raw=False, max_map_len=0)
            if version != _STATE_VERSION:
                raise E2EEError("the telemetry keyring is from another version of meshchat")
            for device, keys, highest in devices:
                entry = keyring._entry(str(device))
                for key_id, gps, status in keys:
                    entry.keys[key_id] = TelemetryKey(key_id, gps, status)
                for key_id, kind, counter in highest:
                    entry.highest[(int(key_id), str(kind))] = int(counter)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise E2EEError(f"the telemetry keyring is corrupt: {exc}") from exc
        return keyring


# ------------------------------------------------------------------- the geofence's reader key


@dataclass(frozen=True, slots=True)
class ReaderCert:
    """The geofence worker's word that `public` (X25519) is its telemetry reader key.

    Attributes:
        org: the org.
        public: the reader's X25519 public key; devices seal their fixes-only key shares to it.
        issued_at: when it was signed (unix seconds); a device keeps the newest it saw.
        signer: the trust bundle's signer that signed it (``geofence``).
        sig: the signature, by that signer's key.
    """

    org: str
    public: bytes
    issued_at: int
    signer: str = READER_SIGNER
    sig: bytes = field(default=b"", repr=False)

    def message(self) -> bytes:
        """What the signer signs."""
        packed: bytes = msgpack.packb(
            [_READER_VERSION, self.org, self.signer, self.public, self.issued_at],
            use_bin_type=True,
        )
        return packed

    def encode(self) -> bytes:
        """The certificate's wire form (published retained on ``mc/{org}/_s/geofence``)."""
        packed: bytes = msgpack.packb(
            [_READER_VERSION, self.org, self.signer, self.public, self.issued_at, self.sig],
            use_bin_type=True,
        )
        return packed


def certify_reader(
    signing: SigningKeyPair, org: str, public: bytes, *, issued_at: int
) -> ReaderCert:
    """Sign the geofence worker's reader key with its (root-certified) roster key."""
    if len(public) != KEY_LEN:
        raise E2EEError(f"a reader key is {KEY_LEN} bytes")
    unsigned = ReaderCert(org, public, issued_at)
    return ReaderCert(org, public, issued_at, sig=signing.sign(_READER_DOMAIN, unsigned.message()))


def open_reader_cert(data: bytes, trust: OrgTrust) -> ReaderCert:
    """Parse a reader certificate and check it against the org's trust bundle.

    Raises:
        EnvelopeError: malformed or oversize.
        E2EEError: another org, a signer the bundle does not name, or a bad signature.
    """
    if len(data) > _MAX_READER_CERT:
        raise EnvelopeError(f"a reader certificate is at most {_MAX_READER_CERT} bytes")
    fields = unpack(data, "a reader certificate", max_str=64, max_bin=64, max_array=6)
    match fields:
        case [int(version), str(org), str(signer), bytes(public), int(issued), bytes(sig)] if (
            version == _READER_VERSION
            and len(public) == KEY_LEN
            and len(sig) == 64
            and 0 <= issued < 2**63
        ):
            cert = ReaderCert(org, public, issued, signer, sig)
        case _:
            raise EnvelopeError("a reader certificate has the wrong fields")
    if cert.org != trust.org:
        raise E2EEError(f"the reader certificate is for org {cert.org!r}, not {trust.org!r}")
    if cert.signer != READER_SIGNER:
        raise E2EEError(f"reader keys are certified by {READER_SIGNER!r}, not {cert.signer!r}")
    certified = trust.signer(cert.signer)
    if certified is None:
        raise E2EEError(f"the trust bundle names no {cert.signer!r} signer")
    if not verify(certified.public, _READER_DOMAIN, cert.message(), cert.sig):
        raise E2EEError("the reader certificate's signature does not check out")
    return cert
