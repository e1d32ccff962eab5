"""Names in topics: every bad name is refused with a message that names the bad part."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshchat.errors import MeshchatError, TopicError
from meshchat.topics import GroupTopic, InboxTopic, KeyTopic, validate_name

NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=32)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("a+b", "wildcard '+'"),
        ("ops#", "wildcard '#'"),
        ("ops/night", "separator '/'"),
        ("ops\x00", "NUL"),
        ("Ops", "upper-case letter 'O'"),
        ("café", "non-ASCII character 'é'"),
        ("_r", "starts with '_'"),
        ("", "is empty"),
        ("x" * 33, "33 characters long"),
        ("night shift", "a space"),
        ("a\tb", "control character"),
        ("a.b", "character '.'"),
    ],
)
def test_bad_group_name_is_refused_naming_the_part(name: str, words: str) -> None:
    with pytest.raises(TopicError) as caught:
        validate_name(name, "group name")
    message = str(caught.value)
    assert message.startswith("group name")
    assert words in message
    assert caught.value.part == "group name"
    assert isinstance(caught.value, MeshchatError)


def test_non_string_name_is_a_topic_error() -> None:
    with pytest.raises(TopicError, match="must be a string"):
        validate_name(b"ops", "group name")


@given(NAME)
def test_every_valid_name_passes_unchanged(name: str) -> None:
    assert validate_name(name, "user name") == name


@pytest.mark.parametrize(
    ("build", "part"),
    [
        (lambda: GroupTopic("acme", "ops", "Night"), "group name"),
        (lambda: GroupTopic("acme", "_d", "night"), "department name"),
        (lambda: GroupTopic("ACME", "ops", "night"), "org name"),
        (lambda: GroupTopic.site("acme", "plant+1"), "site name"),
        (lambda: InboxTopic("acme", "van/7"), "device name"),
        (lambda: KeyTopic("acme", "#"), "user name"),
    ],
)
def test_builders_name_which_part_is_bad(build: object, part: str) -> None:
    assert callable(build)
    with pytest.raises(TopicError) as caught:
        build()
    assert caught.value.part == part
    assert str(caught.value).startswith(part)
