"""How late the event loop runs: a short timer's lateness, averaged over a window, is what every
callback waits for a turn on the loop. It is a gauge on /metrics, and process-wide admission
(core/admission.py) reads it to tell a saturated process from a busy one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.obs import metrics as m
from gateway.obs.logs import get_logger

log = get_logger("gateway.obs.loop")

TICK_S = 0.01


async def watch_lag(report: Callable[[float], None], every_s: float) -> None:
    """Sleep `TICK_S` over and over; every `every_s`, `report` the mean lateness of those wakes."""
    total, ticks, window_started = 0.0, 0, time.monotonic()
    while True:
        before = time.monotonic()
        await asyncio.sleep(TICK_S)
        after = time.monotonic()
        total += max(0.0, after - before - TICK_S)
        ticks += 1
        if after - window_started >= every_s:
            lag = total / ticks
            m.LOOP_LAG.set(lag)
            try:
                report(lag)
            except Exception:  # a watch that died would leave admission's limit where it was
                log.exception("loop_lag_report_failed")
            total, ticks, window_started = 0.0, 0, after
