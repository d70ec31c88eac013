"""Time, injected: the core asks a `Clock` instead of the `time` module, so tests move time on
their own (see tests/fakes.py) and never sleep.

Three readings, each for one purpose:
- `monotonic()`: durations and deadlines inside this process (pauses, lingers);
- `time()`: epoch seconds, written into headers and the state store, comparable across processes;
- `now()`: the same instant as an aware UTC datetime (expiry of requests, outcome timestamps).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...

    def call_later(self, seconds: float, callback: Callable[..., Any], *args: Any) -> Timer: ...


class SystemClock:
    """The real clocks and the running event loop's timers."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return asyncio.get_running_loop().call_later(seconds, callback, *args)


SYSTEM = SystemClock()
