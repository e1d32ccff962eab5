"""The matcher follows MQTT 3.1.1 section 4.7 exactly; checked by examples and by property."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from meshchat.errors import TopicError
from meshchat.topics import matches, validate_filter, validate_topic


def reference_match(topic_filter: str, topic: str) -> bool:
    """A straightforward second reading of the spec: translate the filter to a regex."""
    if topic.startswith("$") and topic_filter[:1] in {"+", "#"}:
        return False
    pattern = ""
    levels = topic_filter.split("/")
    for number, level in enumerate(levels):
        last = number == len(levels) - 1
        if level == "#":
            # "sport/#" also matches "sport": the separator before # is optional.
            pattern = pattern.removesuffix("/") + ("(/.*)?" if number else ".*")
            break
        pattern += "[^/]*" if level == "+" else re.escape(level)
        if not last:
            pattern += "/"
    return re.fullmatch(pattern, topic, flags=re.DOTALL) is not None


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        # the examples of MQTT 3.1.1 section 4.7.1
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "sport/tennis", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        # section 4.7.2: $ topics and leading wildcards
        ("#", "$SYS/broker/uptime", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("/#", "/finance", True),
        ("/#", "finance", False),
        # case sensitivity and exact levels
        ("ACCOUNTS", "Accounts", False),
        ("mc/acme/+/+", "mc/acme/ops/night", True),
        ("mc/acme/+/+", "mc/acme/ops/night/_r", False),
        ("mc/acme/+/+/_r", "mc/acme/ops/night/_r", True),
    ],
)
def test_spec_examples(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected
    assert reference_match(topic_filter, topic) is expected


@pytest.mark.parametrize(
    "bad_filter",
    ["sport/tennis#", "sport/tennis/#/ranking", "sport+", "+sport/x", "a/#/", "", "a\x00"],
)
def test_invalid_filters_are_refused(bad_filter: str) -> None:
    with pytest.raises(TopicError):
        validate_filter(bad_filter)


@pytest.mark.parametrize("bad_topic", ["a/+/b", "a/#", "", "x\x00y", "\ud800"])
def test_invalid_topic_names_are_refused(bad_topic: str) -> None:
    with pytest.raises(TopicError):
        validate_topic(bad_topic)


def test_overlong_topic_is_refused() -> None:
    with pytest.raises(TopicError, match="65535"):
        validate_topic("a" * 65536)
    assert validate_topic("é" * 32767) == "é" * 32767


# Small alphabets so that filters and topics collide often enough to match.
LEVEL = st.sampled_from(["", "a", "b", "ab", "$x", "$SYS", "é"])
TOPICS = st.lists(LEVEL, min_size=1, max_size=5).map("/".join).filter(bool)
FILTER_LEVEL = st.one_of(LEVEL, st.just("+"))
FILTERS = st.builds(
    lambda levels, tail: "/".join(levels + tail),
    st.lists(FILTER_LEVEL, min_size=0, max_size=5),
    st.sampled_from([[], ["#"]]),
).filter(bool)


@settings(max_examples=1000)
@given(FILTERS, TOPICS)
def test_matcher_agrees_with_the_reference(topic_filter: str, topic: str) -> None:
    assume("+" not in topic and "#" not in topic)
    assert matches(topic_filter, topic) is reference_match(topic_filter, topic)


@given(TOPICS)
def test_a_topic_matches_itself_and_hash(topic: str) -> None:
    assert matches(topic, topic)
    assert matches("#", topic) is not topic.startswith("$")


@given(st.text(max_size=40))
def test_random_filters_are_valid_or_a_topic_error(text: str) -> None:
    try:
        validate_filter(text)
    except TopicError:
        return
    for level in text.split("/"):
        assert level in {"+", "#"} or ("+" not in level and "#" not in level)
