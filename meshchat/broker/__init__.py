"""The embedded MQTT broker (amqtt) and its plugins; it routes envelopes and never holds keys."""

from meshchat.broker.access import (
    AccessGate,
    ConnectLimit,
    DirectoryAuthPlugin,
    DirectoryTopicPlugin,
)
from meshchat.broker.embedded import (
    BrokerSettings,
    BrokerState,
    EmbeddedBroker,
    Listener,
    Scheme,
    TlsFiles,
)
from meshchat.broker.plugins import LoopbackOnlyAuthPlugin, is_loopback

__all__ = [
    "AccessGate",
    "BrokerSettings",
    "BrokerState",
    "ConnectLimit",
    "DirectoryAuthPlugin",
    "DirectoryTopicPlugin",
    "EmbeddedBroker",
    "Listener",
    "LoopbackOnlyAuthPlugin",
    "Scheme",
    "TlsFiles",
    "is_loopback",
]
