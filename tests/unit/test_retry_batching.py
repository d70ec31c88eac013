"""Retry timing and batching, on a clock the tests move: nothing here sleeps."""

from __future__ import annotations

import pytest

from gateway.core.batching import Batcher
from gateway.core.retry import RetryPolicy, retry_delays_ms, wait_delay_ms
from tests.fakes import FakeClock


def test_retry_schedule_repeats_its_last_delay_and_runs_out() -> None:
    policy = RetryPolicy([1, 5, 30], max_attempts=5)
    assert [policy.delay_ms(n) for n in (1, 2, 3, 4, 9)] == [1000, 5000, 30000, 30000, 30000]
    assert not policy.exhausted(4)
    assert policy.exhausted(5)


def test_every_delay_of_the_schedule_and_of_the_waits_has_one_retry_queue() -> None:
    # The wait schedule (1, 2, 5, 10 s) and the quiet-hours hops (60 s, 10 min, 1 h) are declared
    # whatever the retry schedule.
    assert retry_delays_ms([1, 5, 5, 0.0001, 30]) == [1, 1000, 2000, 5000, 10000, 30000, 60000, 600000, 3600000]


def test_a_wait_grows_along_its_own_schedule_and_stays_at_its_last_step() -> None:
    assert [wait_delay_ms(n) for n in range(6)] == [1000, 2000, 5000, 10000, 10000, 10000]


def test_batcher_flushes_on_size_and_on_linger_per_key_while_busy() -> None:
    clock = FakeClock()
    flushed: list[list[int]] = []
    busy = {"now": True}
    b: Batcher[int] = Batcher(
        max_size=3,
        linger_s=0.05,
        key=lambda n: n % 2,
        on_flush=flushed.append,
        clock=clock,
        ready=lambda: not busy["now"],  # busy while the groups start: they linger
    )
    for n in range(6):
        b.add(n)
    busy["now"] = False
    b.pump()
    assert flushed == [[0, 2, 4], [1, 3, 5]]
    busy["now"] = True
    b.add(6)
    busy["now"] = False
    assert len(b) == 1
    clock.advance(0.049)
    assert len(b) == 1  # not yet lingered
    clock.advance(0.001)
    assert flushed[-1] == [6]
    assert len(b) == 0


def test_batcher_sends_a_group_after_quiet_s_when_a_slot_is_free() -> None:
    """Low latency when idle: a group started while a slot is free goes `quiet_s` after it
    started, with whatever joined it meanwhile, not after the linger."""
    clock = FakeClock()
    flushed: list[list[int]] = []
    b: Batcher[int] = Batcher(
        max_size=100, linger_s=0.5, quiet_s=0.005, key=lambda n: 0, on_flush=flushed.append, clock=clock
    )
    b.add(1)
    clock.advance(0.004)
    b.add(2)  # joins the group
    assert flushed == []
    clock.advance(0.001)
    assert flushed == [[1, 2]]  # 5 ms after the first, not 500
    b.add(3)
    clock.advance(0.005)
    assert flushed == [[1, 2], [3]]


def test_batcher_take_all_cancels_timers() -> None:
    clock = FakeClock()
    flushed: list[list[int]] = []
    b: Batcher[int] = Batcher(max_size=10, linger_s=0.05, key=lambda n: 0, on_flush=flushed.append, clock=clock)
    b.add(1)
    b.add(2)
    assert b.take_all() == [1, 2]
    clock.advance(1)
    assert flushed == []


def test_batcher_holds_due_groups_while_the_owner_is_busy_and_they_grow() -> None:
    clock = FakeClock()
    flushed: list[list[int]] = []
    slots = {"free": 0}
    b: Batcher[int] = Batcher(
        max_size=4,
        linger_s=0.02,
        key=lambda n: 0,
        on_flush=flushed.append,
        ready=lambda: slots["free"] > 0,
        clock=clock,
    )
    b.add(0)
    clock.advance(0.05)  # lingered, but no slot: nothing handed over
    assert flushed == []
    for n in range(1, 10):
        b.add(n)
    assert flushed == []
    assert len(b) == 10
    slots["free"] = 1
    b.pump()  # a slot is free: the grown group goes out in max-size batches, oldest first
    assert flushed == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(b) == 0


def test_batcher_hands_over_one_batch_per_free_slot() -> None:
    flushed: list[list[int]] = []
    busy = {"n": 0}

    def take(batch: list[int]) -> None:
        flushed.append(batch)
        busy["n"] += 1

    b: Batcher[int] = Batcher(
        max_size=2, linger_s=10, key=lambda n: n % 3, on_flush=take, ready=lambda: busy["n"] < 1, clock=FakeClock()
    )
    for n in (0, 3, 1, 4, 2, 5):
        b.add(n)
    assert flushed == [[0, 3]]  # full groups wait for the only slot
    busy["n"] = 0
    b.pump()
    assert flushed == [[0, 3], [1, 4]]
    b.flush_all()  # shutdown hands over everything, ready or not
    assert flushed == [[0, 3], [1, 4], [2, 5]]


@pytest.mark.parametrize("eager", [True, False])
def test_a_lingering_group_goes_when_a_slot_frees_only_while_the_owner_is_eager(eager: bool) -> None:
    """A group that started behind a busy moment is shortened to `quiet_s` once the owner is eager
    (lightly loaded, nothing more queued); otherwise it keeps lingering and filling."""
    clock = FakeClock()
    flushed: list[list[int]] = []
    slots = {"free": 0}
    b: Batcher[int] = Batcher(
        max_size=100,
        linger_s=0.1,
        quiet_s=0.005,
        key=lambda n: 0,
        on_flush=flushed.append,
        ready=lambda: slots["free"] > 0,
        eager=lambda: eager,
        clock=clock,
    )
    b.add(1)  # every slot busy: the group lingers
    clock.advance(0.002)
    slots["free"] = 1
    b.pump()  # a slot frees 2 ms after the group started
    assert flushed == []  # not before it is quiet_s old
    b.add(2)
    clock.advance(0.003)
    if eager:
        assert flushed == [[1, 2]], "5 ms after it started, not after the 100 ms linger"
    else:
        assert flushed == []
        clock.advance(0.095)
        assert flushed == [[1, 2]], "the whole linger"
