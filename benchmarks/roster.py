"""Who connects in the broker benchmark and where they publish: one layout for every broker.

Every client id and topic is a name meshchat's access policy accepts, so the site broker with
authentication and the ACL on serves exactly the load the other brokers serve: group topics
``mc/bench/ops/GROUP`` that publishers and subscribers are members of, and client ids that are
registered devices (a device logs in with its owner's name and its own token). The brokers that
take anonymous clients get the same client ids and topics, without credentials.

Fan-in has no wildcard subscriber: the policy refuses wildcard filters on group topics, so the
subscriber subscribes to each publisher's topic, on every broker alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

__all__ = [
    "DEPT",
    "IDLE_USER",
    "ORG",
    "PUBLISHER_USER",
    "SUBSCRIBER_USER",
    "Roster",
]

ORG: Final = "bench"
DEPT: Final = "ops"
PUBLISHER_USER: Final = "pubs"
"""Owns every publishing device; a member of every group."""
SUBSCRIBER_USER: Final = "subs"
"""Owns every subscribing device; a member of every group."""
IDLE_USER: Final = "idlers"
"""Owns the idle devices; a member of no group."""


def _group_topic(group: str) -> str:
    return f"mc/{ORG}/{DEPT}/{group}"


@dataclass(frozen=True, slots=True)
class Roster:
    """The clients and topics of one run, sized by the run's parameters.

    Attributes:
        publishers: publishers of fan-in and of the generator ceiling.
        fanout_subscribers: subscribers of the fan-out scenario.
        idle_clients: idle connections of the memory scenario.
    """

    publishers: int
    fanout_subscribers: int
    idle_clients: int

    fence_topic: ClassVar[str] = f"mc/{ORG}/_d/fence"
    """Where QoS 0 publishers send their closing QoS 1 fence: a device inbox, which anyone in
    the org may write to, that nobody subscribes to."""
    fanout_topic: ClassVar[str] = _group_topic("fanout")
    latency_topic: ClassVar[str] = _group_topic("latency")
    fanin_subscriber: ClassVar[str] = "fanin-sub"
    durable_subscriber: ClassVar[str] = "durable-sub"
    latency_publisher: ClassVar[str] = "latency-pub"
    latency_subscriber: ClassVar[str] = "latency-sub"

    def publisher_ids(self) -> tuple[str, ...]:
        """The fan-in (and ceiling) publishers; the first one also publishes in fan-out."""
        return tuple(f"pub-{n}" for n in range(self.publishers))

    def fanin_topics(self) -> tuple[str, ...]:
        """One group topic per publisher, in the order of `publisher_ids`."""
        return tuple(_group_topic(f"fanin-{n}") for n in range(self.publishers))

    def fanout_subscriber_ids(self) -> tuple[str, ...]:
        """The fan-out subscribers."""
        return tuple(f"fanout-sub-{n}" for n in range(self.fanout_subscribers))

    def idle_ids(self) -> tuple[str, ...]:
        """The idle clients."""
        return tuple(f"idle-{n}" for n in range(self.idle_clients))

    def devices(self) -> dict[str, str]:
        """Every client id, as the device it is registered as, with its owner."""
        owners = dict.fromkeys((*self.publisher_ids(), self.latency_publisher), PUBLISHER_USER)
        owners |= dict.fromkeys(
            (
                self.fanin_subscriber,
                self.durable_subscriber,
                self.latency_subscriber,
                *self.fanout_subscriber_ids(),
            ),
            SUBSCRIBER_USER,
        )
        return owners | dict.fromkeys(self.idle_ids(), IDLE_USER)

    def groups(self) -> tuple[str, ...]:
        """Every group as ``dept/name``; `PUBLISHER_USER` and `SUBSCRIBER_USER` are members."""
        topics = (*self.fanin_topics(), self.fanout_topic, self.latency_topic)
        return tuple(topic.removeprefix(f"mc/{ORG}/") for topic in topics)
