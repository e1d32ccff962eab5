"""Signed rosters: rollback, broken links, out-of-scope signers and expiry are all refused."""

from __future__ import annotations

import dataclasses

import pytest

from meshchat.e2ee import (
    GENESIS_HASH,
    Roster,
    RosterError,
    RosterTracker,
    SigningKeyPair,
    certify_signer,
    sign_roster,
)
from meshchat.envelope import Signed, decode, encode
from meshchat.errors import EnvelopeError

ROOT = SigningKeyPair.generate()
DIRECTORY = SigningKeyPair.generate()
GEOFENCE = SigningKeyPair.generate()
LINE1 = "mc/acme/ops/line1"
SITE = "mc/acme/sites/plant-3"
EXPIRES = 2_000_000_000


def tracker() -> RosterTracker:
    return RosterTracker(
        ROOT.public,
        {
            "dir": certify_signer(ROOT, "dir", DIRECTORY.public, "mc/acme/"),
            "geofence": certify_signer(ROOT, "geofence", GEOFENCE.public, "mc/acme/sites/"),
        },
    )


def roster(epoch: int, prev: bytes, *members: str, topic: str = LINE1) -> Roster:
    return Roster(topic, epoch, prev, EXPIRES, members)


def signed(r: Roster, key: SigningKeyPair = DIRECTORY, name: str = "dir") -> Signed:
    envelope = decode(encode(sign_roster(r, key, name)))  # through the wire format
    assert isinstance(envelope, Signed)
    return envelope


def test_a_chain_of_rosters_is_followed() -> None:
    rosters = tracker()
    first = roster(1, GENESIS_HASH, "bob", "carol")
    assert rosters.accept(signed(first), arrived_on=LINE1) == first
    second = roster(2, first.hash, "bob")
    assert rosters.accept(signed(second), arrived_on=LINE1).members == ("bob",)
    assert rosters.accept(signed(second), arrived_on=LINE1) == second  # redelivery is fine
    assert rosters.may_send(LINE1, now=EXPIRES - 1)


def test_rollback_is_refused() -> None:
    rosters = tracker()
    first = roster(1, GENESIS_HASH, "bob", "carol")
    second = roster(2, first.hash, "bob")
    rosters.accept(signed(first), arrived_on=LINE1)
    rosters.accept(signed(second), arrived_on=LINE1)
    with pytest.raises(RosterError, match="rollback refused"):
        rosters.accept(signed(first), arrived_on=LINE1)
    assert rosters.current(LINE1) == second


def test_same_epoch_with_other_members_is_refused() -> None:
    rosters = tracker()
    rosters.accept(signed(roster(1, GENESIS_HASH, "bob")), arrived_on=LINE1)
    with pytest.raises(RosterError, match="two different rosters claim epoch 1"):
        rosters.accept(signed(roster(1, GENESIS_HASH, "bob", "mallory")), arrived_on=LINE1)


def test_broken_link_is_refused_but_a_gap_is_followed() -> None:
    rosters = tracker()
    first = roster(1, GENESIS_HASH, "bob")
    rosters.accept(signed(first), arrived_on=LINE1)
    with pytest.raises(RosterError, match="does not link"):
        rosters.accept(signed(roster(2, bytes(32), "bob", "mallory")), arrived_on=LINE1)
    # A retained topic gives only the newest roster, so a client that missed epochs accepts a
    # later one from a trusted signer.
    assert rosters.accept(signed(roster(5, bytes(32), "bob")), arrived_on=LINE1).epoch == 5


def test_signers_are_held_to_their_scope() -> None:
    rosters = tracker()
    site = roster(1, GENESIS_HASH, "erin", topic=SITE)
    assert rosters.accept(signed(site, GEOFENCE, "geofence"), arrived_on=SITE) == site
    with pytest.raises(RosterError, match=r"under mc/acme/sites/ only"):
        rosters.accept(signed(roster(1, GENESIS_HASH, "x"), GEOFENCE, "geofence"), arrived_on=LINE1)


def test_uncertified_or_forged_signers_are_refused() -> None:
    rosters = tracker()
    mallory = SigningKeyPair.generate()
    with pytest.raises(RosterError, match="not certified"):
        rosters.accept(signed(roster(1, GENESIS_HASH, "m"), mallory, "mallory"), arrived_on=LINE1)
    with pytest.raises(RosterError, match="bad signature"):
        rosters.accept(signed(roster(1, GENESIS_HASH, "m"), mallory, "dir"), arrived_on=LINE1)
    self_made = RosterTracker(
        ROOT.public, {"dir": certify_signer(mallory, "dir", mallory.public, "mc/acme/")}
    )
    with pytest.raises(RosterError, match="not certified"):
        self_made.accept(signed(roster(1, GENESIS_HASH, "m"), mallory, "dir"), arrived_on=LINE1)


def test_roster_for_another_group_is_refused() -> None:
    with pytest.raises(RosterError, match="arrived for"):
        tracker().accept(signed(roster(1, GENESIS_HASH, "bob")), arrived_on="mc/acme/ops/line2")


def test_expired_roster_blocks_sending() -> None:
    rosters = tracker()
    assert not rosters.may_send(LINE1, now=0)  # no roster yet: never send blind
    rosters.accept(signed(roster(1, GENESIS_HASH, "bob")), arrived_on=LINE1)
    assert rosters.may_send(LINE1, now=EXPIRES - 1)
    assert not rosters.may_send(LINE1, now=EXPIRES)


def test_malformed_roster_payloads_are_refused() -> None:
    good = sign_roster(roster(1, GENESIS_HASH, "bob"), DIRECTORY, "dir")
    for payload in (b"\xc1", b"\x90", roster(1, GENESIS_HASH, "Bob").encode()):
        bad = dataclasses.replace(good, payload=payload, sig=DIRECTORY.sign(b"mc-roster1", payload))
        with pytest.raises(EnvelopeError):
            tracker().accept(bad, arrived_on=LINE1)
