"""The geofence's telemetry reader, sans-IO: reader certificates, key shares, parked fixes.

Real keys throughout: the org's trust bundle (`tests.e2ee.org.Org`), device keys, telemetry
sealers and key shares exactly as devices make them.
"""

from __future__ import annotations

import dataclasses

import pytest

from meshchat.device.core import DeviceCore
from meshchat.device.credentials import DeviceCredentials
from meshchat.device.telemetry import GpsFix, encode_gps, seal_key_share
from meshchat.e2ee import BoxKeyPair, SigningKeyPair, certify_reader, open_reader_cert
from meshchat.e2ee.telemetry import MAX_PARKED, TelemetrySealer
from meshchat.errors import E2EEError, EnvelopeError
from meshchat.geofence import Fix
from meshchat.geofence.gps import GpsIntake
from meshchat.topics import TelemetryTopic
from tests.e2ee.org import NOW, Org

GPS = TelemetryTopic("acme", "van-1", "gps")
CERT_TOPIC = "mc/acme/_s/geofence"
SHARE_TOPIC = "mc/acme/_s/geofence/van-1"


@dataclasses.dataclass
class Van:
    signing: SigningKeyPair
    sealer: TelemetrySealer

    def share(self, reader: BoxKeyPair, *, device: str = "van-1") -> bytes:
        return seal_key_share(
            self.sealer.key.gps_only(),
            device=device,
            signing=self.signing,
            recipient="geofence",
            recipient_box=reader.public,
            ts=int(NOW),
        )

    def fix(self, metres: float = 0.0, ts: int = int(NOW)) -> bytes:
        return self.sealer.seal(GPS, encode_gps(GpsFix(ts, 48.137 + metres / 111_000, 11.575)))


def van() -> Van:
    return Van(SigningKeyPair.generate(), TelemetrySealer.new(now=NOW))


def test_a_device_trusts_only_a_reader_key_the_geofence_key_signed() -> None:
    org = Org()
    reader = BoxKeyPair.generate()
    cert = certify_reader(org.geofence, "acme", reader.public, issued_at=int(NOW)).encode()
    assert open_reader_cert(cert, org.trust).public == reader.public
    # Signed by the directory's key (certified, but not the geofence's), or by a stranger.
    for signer in (org.directory, SigningKeyPair.generate()):
        forged = certify_reader(signer, "acme", BoxKeyPair.generate().public, issued_at=int(NOW))
        with pytest.raises(E2EEError, match="signature"):
            open_reader_cert(forged.encode(), org.trust)
    with pytest.raises(E2EEError, match="org"):
        open_reader_cert(
            certify_reader(org.geofence, "other", reader.public, issued_at=1).encode(), org.trust
        )
    with pytest.raises(EnvelopeError):
        open_reader_cert(cert[:-3], org.trust)


def test_a_device_shares_its_key_with_the_reader_key_it_learns_and_ignores_a_forged_one() -> None:
    org = Org()
    (device,) = org.add_user("van-1", "van-1")
    credentials = DeviceCredentials(
        org="acme",
        device="van-1",
        dept="ops",
        kind="tracker",
        broker="mqtt://127.0.0.1:1883",
        group="ops/dispatch",
        token="token",
        signing=device.signing,
        box=device.box,
        trust=org.trust,
        geofence=None,  # an older credential file: the key comes from the certificate
    )
    core = DeviceCore(credentials, now=NOW)
    assert CERT_TOPIC in core.start(now=NOW).subscribe
    stranger = BoxKeyPair.generate()
    forged = certify_reader(SigningKeyPair.generate(), "acme", stranger.public, issued_at=int(NOW))
    assert core.on_message(CERT_TOPIC, forged.encode(), now=NOW).publish == []
    assert core.geofence_reader is None
    reader = BoxKeyPair.generate()
    cert = certify_reader(org.geofence, "acme", reader.public, issued_at=int(NOW))
    out = core.on_message(CERT_TOPIC, cert.encode(), now=NOW)
    (share,) = [p for p in out.publish if p.topic == SHARE_TOPIC]
    assert share.retain
    intake = GpsIntake(reader)
    intake.directory_changed({"van-1": device.signing.public})
    assert intake.share("van-1", share.payload).refused is None
    # The same certificate again (a retained redelivery) sends nothing more.
    assert core.on_message(CERT_TOPIC, cert.encode(), now=NOW).publish == []


