"""Who gets history: the access policy decides, over a real directory's snapshot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshchat.archive import RefusedError, authorize
from meshchat.directory import Directory
from meshchat.rpc import Request
from tests.archive.helpers import ORG, make_directory

NOW = 1_800_000_000.0
HISTORY = Request("history", ("ops/line1",))


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Directory]:
    with make_directory(tmp_path / "directory.db") as opened:
        yield opened


def _refusal(directory: Directory, user: str, request: Request) -> str:
    with pytest.raises(RefusedError) as refused:
        authorize(directory.snapshot(), user, request, now=NOW)
    return str(refused.value)


def test_members_get_history_and_a_device_owner_its_inbox(directory: Directory) -> None:
    snapshot = directory.snapshot()
    for user in ("bob", "carol"):
        assert authorize(snapshot, user, HISTORY, now=NOW).subject == "ops/line1"
    inbox = authorize(snapshot, "bob", Request("inbox", ("b1",)), now=NOW)
    assert (inbox.op, inbox.subject) == ("inbox", "b1")


def test_a_non_member_and_a_stranger_are_refused(directory: Directory) -> None:
    assert _refusal(directory, "erin", HISTORY) == "erin is not a member of ops/line1"
    assert _refusal(directory, "mallory", HISTORY) == f"mallory is not an active user of {ORG}"
    assert _refusal(directory, "carol", Request("inbox", ("b1",))) == (
        "b1 is not an active device of carol"
    )


def test_a_revoked_user_and_a_revoked_device_are_refused(directory: Directory) -> None:
    directory.revoke_device("bob", "b1")
    assert _refusal(directory, "bob", Request("inbox", ("b1",))) == (
        "b1 is not an active device of bob"
    )
    directory.remove_user("root", "carol")
    assert _refusal(directory, "carol", HISTORY) == f"carol is not an active user of {ORG}"
    assert _refusal(directory, "carol", Request("gap", ("ops/line1", 1, 0, 5))) == (
        f"carol is not an active user of {ORG}"
    )
