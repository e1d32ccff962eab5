"""Clients: the MQTT transport, the E2EE client session, the local store and the device SDK."""

from meshchat.client.store import ClientStore, OutboxItem, StoredMessage
from meshchat.client.transport import Transport
from meshchat.client.urls import (
    DEFAULT_BROKER_URL,
    DEFAULT_PORTS,
    DEFAULT_WS_PATH,
    BrokerUrl,
    UrlScheme,
)
from meshchat.client.values import (
    DEFAULT_MAX_PAYLOAD,
    Backoff,
    Incoming,
    Publication,
    StateChange,
    TransportState,
    check_qos,
)

__all__ = [
    "DEFAULT_BROKER_URL",
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_PORTS",
    "DEFAULT_WS_PATH",
    "Backoff",
    "BrokerUrl",
    "ClientStore",
    "Incoming",
    "OutboxItem",
    "Publication",
    "StateChange",
    "StoredMessage",
    "Transport",
    "TransportState",
    "UrlScheme",
    "check_qos",
]
