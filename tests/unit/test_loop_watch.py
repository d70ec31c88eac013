"""The loop watch names what held the loop (one late wake, a long full garbage collection), and
ticks slowly while the loop is idle."""

from __future__ import annotations

import asyncio
import time
import types

import pytest
from structlog.testing import capture_logs

from gateway.obs.loop import GC_LOG_S, STALL_LOG_S, GcTimer, watch_lag


async def test_a_wake_held_past_the_stall_bound_is_logged_with_how_late_it_was() -> None:
    with capture_logs() as logs:
        watch = asyncio.create_task(watch_lag(lambda _lag: None, 1.0))
        try:
            await asyncio.sleep(0.05)
            time.sleep(STALL_LOG_S + 0.05)  # a callback that holds the loop
            await asyncio.sleep(0.05)
        finally:
            watch.cancel()
    stalls = [e for e in logs if e["event"] == "loop_stalled"]
    assert len(stalls) == 1
    assert stalls[0]["late_ms"] >= STALL_LOG_S * 1000


def test_only_long_full_collections_are_logged() -> None:
    timer = GcTimer()
    with capture_logs() as logs:
        timer("start", {"generation": 0})
        time.sleep(GC_LOG_S + 0.01)
        timer("stop", {"generation": 0, "collected": 5})  # a young pass: never timed
        timer("start", {"generation": 2})
        timer("stop", {"generation": 2, "collected": 1})  # a short full pass
        timer("start", {"generation": 2})
        time.sleep(GC_LOG_S + 0.01)
        timer("stop", {"generation": 2, "collected": 7})
    pauses = [e for e in logs if e["event"] == "gc_pause"]
    assert [p["collected"] for p in pauses] == [7]
    assert pauses[0]["ms"] >= GC_LOG_S * 1000


async def test_the_watch_ticks_slowly_while_the_loop_is_idle_and_fast_once_it_lags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.obs import loop

    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) % 2 == 0 and busy:
            time.sleep(0.06)  # a callback holding the loop: this wake is late
        await real_sleep(seconds)

    monkeypatch.setattr(loop, "asyncio", types.SimpleNamespace(sleep=sleep))
    monkeypatch.setattr(loop, "BUSY_LAG_S", 0.02)  # far above an idle loop's lag on a loaded machine
    busy = False
    reports: list[float] = []
    watch = asyncio.create_task(watch_lag(reports.append, 0.2))
    try:
        while len(reports) < 2:
            await real_sleep(0.01)
        assert slept[0] == loop.TICK_S  # it starts fast
        assert slept[-1] == loop.IDLE_TICK_S  # an idle window: slow ticks
        busy = True
        seen = len(reports)
        while len(reports) < seen + 2:
            await real_sleep(0.01)
        assert reports[-1] >= loop.BUSY_LAG_S
        assert slept[-1] == loop.TICK_S  # a window with lag: fast again
    finally:
        watch.cancel()
