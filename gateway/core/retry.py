"""The retry schedule: which delay the next attempt waits, and when attempts run out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# The delays of a copy that waits for another worker's claim on its id (or for the store), growing
# with each wait; independent of the retry schedule, whose steps may be far shorter or longer.
WAIT_SCHEDULE_S = (1.0, 2.0, 5.0, 10.0)
# Hops of a bulk request waiting for its recipient's quiet hours to end (lanes.py): a night passes
# in about a dozen hops, and the last ones land within seconds of the window's end.
DEFER_SCHEDULE_S = (60.0, 600.0, 3600.0)


def retry_delays_ms(schedule_s: Iterable[float]) -> list[int]:
    """The distinct delays of a retry schedule, the wait schedule and the quiet-hours hops, in ms: one
    retry queue each (topology declares them)."""
    return sorted({max(1, round(s * 1000)) for s in (*schedule_s, *WAIT_SCHEDULE_S, *DEFER_SCHEDULE_S)})


def wait_delay_ms(waits_made: int) -> int:
    """Delay before a copy looks again after its `waits_made + 1`-th wait."""
    return round(WAIT_SCHEDULE_S[min(waits_made, len(WAIT_SCHEDULE_S) - 1)] * 1000)


class RetryPolicy:
    def __init__(self, schedule_s: Sequence[float], max_attempts: int) -> None:
        self._schedule = [max(1, round(s * 1000)) for s in schedule_s]
        self.max_attempts = max_attempts

    def delay_ms(self, attempts_made: int) -> int:
        """Delay before attempt `attempts_made + 1` (attempts_made >= 1)."""
        return self._schedule[min(max(attempts_made, 1), len(self._schedule)) - 1]

    def exhausted(self, attempts_made: int) -> bool:
        return attempts_made >= self.max_attempts
