"""End-to-end encryption, sans-IO: keys, sender-key chains, distributions, inner plaintext."""

from meshchat.e2ee.chain import (
    MAX_CHAIN_AGE,
    MAX_CHAIN_MESSAGES,
    MAX_FORWARD_JUMP,
    MAX_SKIPPED_KEYS,
    ChainShare,
    InboundChain,
    OutboundChain,
    group_id,
)
from meshchat.e2ee.distribution import ReceivedShare, open_distribution, seal_distribution
from meshchat.e2ee.keys import DOMAINS, BoxKeyPair, SigningKeyPair, sign, verify
from meshchat.e2ee.keystore import KeyStore, WrongPassphraseError
from meshchat.e2ee.pairwise import (
    PairKind,
    Pairwise,
    WithheldReason,
    open_pairwise,
    seal_pairwise,
)
from meshchat.e2ee.plaintext import FIELDS, Inner, InnerCodec, Kind, decode_inner, encode_inner
from meshchat.e2ee.records import (
    DeviceKeys,
    IdentityChangedError,
    KeyDirectory,
    KeyRecord,
    KeyRecordError,
    certify_identity,
    sign_key_record,
)
from meshchat.e2ee.roster import (
    GENESIS_HASH,
    Roster,
    RosterError,
    RosterTracker,
    SignerCert,
    certify_signer,
    sign_roster,
    verify_signer,
)

__all__ = [
    "DOMAINS",
    "FIELDS",
    "GENESIS_HASH",
    "MAX_CHAIN_AGE",
    "MAX_CHAIN_MESSAGES",
    "MAX_FORWARD_JUMP",
    "MAX_SKIPPED_KEYS",
    "BoxKeyPair",
    "ChainShare",
    "DeviceKeys",
    "IdentityChangedError",
    "InboundChain",
    "Inner",
    "InnerCodec",
    "KeyDirectory",
    "KeyRecord",
    "KeyRecordError",
    "KeyStore",
    "Kind",
    "OutboundChain",
    "PairKind",
    "Pairwise",
    "ReceivedShare",
    "Roster",
    "RosterError",
    "RosterTracker",
    "SignerCert",
    "SigningKeyPair",
    "WithheldReason",
    "WrongPassphraseError",
    "certify_identity",
    "certify_signer",
    "decode_inner",
    "encode_inner",
    "group_id",
    "open_distribution",
    "open_pairwise",
    "seal_distribution",
    "seal_pairwise",
    "sign",
    "sign_key_record",
    "sign_roster",
    "verify",
    "verify_signer",
]
