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

__all__ = [
    "MAX_CHAIN_AGE",
    "MAX_CHAIN_MESSAGES",
    "MAX_FORWARD_JUMP",
    "MAX_SKIPPED_KEYS",
    "ChainShare",
    "InboundChain",
    "OutboundChain",
    "group_id",
]
