"""Batching: joins wait briefly, leaves longer, and joins never drag pending leaves along."""

from __future__ import annotations

from meshchat.geofence import Batcher, Due


def test_joins_and_leaves_each_wait_for_their_own_deadline() -> None:
    batcher = Batcher(join_delay=10, leave_delay=120)
    assert batcher.next_due() is None
    batcher.note("plant-3", entered=False, now=100)
    batcher.note("plant-3", entered=True, now=105)
    batcher.note("plant-3", entered=True, now=110)  # the first one set the deadline
    assert batcher.next_due() == 115
    assert batcher.due(114) == []
    assert batcher.due(115) == [Due("plant-3", joins=True, leaves=False)]
    assert batcher.next_due() == 220
    batcher.note("plant-3", entered=False, now=200)  # still the first leave's deadline
    assert batcher.due(220) == [Due("plant-3", joins=False, leaves=True)]
    assert batcher.pending == 0


def test_a_shift_change_is_one_batch_per_site() -> None:
    batcher = Batcher(join_delay=0, leave_delay=180)
    for second in range(0, 170, 10):
        batcher.note("plant-3", entered=False, now=second)
    batcher.note("yard", entered=True, now=30)
    assert batcher.due(30) == [Due("yard", joins=True, leaves=False)]
    assert batcher.due(179) == []
    assert batcher.due(180) == [Due("plant-3", joins=False, leaves=True)]
