"""Alerts from a device's own status, sans-IO: rules, deduplication, rate limiting.

The device evaluates its rules on each status it publishes (and takes alerts the application
raises itself) and posts them into a group as ordinary end-to-end encrypted messages, signed
by the device: the people in the group read them in `meshchat chat`, the archiver keeps them.

- A rule compares one status field with a limit: ``battery < 15``, ``temperature > 60``,
  ``load > 80`` (the defaults), or ``extra.door_open == 1``.
- Deduplication: an alert (a rule, or an application's alert key) that fires again within the
  window of its last occurrence (10 minutes by default) does not post a new message: it counts,
  and the first message is edited to show the count (``x100, last 14:03:10 UTC``). Edits of one
  alert go out at most every 30 seconds; counts in between are folded into the next edit, and
  `Alerter.flush` sends what is left (the SDK calls it with every report and on close).
- Rate limit: at most 5 new alert messages per device per minute; alerts beyond that are
  counted and the next alert that goes out says how many were held back.
"""

from __future__ import annotations

import enum
import operator
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, TypeAlias

from meshchat.device.telemetry import Status
from meshchat.errors import ConfigError

__all__ = [
    "DEFAULT_RULES",
    "AlertPost",
    "AlertRule",
    "Alerter",
    "NewAlert",
    "UpdateAlert",
    "parse_rules",
]

DEFAULT_WINDOW: Final = 600.0
DEFAULT_EDIT_INTERVAL: Final = 30.0
DEFAULT_MAX_PER_MINUTE: Final = 5
MAX_ALERT_TEXT: Final = 300
_FIELDS: Final = frozenset({"battery", "temperature", "load", "signal", "uptime"})
_RULE: Final = re.compile(
    r"\A\s*(?P<field>[a-z]+(?:\.[a-z0-9][a-z0-9_-]{0,31})?)\s*(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<limit>-?\d+(?:\.\d+)?)\s*\Z"
)


class _Op(enum.StrEnum):
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "=="
    NE = "!="


_COMPARE: Final[dict[_Op, Callable[[float, float], bool]]] = {
    _Op.LT: operator.lt,
    _Op.LE: operator.le,
    _Op.GT: operator.gt,
    _Op.GE: operator.ge,
    _Op.EQ: operator.eq,
    _Op.NE: operator.ne,
}
_UNITS: Final = {
    "battery": "%",
    "temperature": " °C",
    "load": "%",
    "signal": " dBm",
    "uptime": " s",
}


@dataclass(frozen=True, slots=True)
class AlertRule:
    """A condition on one status field; it fires when the field's value meets it.

    Attributes:
        field: ``battery``, ``temperature``, ``load``, ``signal``, ``uptime`` or
            ``extra.NAME`` (a numeric or boolean extra reading).
        op: ``<``, ``<=``, ``>``, ``>=``, ``==`` or ``!=``.
        limit: the number it compares with.
    """

    field: str
    op: str
    limit: float

    def __post_init__(self) -> None:
        """Check the field and the operator.

        Raises:
            ConfigError: an unknown field or operator.
        """
        if self.field not in _FIELDS and not self.field.startswith("extra."):
            raise ConfigError(
                f"alert rule field {self.field!r} is unknown: one of "
                f"{', '.join(sorted(_FIELDS))} or extra.NAME"
            )
        if self.op not in set(_Op):
            raise ConfigError(f"alert rule operator {self.op!r} is unknown")

    @classmethod
    def parse(cls, text: str) -> AlertRule:
        """A rule from text such as ``battery < 15``.

        Raises:
            ConfigError: it is not FIELD OP NUMBER.
        """
        match = _RULE.match(text)
        if match is None:
            raise ConfigError(f"alert rule {text!r} must read FIELD OP NUMBER, e.g. 'battery < 15'")
        return cls(match["field"], match["op"], float(match["limit"]))

    @property
    def key(self) -> str:
        """The rule as text: its alerts are deduplicated under it."""
        return f"{self.field} {self.op} {self.limit:g}"

    def value(self, status: Status) -> float | None:
        """The field's value in `status`, or None when the status does not have it."""
        if self.field.startswith("extra."):
            raw = status.extra.get(self.field.removeprefix("extra."))
            if isinstance(raw, bool):
                return float(raw)
            return float(raw) if isinstance(raw, int | float) else None
        raw = getattr(status, self.field)
        return None if raw is None else float(raw)

    def fires(self, status: Status) -> float | None:
        """The offending value when the rule fires on `status`, else None."""
        value = self.value(status)
        if value is None or not _COMPARE[_Op(self.op)](value, self.limit):
            return None
        return value

    def describe(self, value: float) -> str:
        """What the alert says: ``battery 12% (rule: battery < 15)``."""
        unit = _UNITS.get(self.field, "")
        return f"{self.field} {value:g}{unit} (rule: {self.key})"


