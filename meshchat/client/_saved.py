"""What a client keeps in its profile's store besides messages: session state, groups, marks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from meshchat.client.store import ClientStore
from meshchat.e2ee import BoxKeyPair, DeviceSession, OrgTrust, SigningKeyPair

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face

SESSION_KEY: Final = "session"
"""Where stores written before sessions were kept in parts hold the whole session."""
SESSION_PREFIX: Final = "session/"
"""The session's parts are kept under this prefix (``session/core``, ``session/chain:...``)."""
GROUPS_KEY: Final = "groups"
INBOX_SYNCED_KEY: Final = "inbox-synced"


def saved_groups(store: ClientStore) -> list[str]:
    """The groups a profile followed when its client last heard from the directory."""
    raw = store.get(GROUPS_KEY)
    return [] if not raw else [g for g in raw.decode("utf-8").split("\n") if g]


def save_groups(store: ClientStore, groups: Iterable[str]) -> None:
    """Remember the groups the directory says this user is in."""
    store.put(GROUPS_KEY, "\n".join(sorted(groups)).encode("utf-8"))


def session_changes(session: DeviceSession) -> dict[str, bytes]:
    """The session's changed parts, keyed as the store keeps them.

    Store them all, or call `session.mark_all_changed()`: the next save would miss them.
    """
    return {SESSION_PREFIX + name: part for name, part in session.take_changes().items()}


def save_session(store: ClientStore, session: DeviceSession) -> None:
    """Save what changed in the device session's state (chains, rosters, key records).

    The state is kept in parts (`DeviceSession.take_changes`), so a step that read one message
    writes the small core and that message's chain, however many chains the device holds.
    """
    try:
        store.put_many(session_changes(session))
    except BaseException:
        session.mark_all_changed()
        raise


def saved_session(
    store: ClientStore, *, trust: OrgTrust, signing: SigningKeyPair, box: BoxKeyPair
) -> DeviceSession | None:
    """The session saved in the store (read only), or None when none was saved yet.

    Raises:
        E2EEError: the saved state is corrupt.
    """
    parts = store.get_prefixed(SESSION_PREFIX)
    if parts:
        return DeviceSession.from_parts(parts, trust=trust, signing=signing, box=box)
    blob = store.get(SESSION_KEY)
    if blob is None:
        return None
    return DeviceSession.from_bytes(blob, trust=trust, signing=signing, box=box)


def load_session(
    store: ClientStore,
    *,
    trust: OrgTrust,
    user: str,
    device: str,
    signing: SigningKeyPair,
    box: BoxKeyPair,
) -> DeviceSession:
    """The session saved in the store, or a new one, for the client that owns the profile.

    A store written before sessions were kept in parts holds one blob (`SESSION_KEY`): it is
    saved in parts at once and dropped, in one transaction.

    Raises:
        E2EEError: the saved state is corrupt.
    """
    session = saved_session(store, trust=trust, signing=signing, box=box)
    if session is None:
        return DeviceSession(trust=trust, user=user, device=device, signing=signing, box=box)
    if store.get(SESSION_KEY) is not None:
        with store.transaction():
            save_session(store, session)
            store.delete(SESSION_KEY)
    return session
