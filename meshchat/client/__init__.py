"""Clients: the MQTT transport, the E2EE client session, the local store and the device SDK."""
