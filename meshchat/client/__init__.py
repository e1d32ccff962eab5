"""Clients: the MQTT transport, the E2EE client session, the local store and the device SDK."""

from meshchat.client.store import ClientStore, OutboxItem, StoredMessage

__all__ = ["ClientStore", "OutboxItem", "StoredMessage"]
