"""How many provider calls one account may have in flight: an adaptive limit, as TCP's congestion
window, with a latency guard as in Netflix's concurrency-limits.

A slow provider needs more calls in flight for the same throughput (calls in flight = rate x
latency / batch size), and nothing but the provider's own answers says how slow it is now. So:

- it grows only while work is waiting for a send slot (an idle account keeps its limit), and only
  while a batch takes no longer than `TOLERANCE` x the shortest recent batch: when more calls in
  flight only make each one slower (the CPU or the provider is the bottleneck, not the slots),
  more would buy nothing;
- **slow start**: until the first congestion, +1 per clean batch (the limit doubles each round
  trip), so a cold gateway reaches a slow provider's need within a few round trips;
- **additive increase** after that: +1 per round of `limit` clean batches;
- **multiplicative decrease**: a batch that meets congestion (a timeout, a 5xx, a transport
  failure, throttling) halves it, at most once per `COOLDOWN_S`, so one slow spell that fails
  many calls at once counts once;
- never below `floor`, never above `cap`.

The limit never bypasses the account's rate budget: every send still takes its tokens from the
shared bucket (ratelimit.py). No I/O; the clock is injected.
"""

from __future__ import annotations

from collections import deque

from gateway.clock import SYSTEM, Clock

DECREASE = 0.5
COOLDOWN_S = 1.0
TOLERANCE = 2.0  # a batch slower than this x the recent fastest: more in flight would not help
WINDOW = 50  # batches the recent fastest is taken over


class AdaptiveLimit:
    def __init__(self, start: int, cap: int, *, floor: int = 1, clock: Clock = SYSTEM) -> None:
        self.cap = max(1, cap)
        self.floor = max(1, min(floor, self.cap))
        self._limit = min(max(start, self.floor), self.cap)
        self._credit = 0  # clean batches under a backlog since the last additive step
        self._slow_start = True
        self._clock = clock
        self._cut_at = -COOLDOWN_S * 2
        self._recent: deque[float] = deque(maxlen=WINDOW)

    @property
    def current(self) -> int:
        return self._limit

    def succeeded(self, *, waiting: bool, duration_s: float | None = None) -> bool:
        """A batch finished without congestion in `duration_s`; `waiting`: work was waiting for a
        slot. Returns whether the limit grew."""
        if duration_s is not None:
            self._recent.append(duration_s)
            if duration_s > TOLERANCE * min(self._recent):
                self._credit = 0
                return False  # slower with more in flight: the slots are not the bottleneck
        if not waiting or self._limit >= self.cap:
            return False
        self._credit += 1
        if not self._slow_start and self._credit < self._limit:
            return False
        self._credit = 0
        self._limit += 1
        return True

    def congested(self) -> bool:
        """A batch met timeouts, 5xx or throttling. Returns whether the limit was cut."""
        now = self._clock.monotonic()
        self._credit = 0
        self._slow_start = False
        if now - self._cut_at < COOLDOWN_S or self._limit <= self.floor:
            return False
        self._cut_at = now
        self._limit = max(self.floor, int(self._limit * DECREASE))
        return True
