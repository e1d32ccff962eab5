"""What a client keeps in its profile's store besides messages: session state, groups, marks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from meshchat.client.store import ClientStore
from meshchat.e2ee import DeviceSession

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face

SESSION_KEY: Final = "session"
GROUPS_KEY: Final = "groups"
INBOX_SYNCED_KEY: Final = "inbox-synced"


def saved_groups(store: ClientStore) -> list[str]:
    """The groups a profile followed when its client last heard from the directory."""
    raw = store.get(GROUPS_KEY)
    return [] if not raw else [g for g in raw.decode("utf-8").split("\n") if g]


def save_groups(store: ClientStore, groups: Iterable[str]) -> None:
    """Remember the groups the directory says this user is in."""
    store.put(GROUPS_KEY, "\n".join(sorted(groups)).encode("utf-8"))


def save_session(store: ClientStore, session: DeviceSession) -> None:
    """Save the device session's state (chains, rosters, key records)."""
    store.put(SESSION_KEY, session.to_bytes())
