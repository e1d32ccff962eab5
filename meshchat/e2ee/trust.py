"""The org's trust bundle: the root key and everything it certified, as one verified value.

A client gets the bundle once (at login) and checks it against the root key's fingerprint; from
then on every roster, key record and compliance copy is judged by it, never by broker state:

- the directory's key, certified for the whole org (``mc/{org}/``): it certifies identity keys
  and signs rosters;
- other roster signers, each certified for a prefix (the geofence worker's for
  ``mc/{org}/sites/``);
- optionally the org compliance key (X25519), which each new chain of a group whose policy asks
  for it is also sealed to.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

import msgpack

from meshchat.e2ee.keys import BoxKeyPair, SigningKeyPair, verify
from meshchat.e2ee.records import KeyDirectory
from meshchat.e2ee.roster import RosterTracker, SignerCert, certify_signer, verify_signer
from meshchat.errors import E2EEError, EnvelopeError, TopicError
from meshchat.topics import validate_name
from meshchat.wire import unpack

__all__ = [
    "DIRECTORY_SIGNER",
    "ComplianceCert",
    "OrgTrust",
    "TrustError",
    "certify_compliance",
    "make_trust",
]

DIRECTORY_SIGNER: Final = "dir"
"""The name the directory's key signs rosters and certificates as."""
_COMPLIANCE_DOMAIN: Final = b"mc-compliance1"
_FINGERPRINT_PERSON: Final = b"mc-root-fp1"
_MAX_SIGNERS: Final = 16
_MAX_BUNDLE: Final = 4096


class TrustError(E2EEError):
    """A trust bundle does not hold together (a certificate the root did not make, a bad scope)."""


@dataclass(frozen=True, slots=True)
class ComplianceCert:
    """The root's word that `public` (X25519) is the org's compliance key."""

    org: str
    public: bytes
    sig: bytes

    def message(self) -> bytes:
        """What the root signs."""
        packed: bytes = msgpack.packb([self.org, self.public], use_bin_type=True)
        return packed


def certify_compliance(root: SigningKeyPair, org: str, public: bytes) -> ComplianceCert:
    """The root certifies the org's compliance key."""
    unsigned = ComplianceCert(org, public, b"")
    return ComplianceCert(org, public, root.sign(_COMPLIANCE_DOMAIN, unsigned.message()))


