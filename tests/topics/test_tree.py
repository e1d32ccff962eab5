"""Every topic of DESIGN.md section 3 is built, rendered and parsed back to the same value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshchat.errors import TopicError
from meshchat.topics import (
    GroupTopic,
    InboxTopic,
    KeyTopic,
    OwnTracksTopic,
    PresenceTopic,
    RosterTopic,
    ServiceTopic,
    TelemetryTopic,
    Topic,
    parse_topic,
)

OWNTRACKS_SAMPLES = Path(__file__).parents[1] / "testdata" / "owntracks" / "samples.json"

NAME = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,31}\Z")
TOPICS: st.SearchStrategy[Topic] = st.one_of(
    st.builds(GroupTopic, NAME, NAME, NAME),
    st.builds(RosterTopic, NAME, NAME, NAME),
    st.builds(InboxTopic, NAME, NAME),
    st.builds(KeyTopic, NAME, NAME),
    st.builds(PresenceTopic, NAME, NAME),
    st.builds(TelemetryTopic, NAME, NAME, st.sampled_from(["status", "gps"])),
    st.builds(ServiceTopic, NAME, NAME),
    st.builds(ServiceTopic, NAME, NAME, NAME, st.booleans()),
    st.builds(OwnTracksTopic, NAME, NAME, st.none() | NAME),
)


@pytest.mark.parametrize(
    ("value", "topic", "retained"),
    [
        (GroupTopic("acme", "ops", "night-shift"), "mc/acme/ops/night-shift", False),
        (GroupTopic.site("acme", "plant-3"), "mc/acme/sites/plant-3", False),
        (RosterTopic("acme", "ops", "night-shift"), "mc/acme/ops/night-shift/_r", True),
        (InboxTopic("acme", "laptop-1"), "mc/acme/_d/laptop-1", False),
        (KeyTopic("acme", "alice"), "mc/acme/_k/alice", True),
        (PresenceTopic("acme", "van-7"), "mc/acme/_p/van-7", True),
        (TelemetryTopic("acme", "van-7", "status"), "mc/acme/_t/van-7/status", True),
        (TelemetryTopic("acme", "van-7", "gps"), "mc/acme/_t/van-7/gps", False),
        (ServiceTopic("acme", "archive"), "mc/acme/_s/archive", False),
        (ServiceTopic("acme", "dir", "alice"), "mc/acme/_s/dir/alice", False),
        (ServiceTopic("acme", "dir", "alice", reply=True), "mc/acme/_s/dir/alice/reply", False),
        (OwnTracksTopic("jane", "nokia"), "owntracks/jane/nokia", None),
        (OwnTracksTopic("jane", "nokia", "event"), "owntracks/jane/nokia/event", None),
    ],
)
def test_each_topic_kind_renders_and_parses(
    value: Topic, topic: str, retained: bool | None
) -> None:
    assert value.topic == topic
    assert parse_topic(topic) == value
    if retained is not None:
        assert not isinstance(value, OwnTracksTopic)
        assert value.retained is retained


def test_site_channel_is_a_group_under_sites() -> None:
    site = parse_topic("mc/acme/sites/plant-3")
    assert isinstance(site, GroupTopic)
    assert site.is_site
    assert site.roster.topic == "mc/acme/sites/plant-3/_r"
    assert site.path == "sites/plant-3"


@given(TOPICS)
def test_parse_inverts_render(value: Topic) -> None:
    assert parse_topic(value.topic) == value


@pytest.mark.parametrize(
    ("topic", "words"),
    [
        ("mc/acme/ops", "at least 4"),
        ("mc/acme/ops/night/_x", "unknown group namespace '_x'"),
        ("mc/acme/ops/night/more/levels", "a group topic has 4"),
        ("mc/acme/_x/dev", "unknown system namespace '_x'"),
        ("mc/acme/_t/van-7/speed", "unknown telemetry kind 'speed'"),
        ("mc/acme/_d/dev/extra", "the namespace '_d' takes 4"),
        ("mc/acme/_t/van-7", "the namespace '_t' takes 5"),
        ("mc/Acme/ops/night", "org name 'Acme'"),
        ("mc/acme/ops/+", "wildcard '+'"),
        ("mc/acme/ops/#", "wildcard '#'"),
        ("other/acme/ops/night", "outside meshchat's tree"),
        ("owntracks/jane", "owntracks/{user}/{device}"),
        ("owntracks/Jane/phone", "OwnTracks user name 'Jane'"),
        ("", "empty"),
    ],
)
def test_bad_topics_are_refused_naming_the_part(topic: str, words: str) -> None:
    with pytest.raises(TopicError) as caught:
        parse_topic(topic)
    assert words in str(caught.value)


def test_owntracks_sample_topics_parse() -> None:
    samples = json.loads(OWNTRACKS_SAMPLES.read_text(encoding="utf-8"))["samples"]
    topics = [sample["topic"] for sample in samples if sample["topic"]]
    assert topics
    for topic in topics:
        parsed = parse_topic(topic)
        assert isinstance(parsed, OwnTracksTopic)
        assert parsed.topic == topic


@pytest.mark.parametrize(
    "topic", ["mc/acme/_s/dir/alice/answer", "mc/acme/_s/dir/alice/reply/more", "mc/acme/_s/dir/_x"]
)
def test_service_topics_have_one_shape(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_a_reply_topic_needs_a_requester() -> None:
    with pytest.raises(TopicError, match="requester"):
        ServiceTopic("acme", "dir", reply=True)
