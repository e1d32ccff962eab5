"""The embedded MQTT broker (amqtt) and its plugins; it routes envelopes and never holds keys."""

from meshchat.broker.access import (
    AccessGate,
    ConnectLimit,
    DirectoryAuthPlugin,
    DirectoryTopicPlugin,
)
from meshchat.broker.core import DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_OFFLINE_QUEUE, MeshchatBroker
from meshchat.broker.embedded import (
    BrokerSettings,
    BrokerState,
    EmbeddedBroker,
    Listener,
    Scheme,
    TlsFiles,
)
from meshchat.broker.mosquitto import (
    MOSQUITTO_MAX_PACKET_SIZE,
    MosquittoFiles,
    MosquittoOptions,
    mosquitto_files,
)
from meshchat.broker.plugins import LoopbackOnlyAuthPlugin, is_loopback

__all__ = [
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_MAX_OFFLINE_QUEUE",
    "MOSQUITTO_MAX_PACKET_SIZE",
    "AccessGate",
    "BrokerSettings",
    "BrokerState",
    "ConnectLimit",
    "DirectoryAuthPlugin",
    "DirectoryTopicPlugin",
    "EmbeddedBroker",
    "Listener",
    "LoopbackOnlyAuthPlugin",
    "MeshchatBroker",
    "MosquittoFiles",
    "MosquittoOptions",
    "Scheme",
    "TlsFiles",
    "is_loopback",
    "mosquitto_files",
]
