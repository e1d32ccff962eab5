"""The trust bundle: only what the org root certified holds together."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from meshchat.e2ee import (
    BoxKeyPair,
    OrgTrust,
    SigningKeyPair,
    TrustError,
    certify_compliance,
    certify_signer,
    make_trust,
)
from meshchat.errors import EnvelopeError

ROOT = SigningKeyPair.generate()
DIRECTORY = SigningKeyPair.generate()
GEOFENCE = SigningKeyPair.generate()
COMPLIANCE = BoxKeyPair.generate()


def bundle() -> OrgTrust:
    return make_trust(
        "acme",
        ROOT,
        directory=DIRECTORY,
        scoped={"geofence": (GEOFENCE, "mc/acme/sites/")},
        compliance=COMPLIANCE,
    )


def test_a_bundle_survives_the_wire_and_keeps_its_fingerprint() -> None:
    trust = bundle()
    again = OrgTrust.decode(trust.encode())
    assert again == trust
    assert again.fingerprint == trust.fingerprint
    assert len(trust.fingerprint.replace("-", "")) == 20
    assert again.directory.public == DIRECTORY.public


def test_a_signer_the_root_did_not_certify_is_refused() -> None:
    trust = bundle()
    stranger = certify_signer(SigningKeyPair.generate(), "evil", GEOFENCE.public, "mc/acme/")
    with pytest.raises(TrustError, match="not made by this org root"):
        dataclasses.replace(trust, signers=(*trust.signers, stranger))


def test_scopes_must_stay_inside_the_org() -> None:
    other = certify_signer(ROOT, "geofence", GEOFENCE.public, "mc/other/sites/")
    trust = bundle()
    with pytest.raises(TrustError, match="outside mc/acme/"):
        dataclasses.replace(trust, signers=(trust.directory, other))
    narrow = certify_signer(ROOT, "dir", DIRECTORY.public, "mc/acme/sites/")
    with pytest.raises(TrustError, match="must cover mc/acme/"):
        dataclasses.replace(trust, signers=(narrow,))


def test_a_compliance_key_from_another_root_is_refused() -> None:
    forged = certify_compliance(SigningKeyPair.generate(), "acme", COMPLIANCE.public)
    with pytest.raises(TrustError, match="compliance"):
        dataclasses.replace(bundle(), compliance=forged)


def test_malformed_or_non_canonical_bundles_are_refused() -> None:
    data = bundle().encode()
    with pytest.raises(EnvelopeError):
        OrgTrust.decode(data[:-3])
    with pytest.raises(EnvelopeError):
        OrgTrust.decode(b"\x00" * 5000)
    fields = msgpack.unpackb(data, raw=False)
    loose = msgpack.packb(fields, use_bin_type=False)  # bytes as str: not canonical
    with pytest.raises((EnvelopeError, TrustError)):
        OrgTrust.decode(loose)
