"""Which lane of which account may start a batch next, when the process itself is the bottleneck.

Every lane has its own in-flight limit (concurrency.py), sized for its provider's latency. Those
limits say nothing about the process: one event loop runs every account, and a loop that is busy
all the time (the CPU, not the provider, bounds the drain) serves work in the order it was
queued. A backlogged account then holds dozens of batches in flight, each step of a quiet
account's one request waits behind all of their steps (their publishes on the same channel, their
frames on the same connection), and more batches in flight buy no throughput: the CPU is spent
either way.

So, process-wide:

- **The loop's lag says when the process is saturated.** `adjust` is fed the loop's lag (how
  late a short sleep wakes) every `ADJUST_EVERY_S`. Over `LAG_HIGH_S` the process limits the
  batches in flight across all lanes, starting from what runs at that moment, and cuts that limit
  by half per step while the lag stays high, down to `floor`. Under `LAG_LOW_S` it gives
  some back per step (an eighth, at least one), and once the limit reaches `cap` the process is unlimited
  again. While unlimited,
  admission costs nothing but two counters.
- **The slots are shared fairly by account** (start-time fair queueing, a deficit round robin by
  message count): each account has a virtual time that grows by the size of every batch it
  starts, and the process's virtual time is where the last batch started. When a slot frees, the
  waiting account with the lowest virtual time goes, and within it its highest lane (urgent,
  normal, bulk). An account that arrives late starts at the present virtual time, so idle time
  earns no credit.
- **An account below its share does not wait for a slot**: a lane whose account is behind the
  account furthest ahead starts its batch whatever the limit, and so does an urgent lane with
  nothing in flight. A quiet account's request never waits for a backlog's batch to end, nor does
  a one-time code for its own account's campaign; the backlogs get what is left. This goes past
  the limit by little: the account furthest ahead is at most one batch past the process's virtual
  time, and every account starts at least there.

No I/O: the owner (the consumer) asks `may_start` before a batch, says `started` and `finished`,
and is called back through the `pump` it registered when its turn comes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

LAG_HIGH_S = 0.005  # the loop's mean lag above which the process counts as saturated
LAG_LOW_S = 0.002  # below it the limit grows back
ADJUST_EVERY_S = 0.25
DECREASE = 0.5
# Batches in flight across the process while saturated, at the least. One is enough: a saturated
# process drains at the pace of the CPU it shares with the broker, the store and the provider,
# and a second batch in flight only waits in them, ahead of a quiet account's request.
FLOOR = 1
CAP = 256  # a limit grown back to this is no limit


@dataclass(eq=False)
class _Account:
    name: str
    vtime: float = 0.0


@dataclass(eq=False)
class Lane:
    """One lane of one account, as admission sees it."""

    account: _Account
    rank: int  # 0 urgent, 1 normal, 2 bulk
    pump: Callable[[], None]
    running: int = 0
    waiting: bool = False
    _seq: int = field(default=0, repr=False)


class Admission:
    """Batch admission for every lane of every account in one process."""

    def __init__(self, *, enabled: bool = True, floor: int = FLOOR, cap: int = CAP) -> None:
        self.enabled = enabled
        self.floor = max(1, floor)
        self.cap = max(self.floor + 1, cap)
        self.limit: int | None = None  # None: the process is not saturated, nothing is held back
        self.running = 0
        self.held = 0  # times a lane was told to wait for its turn (a metric)
        self._accounts: dict[str, _Account] = {}
        self._waiting: list[tuple[float, int, int, Lane]] = []  # (account's vtime, rank, order, lane)
        self._order = itertools.count()
        self._vtime = 0.0  # the virtual time of the last batch started
        self._lead = 0.0  # the virtual time of the account furthest ahead (at most a batch past _vtime)
        self._turn: Lane | None = None  # the lane being called back for a slot

    def lane(self, account: str, rank: int, pump: Callable[[], None]) -> Lane:
        """Register a lane; `pump` is called when a slot it waited for is free."""
        acc = self._accounts.setdefault(account, _Account(account))
        return Lane(acc, rank, pump)

    def may_start(self, lane: Lane) -> bool:
        """Whether `lane` may start a batch now. A lane told no is queued and called back (its
        `pump`) when its turn comes."""
        if self.limit is None or lane is self._turn or (lane.rank == 0 and lane.running == 0):
            return True
        if lane.account.vtime < self._lead:
            return True  # another account has started more: this one is below its share
        if self.running < self.limit and not self._waiting:
            return True
        self._enqueue(lane)
        return False

    def started(self, lane: Lane, size: int) -> None:
        """`lane` started a batch of `size` messages (a turn is good for one batch)."""
        if lane is self._turn:
            self._turn = None
        acc = lane.account
        acc.vtime = max(acc.vtime, self._vtime) + size
        self._vtime = max(self._vtime, acc.vtime - size)
        self._lead = max(self._lead, acc.vtime)
        lane.running += 1
        self.running += 1

    def finished(self, lane: Lane) -> None:
        """A batch of `lane` ended: its slot goes to whoever's turn it is."""
        lane.running -= 1
        self.running -= 1
        self._hand_out()

    def adjust(self, lag_s: float) -> None:
        """The loop's mean lag over the last `ADJUST_EVERY_S`: saturated or not, and by how much."""
        if not self.enabled:
            return
        if lag_s > LAG_HIGH_S:
            start = self.running if self.limit is None else self.limit
            self.limit = max(self.floor, min(self.cap - 1, int(start * DECREASE)))
        elif lag_s < LAG_LOW_S and self.limit is not None:
            self.limit += max(1, self.limit // 8)
            if self.limit >= self.cap:
                self.limit = None
        self._hand_out()

    def _enqueue(self, lane: Lane) -> None:
        if lane.waiting:
            return
        lane.waiting = True
        self.held += 1
        lane._seq = next(self._order)
        tag = max(lane.account.vtime, self._vtime)
        heapq.heappush(self._waiting, (tag, lane.rank, lane._seq, lane))

    def _hand_out(self) -> None:
        """Call waiting lanes back, lowest virtual time first, while slots are free. A lane whose
        account started batches since it queued goes back in line at its account's new time."""
        while self._waiting and (self.limit is None or self.running < self.limit):
            tag, _rank, _seq, lane = heapq.heappop(self._waiting)
            if tag < lane.account.vtime:
                heapq.heappush(self._waiting, (lane.account.vtime, lane.rank, lane._seq, lane))
                continue
            lane.waiting = False
            self._turn = lane
            try:
                lane.pump()
            finally:
                self._turn = None
