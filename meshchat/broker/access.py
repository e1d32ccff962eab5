"""Thin amqtt adapters over the access-policy core: authentication, topic ACL, live revocation.

amqtt builds its plugins itself from a config dict, so the plugins find their `AccessGate` by
the id in their config. The gate holds the current `AccessPolicy`, the principal of every
connected client and a decision cache that is dropped whenever the policy changes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from amqtt.contexts import Action as AmqttAction
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from meshchat.directory.policy import AccessPolicy, Action, Principal
from meshchat.errors import AuthenticationError, BrokerError

if TYPE_CHECKING:
    from amqtt.session import Session

__all__ = ["AccessGate", "ConnectLimit", "DirectoryAuthPlugin", "DirectoryTopicPlugin"]

logger = logging.getLogger(__name__)

_ACTIONS: Final = {
    AmqttAction.SUBSCRIBE: Action.SUBSCRIBE,
    AmqttAction.PUBLISH: Action.PUBLISH,
    AmqttAction.RECEIVE: Action.RECEIVE,
}
MAX_CACHED_DECISIONS: Final = 100_000

_GATES: weakref.WeakValueDictionary[str, AccessGate] = weakref.WeakValueDictionary()


@dataclass(frozen=True, slots=True)
class ConnectLimit:
    """How often one client id, and one remote address, may connect within a window."""

    per_client: int = 10
    per_address: int = 60
    window: float = 10.0


class _SlidingWindow:
    """Counts events per key over the last `window` seconds; memory stays bounded."""

    MAX_KEYS: Final = 100_000

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._events: dict[str, collections.deque[float]] = {}

    def allow(self, key: str, now: float) -> bool:
        events = self._events.get(key)
        if events is None:
            if len(self._events) >= self.MAX_KEYS:
                self._prune(now)
            events = self._events[key] = collections.deque()
        while events and now - events[0] >= self.window:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        return True

    def _prune(self, now: float) -> None:
        stale = [k for k, ev in self._events.items() if not ev or now - ev[-1] >= self.window]
        for key in stale:
            del self._events[key]
        if len(self._events) >= self.MAX_KEYS:
            self._events.clear()  # under a flood of fresh keys, forget rather than grow


class AccessGate:
    """What the broker's plugins ask: who is this client, and may it do this?"""

    def __init__(self, policy: AccessPolicy, *, connect_limit: ConnectLimit | None = None) -> None:
        """Start with `policy`; `update` swaps in newer ones."""
        self.id = uuid.uuid4().hex
        self._policy = policy
        self._principals: dict[str, Principal] = {}
        self._sessions: dict[str, Session] = {}
        self._cache: dict[tuple[str, Action, str], bool] = {}
        limit = connect_limit or ConnectLimit()
        self._per_client = _SlidingWindow(limit.per_client, limit.window)
        self._per_address = _SlidingWindow(limit.per_address, limit.window)
        _GATES[self.id] = self

    @staticmethod
    def find(gate_id: str) -> AccessGate:
        """The gate a plugin's config names.

        Raises:
            BrokerError: no such gate (it was garbage-collected or never made).
        """
        try:
            return _GATES[gate_id]
        except KeyError:
            raise BrokerError(f"no access gate {gate_id!r}") from None

    @property
    def policy(self) -> AccessPolicy:
        """The policy decisions come from now."""
        return self._policy

    def principal(self, client_id: str) -> Principal | None:
        """Who a connected client authenticated as."""
        return self._principals.get(client_id)

    async def authenticate(self, session: Session) -> bool:
        """Check a CONNECT's credentials (off the event loop: argon2id takes a while)."""
        client_id = str(session.client_id or "")
        username = session.username
        password = session.password
        policy = self._policy
        now = time.monotonic()
        address = str(session.remote_address)
        if not self._per_address.allow(address, now) or not self._per_client.allow(client_id, now):
            logger.warning(
                "refused connection of client %r from %s: it connects too often",
                client_id,
                address,
            )
            return False
        try:
            principal = await asyncio.to_thread(policy.authenticate, username, password, client_id)
        except AuthenticationError as exc:
            logger.warning(
                "refused connection of client %r as %r from %s: %s",
                client_id,
                username,
                session.remote_address,
                exc,
            )
            return False
        self._principals[client_id] = principal
        self._sessions[client_id] = session
        return True

    def authorize(self, client_id: str, action: Action, topic: str) -> bool:
        """Decide (cached per client, action and topic until the policy changes)."""
        key = (client_id, action, topic)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        principal = self._principals.get(client_id)
        if principal is None:
            return False
        decision = self._policy.authorize(principal, action, topic, now=time.time())
        if not decision.allowed and action is not Action.RECEIVE:
            logger.warning(
                "refused %s of %r to %s (%s)", action.value, topic, principal.name, decision.reason
            )
        if len(self._cache) >= MAX_CACHED_DECISIONS:
            self._cache.clear()
        self._cache[key] = decision.allowed
        return decision.allowed

    def check(self, client_id: str, action: AmqttAction, topic: str) -> bool:
        """`authorize` with amqtt's action type: the broker's direct ACL hook."""
        return self.authorize(client_id, _ACTIONS[action], topic)

    def forget(self, client_id: str, session: Session) -> None:
        """Drop what the gate knows of a client whose connection `session` ended.

        A newer connection with the same client id keeps its principal.
        """
        if self._sessions.get(client_id) is session:
            self._sessions.pop(client_id, None)
            self._principals.pop(client_id, None)
            stale = [key for key in self._cache if key[0] == client_id]
            for key in stale:
                del self._cache[key]

    def revoked_clients(self) -> list[str]:
        """Client ids whose account or device is no longer valid under the current policy."""
        return [
            client_id
            for client_id, principal in self._principals.items()
            if not self._policy.still_valid(principal)
        ]

    def update(self, policy: AccessPolicy) -> list[str]:
        """Swap in a newer policy; returns the clients that must now be disconnected."""
        self._policy = policy
        self._cache.clear()
        revoked = self.revoked_clients()
        for client_id in revoked:
            self._principals.pop(client_id, None)
            self._sessions.pop(client_id, None)
        return revoked

    def plugin_config(self) -> dict[str, dict[str, Any]]:
        """The amqtt ``plugins`` entries that enforce this gate."""
        return {
            "meshchat.broker.access.DirectoryAuthPlugin": {"gate": self.id},
            "meshchat.broker.access.DirectoryTopicPlugin": {"gate": self.id},
        }


class DirectoryAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no types
    """amqtt authentication against the directory (passwords, device tokens, service tokens)."""

    @dataclass
    class Config:
        """The gate to ask."""

        gate: str = ""

    async def authenticate(self, *, session: Session) -> bool:
        """Let the client in when the policy accepts its credentials."""
        return await AccessGate.find(self.config.gate).authenticate(session)

    async def on_broker_client_disconnected(
        self, *, client_id: str, client_session: Session
    ) -> None:
        """Forget the principal of a connection that ended."""
        AccessGate.find(self.config.gate).forget(client_id, client_session)


class DirectoryTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no types
    """amqtt topic ACL for subscribe, publish and receive, from the directory."""

    @dataclass
    class Config:
        """The gate to ask."""

        gate: str = ""

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: AmqttAction | None = None,
    ) -> bool:
        """Allow what the policy allows; anything unknown is refused."""
        if session is None or topic is None or action is None:
            return False
        return AccessGate.find(self.config.gate).authorize(
            str(session.client_id), _ACTIONS[action], topic
        )