@dataclass(frozen=True, slots=True)
class OrgTrust:
    """Root public key, roster signers (the directory first) and the optional compliance key."""

    org: str
    root: bytes
    signers: tuple[SignerCert, ...]
    compliance: ComplianceCert | None = None

    def __post_init__(self) -> None:
        """Check every certificate against the root, and every scope against the org.

        Raises:
            TrustError: it does not hold together.
        """
        try:
            validate_name(self.org, "org")
        except TopicError as exc:
            raise TrustError(str(exc)) from exc
        if not self.signers or self.signers[0].name != DIRECTORY_SIGNER:
            msg = f"the trust bundle must name the directory's key ({DIRECTORY_SIGNER!r}) first"
            raise TrustError(msg)
        names = [cert.name for cert in self.signers]
        if len(set(names)) != len(names):
            msg = "the trust bundle names a roster signer twice"
            raise TrustError(msg)
        for cert in self.signers:
            if not verify_signer(self.root, cert):
                msg = f"the certificate of {cert.name!r} was not made by this org root"
                raise TrustError(msg)
            if not cert.scope.startswith(f"mc/{self.org}/"):
                msg = f"{cert.name!r} is certified for {cert.scope}, outside mc/{self.org}/"
                raise TrustError(msg)
        if self.directory.scope != f"mc/{self.org}/":
            msg = f"the directory's key must cover mc/{self.org}/, not {self.directory.scope}"
            raise TrustError(msg)
        if self.compliance is not None and (
            self.compliance.org != self.org
            or not verify(
                self.root, _COMPLIANCE_DOMAIN, self.compliance.message(), self.compliance.sig
            )
        ):
            msg = "the compliance key was not certified by this org root"
            raise TrustError(msg)

    def signer(self, name: str) -> SignerCert | None:
        """The certificate of the signer called `name`, if this bundle has one."""
        return next((cert for cert in self.signers if cert.name == name), None)

    @property
    def directory(self) -> SignerCert:
        """The directory's certificate."""
        return self.signers[0]

    @property
    def fingerprint(self) -> str:
        """A short, human-comparable fingerprint of the root key (shown at init and login)."""
        digest = hashlib.blake2b(self.root, digest_size=10, person=_FINGERPRINT_PERSON)
        text = digest.hexdigest()
        return "-".join(text[i : i + 4] for i in range(0, len(text), 4))

    def roster_tracker(self) -> RosterTracker:
        """A tracker that accepts rosters from this bundle's signers only."""
        return RosterTracker(self.root, {cert.name: cert for cert in self.signers})

    def key_directory(self) -> KeyDirectory:
        """A key directory that trusts identity keys this bundle's directory certified."""
        return KeyDirectory(self.root, self.directory, org=self.org)

    def encode(self) -> bytes:
        """Canonical bytes, to store with a device profile or hand to a client."""
        packed: bytes = msgpack.packb(
            [
                self.org,
                self.root,
                [[c.name, c.public, c.scope, c.sig] for c in self.signers],
                None if self.compliance is None else [self.compliance.public, self.compliance.sig],
            ],
            use_bin_type=True,
        )
        return packed

    @classmethod
    def decode(cls, data: bytes) -> OrgTrust:
        """Parse and verify a bundle.

        Raises:
            EnvelopeError: malformed.
            TrustError: a certificate does not check out.
        """
        if len(data) > _MAX_BUNDLE:
            raise EnvelopeError(f"trust bundle is over {_MAX_BUNDLE} bytes")
        fields = unpack(data, "trust bundle", max_str=256, max_bin=64, max_array=_MAX_SIGNERS)
        match fields:
            case [str(org), bytes(root), list(raw_signers), raw_compliance] if len(root) == 32:
                signers = tuple(_signer(item) for item in raw_signers)
                compliance = None
                match raw_compliance:
                    case None:
                        pass
                    case [bytes(public), bytes(sig)] if len(public) == 32 and len(sig) == 64:
                        compliance = ComplianceCert(org, public, sig)
                    case _:
                        raise EnvelopeError("trust bundle's compliance entry is malformed")
                trust = cls(org, root, signers, compliance)
                if trust.encode() != data:
                    raise EnvelopeError("trust bundle is not in canonical form")
                return trust
        raise EnvelopeError("trust bundle has the wrong fields")


def _signer(item: object) -> SignerCert:
    match item:
        case [str(name), bytes(public), str(scope), bytes(sig)] if (
            len(public) == 32 and len(sig) == 64
        ):
            return SignerCert(name, public, scope, sig)
    raise EnvelopeError("trust bundle's signer entry is malformed")


def make_trust(
    org: str,
    root: SigningKeyPair,
    *,
    directory: SigningKeyPair,
    scoped: dict[str, tuple[SigningKeyPair, str]] | None = None,
    compliance: BoxKeyPair | None = None,
) -> OrgTrust:
    """Certify the directory's key, scoped roster signers and the compliance key with the root.

    Args:
        org: the org.
        root: the org root key (needed only here, at init and when a signer is added).
        directory: the directory's signing key (scope: the whole org).
        scoped: other roster signers by name: key and topic prefix (``mc/{org}/sites/``).
        compliance: the org compliance key, when the org keeps compliance copies.
    """
    signers = [certify_signer(root, DIRECTORY_SIGNER, directory.public, f"mc/{org}/")]
    for name, (key, scope) in (scoped or {}).items():
        signers.append(certify_signer(root, name, key.public, scope))
    cert = None if compliance is None else certify_compliance(root, org, compliance.public)
    return OrgTrust(org, root.public, tuple(signers), cert)
