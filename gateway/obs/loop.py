"""How late the event loop runs: a short timer's lateness, averaged over a window, is what every
callback waits for a turn on the loop. It is a gauge on /metrics, and process-wide admission
(core/admission.py) reads it to tell a saturated process from a busy one."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

from gateway.obs import metrics as m
from gateway.obs.logs import get_logger

log = get_logger("gateway.obs.loop")

TICK_S = 0.01
# While the loop is idle (the last window's lag under BUSY_LAG_S) the watch sleeps IDLE_TICK_S, so
# an idle process does not wake a hundred times a second. A timer's lateness reads the same either
# way; the first window with lag (2 ms, where admission stops growing its limit) goes back to
# TICK_S, before admission (5 ms) binds.
IDLE_TICK_S = 0.05
BUSY_LAG_S = 0.002
STALL_LOG_S = 0.1  # one wake this late is logged: something held the loop (a long callback, a GC pass)
GC_LOG_S = 0.05  # a full garbage collection pass this long is logged


async def watch_lag(report: Callable[[float], None], every_s: float) -> None:
    """Sleep `TICK_S` over and over (`IDLE_TICK_S` while the loop is idle); every `every_s`,
    `report` the mean lateness of those wakes."""
    total, ticks, window_started = 0.0, 0, time.monotonic()
    tick = TICK_S
    while True:
        before = time.monotonic()
        await asyncio.sleep(tick)
        after = time.monotonic()
        late = max(0.0, after - before - tick)
        total += late
        if late >= STALL_LOG_S:
            log.warning("loop_stalled", late_ms=round(late * 1000))
        ticks += 1
        if after - window_started >= every_s:
            lag = total / ticks
            m.LOOP_LAG.set(lag)
            try:
                report(lag)
            except Exception:  # a watch that died would leave admission's limit where it was
                log.exception("loop_lag_report_failed")
            total, ticks, window_started = 0.0, 0, after
            tick = TICK_S if lag >= BUSY_LAG_S else IDLE_TICK_S


class GcTimer:
    """Times the interpreter's full garbage collection passes (`gc.callbacks`, generation 2) and
    logs the long ones: a pass over a large heap holds the loop like any long callback."""

    def __init__(self) -> None:
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:  # the young generations' passes are short and very frequent
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        if took >= GC_LOG_S:
            log.warning("gc_pause", ms=round(took * 1000), collected=info.get("collected"))


GC_TIMER = GcTimer()


def time_gc() -> None:
    """Time full collections from now on, once per process however many gateways start in it."""
    if GC_TIMER not in gc.callbacks:
        gc.callbacks.append(GC_TIMER)