def test_shares_open_only_from_known_devices_on_their_own_topic() -> None:
    reader, one, two = BoxKeyPair.generate(), van(), van()
    intake = GpsIntake(reader)
    intake.directory_changed({"van-1": one.signing.public, "van-2": two.signing.public})
    assert intake.share("van-3", one.share(reader, device="van-3")).refused == "unknown-sender"
    # van-2's own key signs, but the share names van-1: the signature does not check out.
    assert intake.share("van-1", two.share(reader)).refused == "bad-signature"
    assert intake.share("van-2", one.share(reader)).refused == "share-mismatch"
    sealed_elsewhere = one.share(BoxKeyPair.generate())
    assert intake.share("van-1", sealed_elsewhere).refused is not None
    assert intake.share("van-1", b"\x00" * 2000).refused == "oversize"
    assert intake.share("van-1", one.share(reader)).refused is None
    (fix,) = intake.fix(GPS, one.fix()).fixes
    assert fix == ("van-1", Fix(NOW, 48.137, 11.575))


def test_a_fix_before_its_share_waits_bounded_and_opens_when_the_share_comes() -> None:
    reader, one = BoxKeyPair.generate(), van()
    intake = GpsIntake(reader)
    intake.directory_changed({"van-1": one.signing.public})
    first = intake.fix(GPS, one.fix(ts=int(NOW) - 10))
    assert (first.parked, first.fixes, first.refused) == (True, [], None)
    for i in range(MAX_PARKED + 5):
        intake.fix(GPS, one.fix(ts=int(NOW) + i))
    assert intake.dropped == 6  # the oldest were pushed out, counted
    opened = intake.share("van-1", one.share(reader)).fixes
    assert len(opened) == MAX_PARKED
    assert opened[0][1].ts == NOW + 5  # in order: the newest MAX_PARKED were kept


def test_a_share_from_a_device_the_directory_names_later_is_kept_and_retried() -> None:
    reader, one = BoxKeyPair.generate(), van()
    intake = GpsIntake(reader)
    assert intake.share("van-1", one.share(reader)).refused == "unknown-sender"
    assert intake.fix(GPS, one.fix(ts=int(NOW) - 1)).parked  # the broker knew it already
    assert intake.unverified == 1
    # The directory names the device: the kept share opens, and the parked fix with it.
    retried = intake.directory_changed({"van-1": one.signing.public})
    assert (retried.shares, [f.ts for _, f in retried.fixes]) == (1, [NOW - 1])
    assert intake.unverified == 0
    assert len(intake.fix(GPS, one.fix()).fixes) == 1


def test_rotated_keys_keep_working_and_a_revoked_device_is_forgotten() -> None:
    reader, one = BoxKeyPair.generate(), van()
    intake = GpsIntake(reader)
    intake.directory_changed({"van-1": one.signing.public})
    intake.share("van-1", one.share(reader))
    late = one.fix(ts=int(NOW) - 5)
    one.sealer = TelemetrySealer.new(now=NOW)  # a restart, or the weekly rotation
    intake.share("van-1", one.share(reader))
    assert len(intake.fix(GPS, one.fix()).fixes) == 1
    assert len(intake.fix(GPS, late).fixes) == 1  # sealed under the key before: still opens
    assert intake.fix(GPS, late).refused == "replayed"
    intake.directory_changed({})  # revoked
    assert intake.keyring.held == []
    assert intake.fix(GPS, one.fix()).fixes == []  # no key any more: nothing opens
