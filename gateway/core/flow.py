"""One account's flow control, without I/O: how many batches may be in flight, how much the
broker may hand over ahead (the prefetch), when a batch goes out early, and when the account
pauses and for how long.

    batch result --after_batch--> pauses (store backoff, account error) --pause--> started / longer / none
                 --adapt-------> the in-flight limit (concurrency.py) --prefetch_target--> a resize

The worker (bus/consumer.py) does the I/O each answer asks for: cancel and resume the consumer,
resize the prefetch, requeue what was batched. The clock is injected.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.clock import SYSTEM, Clock
from gateway.core.concurrency import AdaptiveLimit

STORE_BACKOFF_FIRST_S = 1.0  # a batch the store failed pauses the account this long, doubling per failure
STORE_BACKOFF_MAX_S = 60.0
RESIZE_SLACK_BATCHES = 3  # the prefetch shrinks only when it is this many batches above the need


@dataclass(frozen=True, slots=True)
class PauseOrder:
    """Pause the account for `seconds`, for `reason` (and the provider's `code`)."""

    seconds: float
    reason: str
    code: str | None = None


class PauseChange(StrEnum):
    STARTED = "started"  # the account was running: stop consuming, requeue what is batched
    LONGER = "longer"  # already paused: the pause now ends later
    NONE = "none"  # already paused at least as long


class AccountFlow:
    """Flow-control state of one account in one process."""

    def __init__(self, *, max_batch: int, limit: AdaptiveLimit, account_pause_s: float, clock: Clock = SYSTEM):
        self.max_batch = max_batch
        self.limit = limit
        self._account_pause_s = account_pause_s
        self._clock = clock
        self.batches = 0  # batches handed over and not finished
        self.paused_until = 0.0  # monotonic
        self.backoff_s = STORE_BACKOFF_FIRST_S

    # -- slots and prefetch ---------------------------------------------------------------------------

    def prefetch_for(self, limit: int) -> int:
        """Enough for every call in flight plus one batch forming. It follows the in-flight limit:
        a prefetch sized for the cap would let a backlogged account fill the process (and the
        connection) with work that its limit will not send soon, ahead of other accounts' requests."""
        return min(65535, self.max_batch * (limit + 1))

    @property
    def prefetch(self) -> int:
        """The prefetch for the limit as it is now (the first consume's)."""
        return self.prefetch_for(self.limit.current)

    def ready(self) -> bool:
        """A batch may be handed over: a send slot is free."""
        return self.batches < self.limit.current

    def lightly_loaded(self, unsettled: int, prefetch: int) -> bool:
        """At most half of the send slots are taken, and the broker holds nothing more for us as
        far as the consumer can tell (its prefetch window, `prefetch`, has room for another batch
        beside the `unsettled` deliveries): a batch may go out before it is full or has lingered."""
        return self.batches * 2 <= self.limit.current and unsettled + self.max_batch <= prefetch

    def prefetch_target(self, have: int) -> int:
        """The prefetch to resize to from `have` (`have`: leave it). It grows when the limit
        outgrew it and shrinks when it is `RESIZE_SLACK_BATCHES` batches above the need, always to
        one batch above the need: a limit that swings by one does not swap consumers (three round
        trips) at every swing."""
        need = self.prefetch_for(self.limit.current)
        if need > have or have >= need + RESIZE_SLACK_BATCHES * self.max_batch:
            return min(need + self.max_batch, self.prefetch_for(self.limit.cap))
        return have

    def adapt(self, *, congested: bool, waiting: bool, took_s: float | None) -> bool:
        """Feed a finished batch to the in-flight limit: halved on congestion, grown while work is
        `waiting` for a slot, trimmed when batches queue (`took_s`: the batch's duration,
        None when it does not say how fast a full send is). True when the limit changed."""
        if congested:
            return self.limit.congested()
        return self.limit.succeeded(waiting=waiting, duration_s=took_s)

    # -- pauses ---------------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self.paused_until > self._clock.monotonic()

    @property
    def paused_for_s(self) -> float:
        """Seconds until the pause ends (0 when running)."""
        return max(0.0, self.paused_until - self._clock.monotonic())

    def after_batch(self, *, store_failed: bool, pause_account: bool, code: str | None = None) -> list[PauseOrder]:
        """The pauses a finished batch asks for. A batch the store failed backs the account off,
        1 s and doubling up to a minute while failures follow each other; a batch it took resets
        that. A provider error about the account itself (credentials, blocked, quota) pauses it for
        `account_pause_s`."""
        orders: list[PauseOrder] = []
        if store_failed:
            orders.append(PauseOrder(self.backoff_s, "store_failed"))
            self.backoff_s = min(self.backoff_s * 2, STORE_BACKOFF_MAX_S)
        else:
            self.backoff_s = STORE_BACKOFF_FIRST_S
        if pause_account:
            orders.append(PauseOrder(self._account_pause_s, "account_error", code))
        return orders

    def pause(self, seconds: float) -> PauseChange:
        """Pause for `seconds` from now, unless a pause already runs at least that long."""
        until = self._clock.monotonic() + seconds
        if until <= self.paused_until:
            return PauseChange.NONE
        change = PauseChange.LONGER if self.paused else PauseChange.STARTED
        self.paused_until = until
        return change
