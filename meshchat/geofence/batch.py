"""Batching membership changes into roster epochs (sans-IO, driven by the caller's clock).

Every applied batch is one new roster epoch of a site channel, and a batch with a leave makes
every sender rotate its keys. So changes wait a little and go together: joins at most
`Batcher.join_delay` seconds (a worker who walks in should not wait long), leaves at most
`Batcher.leave_delay` seconds (a shift change then costs one rotation, not one per person).
A site's joins are applied when their time comes without dragging its pending leaves along.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_JOIN_DELAY_S", "DEFAULT_LEAVE_DELAY_S", "Batcher", "Due"]

DEFAULT_JOIN_DELAY_S: Final = 10.0
DEFAULT_LEAVE_DELAY_S: Final = 120.0


@dataclass(frozen=True, slots=True)
class Due:
    """A site whose batch is due: apply its joins, its leaves, or both."""

    site: str
    joins: bool
    leaves: bool


class Batcher:
    """Pending joins and leaves per site, each kind with its own deadline."""

    def __init__(
        self,
        *,
        join_delay: float = DEFAULT_JOIN_DELAY_S,
        leave_delay: float = DEFAULT_LEAVE_DELAY_S,
    ) -> None:
        """Batch joins for up to `join_delay` and leaves for up to `leave_delay` seconds."""
        if join_delay < 0 or leave_delay < 0:
            raise ValueError("batch delays must not be negative")
        self.join_delay = join_delay
        self.leave_delay = leave_delay
        self._joins: dict[str, float] = {}
        self._leaves: dict[str, float] = {}

    def note(self, site: str, *, entered: bool, now: float) -> None:
        """A user entered (or left) `site` at `now`; the first pending change sets the deadline."""
        pending = self._joins if entered else self._leaves
        pending.setdefault(site, now)

    def next_due(self) -> float | None:
        """When the next batch is due, or None when nothing waits."""
        times = [since + self.join_delay for since in self._joins.values()]
        times += [since + self.leave_delay for since in self._leaves.values()]
        return min(times, default=None)

    def due(self, now: float) -> list[Due]:
        """Take the batches due at `now`, by site name."""
        joins = {site for site, since in self._joins.items() if now >= since + self.join_delay}
        leaves = {site for site, since in self._leaves.items() if now >= since + self.leave_delay}
        for site in joins:
            del self._joins[site]
        for site in leaves:
            del self._leaves[site]
        return [Due(site, site in joins, site in leaves) for site in sorted(joins | leaves)]

    @property
    def pending(self) -> int:
        """Sites with changes waiting."""
        return len(self._joins.keys() | self._leaves.keys())