DEFAULT_RULES: Final = (
    AlertRule("battery", "<", 15),
    AlertRule("temperature", ">", 60),
    AlertRule("load", ">", 80),
)
"""Battery below 15%, temperature above 60 °C, load above 80%."""


@dataclass(frozen=True, slots=True)
class NewAlert:
    """Post a new alert message; tell the alerter its message id with `Alerter.posted`."""

    key: str
    text: str


@dataclass(frozen=True, slots=True)
class UpdateAlert:
    """Edit an alert message: the new text carries the count."""

    key: str
    message_id: tuple[int, int]
    text: str


AlertPost: TypeAlias = NewAlert | UpdateAlert


@dataclass(slots=True)
class _Alert:
    key: str
    text: str
    last_at: float
    count: int = 1
    shown: int = 1
    message_id: tuple[int, int] | None = None
    edited_at: float = 0.0


@dataclass(slots=True)
class Alerter:
    """One device's alerts: which fire, which are repeats, which may go out now.

    Attributes:
        device: the device's name, at the start of every alert.
        rules: the rules checked on every status.
        window: seconds after an alert's last occurrence within which a repeat only counts.
        edit_interval: the shortest time between two edits of one alert.
        max_per_minute: new alert messages per minute at most.
    """

    device: str
    rules: tuple[AlertRule, ...] = DEFAULT_RULES
    window: float = DEFAULT_WINDOW
    edit_interval: float = DEFAULT_EDIT_INTERVAL
    max_per_minute: int = DEFAULT_MAX_PER_MINUTE
    _alerts: dict[str, _Alert] = field(default_factory=dict)
    _recent: deque[float] = field(default_factory=deque)
    _held_back: int = 0

    def on_status(self, status: Status, *, now: float) -> list[AlertPost]:
        """Check the rules on a status the device publishes."""
        posts: list[AlertPost] = []
        for rule in self.rules:
            value = rule.fires(status)
            if value is not None:
                posts.extend(self.occurred(rule.key, rule.describe(value), now=now))
        return posts

    def occurred(self, key: str, text: str, *, now: float) -> list[AlertPost]:
        """An alert fired (from a rule, or raised by the application under its own key)."""
        text = text[:MAX_ALERT_TEXT]
        alert = self._alerts.get(key)
        if alert is not None and now - alert.last_at < self.window:
            alert.count += 1
            alert.last_at = now
            return self._edit_if_due(alert, now=now)
        while self._recent and now - self._recent[0] >= 60.0:
            self._recent.popleft()
        if len(self._recent) >= self.max_per_minute:
            self._held_back += 1
            return []
        self._recent.append(now)
        body = f"ALERT {self.device}: {text}"
        if self._held_back:
            body += f" ({self._held_back} more alerts held back by the rate limit)"
            self._held_back = 0
        self._alerts[key] = _Alert(key, body, now, edited_at=now)
        return [NewAlert(key, body)]

    def posted(self, key: str, message_id: tuple[int, int]) -> None:
        """The new alert under `key` went out as message `message_id`."""
        alert = self._alerts.get(key)
        if alert is not None:
            alert.message_id = message_id

    def _edit_if_due(self, alert: _Alert, *, now: float) -> list[AlertPost]:
        if alert.message_id is None or alert.count == alert.shown:
            return []
        if now - alert.edited_at < self.edit_interval:
            return []
        alert.shown = alert.count
        alert.edited_at = now
        last = datetime.fromtimestamp(alert.last_at, UTC).strftime("%H:%M:%S UTC")
        return [
            UpdateAlert(alert.key, alert.message_id, f"{alert.text} x{alert.count}, last {last}")
        ]

    def flush(self, *, now: float, force: bool = False) -> list[AlertPost]:
        """Counts not shown yet whose edit is due (all of them with `force`, on close)."""
        posts: list[AlertPost] = []
        for alert in self._alerts.values():
            if force:
                alert.edited_at = -self.edit_interval
            posts.extend(self._edit_if_due(alert, now=now))
        return posts

    @property
    def held_back(self) -> int:
        """Alerts held back by the rate limit and not yet mentioned."""
        return self._held_back

    def count(self, key: str) -> int:
        """How often the alert under `key` fired in its current window (0: not active)."""
        alert = self._alerts.get(key)
        return 0 if alert is None else alert.count


def parse_rules(texts: Iterable[str]) -> tuple[AlertRule, ...]:
    """Rules from texts such as ``battery < 15``.

    Raises:
        ConfigError: one of them is not FIELD OP NUMBER.
    """
    return tuple(AlertRule.parse(text) for text in texts)
