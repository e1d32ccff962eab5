"""MQTT 3.1.1 topic names, topic filters and the matcher between them (spec section 4.7)."""

from __future__ import annotations

from typing import Final

from meshchat.errors import TopicError

__all__ = [
    "MAX_TOPIC_BYTES",
    "matches",
    "validate_filter",
    "validate_topic",
]

MAX_TOPIC_BYTES: Final = 65535
"""MQTT 3.1.1 section 1.5.3: a topic is a UTF-8 string of at most 65,535 bytes."""


def _check_utf8(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise TopicError(
            f"{what} must be a string, not {type(text).__name__}", part=what, value=repr(text)
        )
    if not text:
        raise TopicError(f"{what} is empty", part=what, value=text)
    if "\x00" in text:
        raise TopicError(
            f"{what} {text!r} holds a NUL character at position {text.index(chr(0))}",
            part=what,
            value=text,
        )
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise TopicError(
            f"{what} {text!r} is not valid UTF-8 (lone surrogate at position {exc.start})",
            part=what,
            value=text,
        ) from exc
    if size > MAX_TOPIC_BYTES:
        raise TopicError(
            f"{what} is {size} bytes long; MQTT allows at most {MAX_TOPIC_BYTES}",
            part=what,
            value=text[:64],
        )
    return text


def validate_topic(topic: object) -> str:
    """Check an MQTT topic name (what a PUBLISH carries) and return it.

    Raises:
        TopicError: empty, too long, not UTF-8, holds NUL or a wildcard.
    """
    text = _check_utf8(topic, "topic")
    for wildcard in "+#":
        if wildcard in text:
            raise TopicError(
                f"topic {text!r} holds the wildcard {wildcard!r} at position "
                f"{text.index(wildcard)}; wildcards belong in subscriptions only",
                part="topic",
                value=text,
            )
    return text


def validate_filter(topic_filter: object) -> str:
    """Check an MQTT topic filter (what a SUBSCRIBE carries) and return it.

    Raises:
        TopicError: empty, too long, not UTF-8, holds NUL, or a wildcard that does not stand
            alone in its level (``#`` must also be the last level).
    """
    text = _check_utf8(topic_filter, "topic filter")
    levels = text.split("/")
    for number, level in enumerate(levels):
        if "#" in level and (level != "#" or number != len(levels) - 1):
            raise TopicError(
                f"topic filter {text!r}: '#' must stand alone in the last level "
                f"(level {number + 1} is {level!r})",
                part="topic filter",
                value=text,
            )
        if "+" in level and level != "+":
            raise TopicError(
                f"topic filter {text!r}: '+' must stand alone in its level "
                f"(level {number + 1} is {level!r})",
                part="topic filter",
                value=text,
            )
    return text


def matches(topic_filter: str, topic: str) -> bool:
    """Say whether `topic` matches `topic_filter`, exactly as an MQTT 3.1.1 broker decides.

    ``+`` matches one level (an empty one too), ``#`` matches the parent level and every level
    below it, and a topic starting with ``$`` is not matched by a filter whose first level is a
    wildcard.

    Raises:
        TopicError: the filter or the topic is invalid.
    """
    filter_levels = validate_filter(topic_filter).split("/")
    topic_levels = validate_topic(topic).split("/")
    if topic.startswith("$") and filter_levels[0] in {"+", "#"}:
        return False
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level not in {"+", topic_levels[index]}:
            return False
    return len(filter_levels) == len(topic_levels)
