"""What a client keeps in its profile's store besides messages: session state, groups, marks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
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


@contextlib.contextmanager
def saving(store: ClientStore, session: DeviceSession) -> Iterator[None]:
    """One transaction for what the block writes, ending with what changed in the session.

    The session is kept in parts (`DeviceSession.take_changes`), so a step that read one
    message writes the small core and that message's chain, however many chains the device
    holds. If anything fails, the commit included, the next save writes the whole state: the
    parts this one would have written are not lost.
    """
    try:
        with store.transaction():
            yield
            changes = session.take_changes()
            if changes.whole:
                store.delete_prefixed(SESSION_PREFIX)  # parts of chains retired since
            for name in changes.deleted:
                store.delete(SESSION_PREFIX + name)
            store.put_many({SESSION_PREFIX + name: part for name, part in changes.parts.items()})
    except BaseException:
        session.mark_all_changed()
        raise


def save_session(store: ClientStore, session: DeviceSession) -> None:
    """Save what changed in the device session's state (chains, rosters, key records)."""
    with saving(store, session):
        pass


def saved_session(
    store: ClientStore, *, trust: OrgTrust, signing: SigningKeyPair, box: BoxKeyPair
) -> DeviceSession | None:
    """The session saved in the store (read only), or None when none was saved yet.

    Raises:
        E2EEError: the saved state is corrupt.
    """
    # The old blob first: the migration writes the parts, then drops it, in one transaction,
    # so a reader beside it finds one or the other.
    blob = store.get(SESSION_KEY)
    if blob is not None:
        return DeviceSession.from_bytes(blob, trust=trust, signing=signing, box=box)
    parts = store.get_prefixed(SESSION_PREFIX)
    if parts:
        return DeviceSession.from_parts(parts, trust=trust, signing=signing, box=box)
    return None


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
    if store.get(SESSION_KEY) is not None:  # from_bytes: every part counts as changed
        with saving(store, session):
            store.delete(SESSION_KEY)
    return session
