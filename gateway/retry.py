"""The retry schedule: which delay the next attempt waits, and when attempts run out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def retry_delays_ms(schedule_s: Iterable[float]) -> list[int]:
    """The distinct delays of a schedule, in ms: one retry queue each (topology declares them)."""
    return sorted({max(1, round(s * 1000)) for s in schedule_s})


class RetryPolicy:
    def __init__(self, schedule_s: Sequence[float], max_attempts: int) -> None:
        self._schedule = [max(1, round(s * 1000)) for s in schedule_s]
        self.max_attempts = max_attempts

    def delay_ms(self, attempts_made: int) -> int:
        """Delay before attempt `attempts_made + 1` (attempts_made >= 1)."""
        return self._schedule[min(max(attempts_made, 1), len(self._schedule)) - 1]

    def exhausted(self, attempts_made: int) -> bool:
        return attempts_made >= self.max_attempts
