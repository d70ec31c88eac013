"""The adaptive in-flight limit: slow start, then additive increase under a backlog; halved on
congestion (once per cooldown); no growth when batches only get slower; bounds."""

from __future__ import annotations

from gateway.concurrency import COOLDOWN_S, AdaptiveLimit
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


def test_no_growth_when_more_in_flight_only_makes_batches_slower() -> None:
    """At zero provider latency the CPU is the bottleneck: a batch takes longer the more run at
    once, and the limit stays where it is."""
    limit = AdaptiveLimit(4, 64, clock=FakeClock())
    limit.succeeded(waiting=True, duration_s=0.01)
    assert limit.current == 5
    for _ in range(20):
        limit.succeeded(waiting=True, duration_s=0.05)  # 5x the fastest
    assert limit.current == 5


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
