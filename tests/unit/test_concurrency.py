"""The adaptive in-flight limit: slow start, then additive increase under a backlog; halved on
congestion (once per cooldown); trimmed when batches queue behind each other; bounds."""

from __future__ import annotations

from gateway.core.concurrency import COOLDOWN_S, WINDOW_S, AdaptiveLimit
from tests.fakes import FakeClock


def test_grows_only_while_work_waits_doubling_per_round_until_the_first_congestion() -> None:
    limit = AdaptiveLimit(4, 64, clock=FakeClock())
    for _ in range(100):
        limit.succeeded(waiting=False, duration_s=0.2)
    assert limit.current == 4  # nothing waited: no reason to grow
    for _ in range(4):  # one round trip at 4 in flight
        limit.succeeded(waiting=True, duration_s=0.2)
    assert limit.current == 8
    for _ in range(8):
        limit.succeeded(waiting=True, duration_s=0.2)
    assert limit.current == 16


def test_after_a_congestion_it_grows_by_one_per_round() -> None:
    clock = FakeClock()
    limit = AdaptiveLimit(16, 64, clock=clock)
    assert limit.congested()
    assert limit.current == 8
    for _ in range(8):
        limit.succeeded(waiting=True, duration_s=0.2)
    assert limit.current == 9
    for _ in range(9):
        limit.succeeded(waiting=True, duration_s=0.2)
    assert limit.current == 10


def test_queueing_stops_growth_and_trims_one_per_round_trip() -> None:
    """At zero provider latency the CPU is the bottleneck: a batch takes longer the more run at
    once. Slow start overshoots; batches slower than twice the baseline trim it back, one per
    batch duration, instead of only stopping its growth."""
    clock = FakeClock()
    limit = AdaptiveLimit(4, 64, clock=clock)
    for _ in range(4):
        limit.succeeded(waiting=True, duration_s=0.1)
    assert limit.current == 8
    for _ in range(25):  # 2.5 s of batches taking 0.5 s: five round trips
        clock.advance(0.1)
        limit.succeeded(waiting=True, duration_s=0.5)
    assert limit.current == 4  # 8 - 5, but never below the start: only congestion goes lower
    limit = AdaptiveLimit(4, 64, clock=clock)
    for _ in range(4):
        limit.succeeded(waiting=True, duration_s=0.1)
    for _ in range(3):  # two round trips of 0.3 s batches
        clock.advance(0.2)
        limit.succeeded(waiting=True, duration_s=0.3)
    assert limit.current == 6
    for _ in range(6):  # back within twice the baseline: growth again, one per round (slow start is over)
        clock.advance(0.1)
        limit.succeeded(waiting=True, duration_s=0.15)
    assert limit.current == 7


def test_the_baseline_is_the_fastest_batch_of_a_time_window_not_of_the_last_batches() -> None:
    """A window of batches would move up with the limit it judges; a window of time forgets a
    faster past only after WINDOW_S (a provider that became slower for good)."""
    clock = FakeClock()
    limit = AdaptiveLimit(4, 64, clock=clock)
    limit.succeeded(waiting=False, duration_s=0.1)
    for _ in range(200):  # many more batches than any batch window, all within the time window
        clock.advance(WINDOW_S / 400)
        limit.succeeded(waiting=True, duration_s=0.5)
    assert limit.baseline_s == 0.1
    assert limit.current == 4  # trimmed to its start
    clock.advance(WINDOW_S)
    low = limit.current
    for _ in range(low):
        limit.succeeded(waiting=True, duration_s=0.5)
    assert limit.baseline_s == 0.5
    assert limit.current == low + 1


def test_never_past_the_cap_nor_below_the_floor() -> None:
    clock = FakeClock()
    limit = AdaptiveLimit(4, 8, clock=clock)
    for _ in range(1000):
        limit.succeeded(waiting=True, duration_s=0.2)
    assert limit.current == 8
    assert AdaptiveLimit(50, 8).current == 8  # a start above the cap is the cap
    for _ in range(10):
        clock.advance(COOLDOWN_S)
        limit.congested()
    assert limit.current == 1


def test_one_slow_spell_is_one_cut() -> None:
    clock = FakeClock()
    limit = AdaptiveLimit(16, 32, clock=clock)
    assert limit.congested()
    assert not limit.congested()  # the same spell, reported by the next failing batch
    assert limit.current == 8
    clock.advance(COOLDOWN_S)
    assert limit.congested()
    assert limit.current == 4
