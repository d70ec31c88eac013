"""How many provider calls one account may have in flight: an adaptive limit, as TCP's congestion
window, with a latency guard as in Netflix's concurrency-limits.

A slow provider needs more calls in flight for the same throughput (calls in flight = rate x
latency / batch size), and nothing but the provider's own answers says how slow it is now. So:

- it grows only while work is waiting for a send slot (an idle account keeps its limit);
- **slow start**: until the first sign of trouble, +1 per clean batch (the limit doubles each
  round trip), so a cold gateway reaches a slow provider's need within a few round trips;
- **additive increase** after that: +1 per round of `limit` clean batches;
- **queueing trims it** (as TCP Vegas): a batch that takes longer than `TOLERANCE` x the
  fastest batch of the last `WINDOW_S` seconds is waiting behind the others (for the CPU, the
  store, or a provider that slows down under load), not for the provider's own latency. More in
  flight would buy nothing but latency and prefetched work, so the limit does not grow and loses
  one per round trip, down to where it started (`concurrency`). This undoes slow start's
  overshoot where the gateway itself is the bottleneck (zero provider latency). Not below the
  start: a send slot stays taken while its outcomes are published, so fewer slots than that
  leave the CPU idle between batches (measured: a limit trimmed to 1-3 drained 13% slower).
  The baseline is a minimum over time, not over the last few batches: a window of batches moves
  up with the limit it is meant to judge. A provider that becomes slower for good costs one
  window of a trimmed limit, until the baseline has caught up;
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
TOLERANCE = 2.0  # a batch slower than this x the baseline is queueing behind the others
WINDOW_S = 30.0  # the baseline: the fastest batch over this long


class AdaptiveLimit:
    def __init__(self, start: int, cap: int, *, floor: int = 1, clock: Clock = SYSTEM) -> None:
        self.cap = max(1, cap)
        self.floor = max(1, min(floor, self.cap))
        self._limit = min(max(start, self.floor), self.cap)
        self._start = self._limit  # queueing trims it no lower than where it started: only congestion does
        self._credit = 0  # clean batches under a backlog since the last additive step
        self._slow_start = True
        self._clock = clock
        self._cut_at = -COOLDOWN_S * 2
        self._trimmed_at = -WINDOW_S
        # (time, duration) with durations strictly increasing: the front is the window's minimum.
        self._fastest: deque[tuple[float, float]] = deque()

    @property
    def current(self) -> int:
        return self._limit

    @property
    def baseline_s(self) -> float | None:
        """The fastest batch of the last WINDOW_S seconds."""
        return self._fastest[0][1] if self._fastest else None

    def _observe(self, now: float, duration_s: float) -> float:
        while self._fastest and self._fastest[-1][1] >= duration_s:
            self._fastest.pop()
        self._fastest.append((now, duration_s))
        while self._fastest[0][0] < now - WINDOW_S:
            self._fastest.popleft()
        return self._fastest[0][1]

    def succeeded(self, *, waiting: bool, duration_s: float | None = None) -> bool:
        """A batch finished without congestion in `duration_s`; `waiting`: work was waiting for a
        slot. Returns whether the limit changed."""
        if duration_s is not None:
            now = self._clock.monotonic()
            baseline = self._observe(now, duration_s)
            if duration_s > TOLERANCE * baseline:
                return self._trim(now, duration_s)
        if not waiting or self._limit >= self.cap:
            return False
        self._credit += 1
        if not self._slow_start and self._credit < self._limit:
            return False
        self._credit = 0
        self._limit += 1
        return True

    def _trim(self, now: float, duration_s: float) -> bool:
        """Queueing: no growth, and one less per round trip (a batch's duration)."""
        self._credit = 0
        self._slow_start = False
        if now - self._trimmed_at < duration_s or self._limit <= self._start:
            return False
        self._trimmed_at = now
        self._limit -= 1
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
