"""One account's flow control on the fake clock: pauses and the store backoff, the in-flight limit
it feeds, and the prefetch that follows the limit. No broker: the worker only carries these out."""

from __future__ import annotations

from gateway.core.concurrency import AdaptiveLimit
from gateway.core.flow import AccountFlow, PauseChange, PauseOrder
from tests.fakes import FakeClock


def flow(clock: FakeClock, *, start: int = 2, cap: int = 8, max_batch: int = 10) -> AccountFlow:
    return AccountFlow(
        max_batch=max_batch, limit=AdaptiveLimit(start, cap, clock=clock), account_pause_s=300, clock=clock
    )


def paused(f: AccountFlow) -> bool:
    return f.paused  # read through a call: each reading is the clock's answer now


def test_store_failures_back_off_doubling_to_a_minute_and_a_stored_batch_resets_it() -> None:
    f = flow(FakeClock())
    waits = [f.after_batch(store_failed=True, pause_account=False)[0].seconds for _ in range(8)]
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]
    assert f.after_batch(store_failed=False, pause_account=False) == []
    assert f.after_batch(store_failed=True, pause_account=False) == [PauseOrder(1.0, "store_failed")]


def test_an_account_error_pauses_for_the_account_pause_with_its_code() -> None:
    f = flow(FakeClock())
    orders = f.after_batch(store_failed=True, pause_account=True, code="3001")
    assert orders == [PauseOrder(1.0, "store_failed"), PauseOrder(300, "account_error", "3001")]


def test_a_pause_starts_gets_longer_never_shorter_and_ends_on_time() -> None:
    clock = FakeClock()
    f = flow(clock)
    assert f.paused_for_s == 0
    assert f.pause(10) is PauseChange.STARTED
    assert paused(f)
    assert f.paused_for_s == 10
    assert f.pause(5) is PauseChange.NONE  # a shorter pause changes nothing
    clock.advance(4)
    assert f.pause(20) is PauseChange.LONGER
    assert f.paused_for_s == 20
    clock.advance(19.9)
    assert paused(f)
    clock.advance(0.2)
    assert not paused(f)
    assert f.paused_for_s == 0
    assert f.pause(1) is PauseChange.STARTED  # over: the next pause starts afresh


def test_batches_are_handed_over_while_a_slot_is_free_and_early_only_when_lightly_loaded() -> None:
    f = flow(FakeClock(), start=2)
    assert f.prefetch == 30  # two calls in flight plus one batch forming
    assert f.ready()
    assert f.lightly_loaded(unsettled=0, prefetch=30)
    f.batches = 1
    assert f.ready()
    assert f.lightly_loaded(unsettled=20, prefetch=30)
    assert not f.lightly_loaded(unsettled=21, prefetch=30)  # the broker may hold more: let the batch fill
    f.batches = 2
    assert not f.ready()
    assert not f.lightly_loaded(unsettled=0, prefetch=30)


def test_the_prefetch_follows_the_limit_with_one_batch_of_headroom() -> None:
    clock = FakeClock()
    f = flow(clock, start=2, cap=8)
    assert f.prefetch_target(30) == 30
    # Slow start: each clean batch while work waits adds one.
    assert f.adapt(congested=False, waiting=True, took_s=None)
    assert f.limit.current == 3
    assert f.prefetch_target(30) == 50  # need 40, plus a batch
    assert not f.adapt(congested=False, waiting=False, took_s=None)  # nothing waited: no growth
    assert f.prefetch_target(50) == 50
    assert f.adapt(congested=True, waiting=True, took_s=None)  # congestion halves it
    assert f.limit.current == 1
    assert f.prefetch_target(49) == 49  # 29 above the need of 20: less than three batches
    assert f.prefetch_target(50) == 30  # three batches above: shrink to the need plus one
    for _ in range(60):  # additive increase after congestion: one per `limit` clean batches
        clock.advance(2)
        f.adapt(congested=False, waiting=True, took_s=None)
    assert f.limit.current == 8
    assert f.prefetch_target(30) == 90  # never above what the cap needs
