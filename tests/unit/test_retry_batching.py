from __future__ import annotations

import asyncio

from gateway.batching import Batcher
from gateway.retry import RetryPolicy


def test_retry_schedule_repeats_its_last_delay_and_runs_out() -> None:
    policy = RetryPolicy([1, 5, 30], max_attempts=5)
    assert [policy.delay_ms(n) for n in (1, 2, 3, 4, 9)] == [1000, 5000, 30000, 30000, 30000]
    assert not policy.exhausted(4)
    assert policy.exhausted(5)


async def test_batcher_flushes_on_size_and_on_linger_per_key() -> None:
    flushed: list[list[int]] = []
    b: Batcher[int] = Batcher(max_size=3, linger_s=0.05, key=lambda n: n % 2, on_flush=flushed.append)
    for n in range(7):
        b.add(n)
    assert flushed == [[0, 2, 4], [1, 3, 5]]
    assert len(b) == 1
    await asyncio.sleep(0.1)
    assert flushed[-1] == [6]
    assert len(b) == 0


async def test_batcher_take_all_cancels_timers() -> None:
    flushed: list[list[int]] = []
    b: Batcher[int] = Batcher(max_size=10, linger_s=0.05, key=lambda n: 0, on_flush=flushed.append)
    b.add(1)
    b.add(2)
    assert b.take_all() == [1, 2]
    await asyncio.sleep(0.1)
    assert flushed == []
