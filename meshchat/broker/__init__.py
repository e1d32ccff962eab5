"""The embedded MQTT broker (amqtt) and its plugins; it routes envelopes and never holds keys."""

from meshchat.broker.access import (
    AccessGate,
    ConnectLimit,
    DirectoryAuthPlugin,
    DirectoryTopicPlugin,
)
from meshchat.broker.core import (
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MAX_OFFLINE_QUEUE,
    MeshchatBroker,
    MeshchatProtocolHandler,
)
from meshchat.broker.embedded import (
    BrokerSettings,
    BrokerState,
    EmbeddedBroker,
    Listener,
    Scheme,
    TlsFiles,
)
from meshchat.broker.limits import DEFAULT_MAX_PAYLOAD, LimitedReader
from meshchat.broker.mosquitto import (
    MOSQUITTO_MAX_PACKET_SIZE,
    MOSQUITTO_SERVICES,
    MosquittoFiles,
    MosquittoOptions,
    mosquitto_files,
)
from meshchat.broker.persist import BROKER_STATE_FILE, BrokerStore, StoreState
from meshchat.broker.plugins import LoopbackOnlyAuthPlugin, is_loopback
from meshchat.broker.statedb import RestoredState, StoredMessage, StoredRetained, StoredSession

__all__ = [
    "BROKER_STATE_FILE",
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_MAX_OFFLINE_QUEUE",
    "DEFAULT_MAX_PAYLOAD",
    "MOSQUITTO_MAX_PACKET_SIZE",
    "MOSQUITTO_SERVICES",
    "AccessGate",
    "BrokerSettings",
    "BrokerState",
    "BrokerStore",
    "ConnectLimit",
    "DirectoryAuthPlugin",
    "DirectoryTopicPlugin",
    "EmbeddedBroker",
    "LimitedReader",
    "Listener",
    "LoopbackOnlyAuthPlugin",
    "MeshchatBroker",
    "MeshchatProtocolHandler",
    "MosquittoFiles",
    "MosquittoOptions",
    "RestoredState",
    "Scheme",
    "StoreState",
    "StoredMessage",
    "StoredRetained",
    "StoredSession",
    "TlsFiles",
    "is_loopback",
    "mosquitto_files",
]
