"""Clients: the MQTT transport, the E2EE client session, the local store and the device SDK."""

from meshchat.client._acks import Delivery
from meshchat.client.core import (
    RECALL_WINDOW,
    AckStatus,
    Alarm,
    Client,
    ClientEvent,
    GroupsChanged,
    HistoryPage,
    LinkChanged,
    Mention,
    Message,
    OrderChanged,
    PresenceChanged,
    SiteNotice,
    Unreadable,
)
from meshchat.client.dispatch import DISPATCH_FILE, Direction, DispatchLedger, LedgerOrder
from meshchat.client.fleet import Fleet
from meshchat.client.handoff import hand_off, hand_off_answer, hand_off_order
from meshchat.client.login import LoginRefusedError, default_device_name, login
from meshchat.client.presence import MAX_TRACKED, OFFLINE, ONLINE, PresenceTracker, Seen
from meshchat.client.profile import (
    LOCK_FILE,
    PROFILES_DIR,
    STORE_FILE,
    DeviceProfile,
    list_profiles,
    open_profile,
)
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
    "DISPATCH_FILE",
    "LOCK_FILE",
    "MAX_TRACKED",
    "OFFLINE",
    "ONLINE",
    "PROFILES_DIR",
    "RECALL_WINDOW",
    "STORE_FILE",
    "AckStatus",
    "Alarm",
    "Backoff",
    "BrokerUrl",
    "Client",
    "ClientEvent",
    "ClientStore",
    "Delivery",
    "DeviceProfile",
    "Direction",
    "DispatchLedger",
    "Fleet",
    "GroupsChanged",
    "HistoryPage",
    "Incoming",
    "LedgerOrder",
    "LinkChanged",
    "LoginRefusedError",
    "Mention",
    "Message",
    "OrderChanged",
    "OutboxItem",
    "PresenceChanged",
    "PresenceTracker",
    "Publication",
    "Seen",
    "SiteNotice",
    "StateChange",
    "StoredMessage",
    "Transport",
    "TransportState",
    "Unreadable",
    "UrlScheme",
    "check_qos",
    "default_device_name",
    "hand_off",
    "hand_off_answer",
    "hand_off_order",
    "list_profiles",
    "login",
    "open_profile",
]
