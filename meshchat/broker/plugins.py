"""amqtt plugins of the embedded broker (thin adapters; policy lives outside the broker)."""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from amqtt.plugins.base import BaseAuthPlugin

if TYPE_CHECKING:
    from amqtt.session import Session

__all__ = ["LoopbackOnlyAuthPlugin", "is_loopback"]

logger = logging.getLogger(__name__)


def is_loopback(address: str | None) -> bool:
    """Whether a peer address is on this machine (127.0.0.0/8, ::1, or IPv4-mapped loopback)."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class LoopbackOnlyAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no types
    """Accept clients without credentials, but only from this machine.

    This is the foundation's stand-in until the directory provides real authentication: a
    broker bound to a public interface must not become an open relay.
    """

    async def authenticate(self, *, session: Session) -> bool:
        """Allow the connection when the peer is on a loopback address."""
        address: str | None = session.remote_address
        if is_loopback(address):
            return True
        logger.warning(
            "refused client %r from %s: anonymous access is limited to loopback",
            session.client_id,
            address,
        )
        return False
