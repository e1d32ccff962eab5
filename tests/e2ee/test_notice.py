"""Signed notices to a device's inbox: verified against the trust bundle, bound to the device."""

from __future__ import annotations

import dataclasses

import pytest

from meshchat.e2ee import (
    NOTICE_DOMAIN,
    Notice,
    NoticeError,
    NoticeKind,
    SigningKeyPair,
    sign_notice,
    verify_notice,
)
from meshchat.envelope import Signed, decode, encode
from meshchat.errors import EnvelopeError
from tests.e2ee.org import Org

NOTICE = Notice(
    device="carol-phone",
    user="carol",
    kind=NoticeKind.JOINED,
    group_topic="mc/acme/sites/plant-3",
    epoch=4,
    issued_at=1_800_000_000,
    text="You joined the plant-3 channel (sites/plant-3).",
)


def test_a_notice_from_the_geofence_key_verifies_in_its_devices_inbox() -> None:
    org = Org()
    wire = encode(sign_notice(NOTICE, org.geofence, "geofence"))
    assert verify_notice(org.trust, wire, device="carol-phone") == NOTICE
    assert len(wire) < 200


def test_a_notice_replayed_into_another_inbox_is_refused() -> None:
    org = Org()
    signed = sign_notice(NOTICE, org.geofence, "geofence")
    with pytest.raises(NoticeError, match="arrived in dave-phone's inbox"):
        verify_notice(org.trust, signed, device="dave-phone")


def test_the_geofence_key_speaks_only_of_site_channels() -> None:
    org = Org()
    elsewhere = dataclasses.replace(NOTICE, group_topic="mc/acme/ops/line1")
    with pytest.raises(NoticeError, match="sites/ only"):
        verify_notice(
            org.trust, sign_notice(elsewhere, org.geofence, "geofence"), device="carol-phone"
        )
    # The directory's key covers the whole org.
    signed = sign_notice(elsewhere, org.directory, "dir")
    assert verify_notice(org.trust, signed, device="carol-phone") == elsewhere


def test_forged_and_misdirected_signatures_are_refused() -> None:
    org = Org()
    with pytest.raises(NoticeError, match="not certified"):
        verify_notice(
            org.trust, sign_notice(NOTICE, SigningKeyPair.generate(), "x"), device="carol-phone"
        )
    with pytest.raises(NoticeError, match="bad signature"):
        verify_notice(
            org.trust,
            sign_notice(NOTICE, SigningKeyPair.generate(), "geofence"),
            device="carol-phone",
        )
    # A roster signature over the same bytes is not a notice signature (domain separation).
    payload = NOTICE.encode()
    roster_sig = org.geofence.sign(b"mc-roster1", payload)
    with pytest.raises(NoticeError, match="bad signature"):
        verify_notice(org.trust, Signed("geofence", payload, roster_sig), device="carol-phone")
    assert org.geofence.sign(NOTICE_DOMAIN, payload) != roster_sig


@pytest.mark.parametrize(
    "payload",
    [
        b"\x92\xa6notice\x01",
        NOTICE.encode().replace(b"notice", b"noting"),
        NOTICE.encode() + b"\x00",
    ],
)
def test_malformed_notices_are_envelope_errors(payload: bytes) -> None:
    org = Org()
    signed = Signed("geofence", payload, org.geofence.sign(NOTICE_DOMAIN, payload))
    with pytest.raises(EnvelopeError):
        verify_notice(org.trust, encode(signed), device="carol-phone")


def test_a_group_message_is_not_a_notice() -> None:
    org = Org()
    with pytest.raises(EnvelopeError):
        verify_notice(org.trust, b"\x00", device="carol-phone")
    assert isinstance(decode(encode(sign_notice(NOTICE, org.geofence, "geofence"))), Signed)
