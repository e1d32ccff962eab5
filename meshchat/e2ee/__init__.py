"""End-to-end encryption, sans-IO: sender-key chains (and, as they land, keys, rosters, sealing)."""

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
from meshchat.e2ee.plaintext import FIELDS, Inner, InnerCodec, Kind, decode_inner, encode_inner

__all__ = [
    "FIELDS",
    "MAX_CHAIN_AGE",
    "MAX_CHAIN_MESSAGES",
    "MAX_FORWARD_JUMP",
    "MAX_SKIPPED_KEYS",
    "ChainShare",
    "InboundChain",
    "Inner",
    "InnerCodec",
    "Kind",
    "OutboundChain",
    "decode_inner",
    "encode_inner",
    "group_id",
]
