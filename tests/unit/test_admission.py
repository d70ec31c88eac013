"""Process-wide admission: the limit follows the loop's lag, every account below its share starts
at once, and the slots a backlog waits for go out fairly by messages, urgent first within an
account."""

from __future__ import annotations

import itertools
from collections import Counter

from gateway.core.admission import CAP, FLOOR, LAG_HIGH_S, LAG_LOW_S, Admission, Lane

SATURATED = LAG_HIGH_S * 2
IDLE = LAG_LOW_S / 2


class Flow:
    """A lane with an endless backlog of `size`-message batches, as the consumer drives it: asks,
    starts, and finishes when the test says."""

    def __init__(self, admission: Admission, account: str, size: int, rank: int = 1) -> None:
        self.admission = admission
        self.size = size
        self.lane: Lane = admission.lane(account, rank, self.pump)
        self.started = 0
        self.pumped = 0
        self.log: list[Flow] | None = None  # where its started batches are noted, oldest first

    def pump(self) -> None:
        self.pumped += 1
        self.try_start()

    def try_start(self) -> bool:
        if not self.admission.may_start(self.lane):
            return False
        self.admission.started(self.lane, self.size)
        self.started += 1
        if self.log is not None:
            self.log.append(self)
        return True

    def finish(self) -> None:
        self.admission.finished(self.lane)


def saturate(admission: Admission, *flows: Flow, each: int = 4) -> None:
    """Every flow starts `each` batches with no limit, then the loop lags."""
    for f in flows:
        for _ in range(each):
            assert f.try_start()
    admission.adjust(SATURATED)


def at_floor(admission: Admission, *flows: Flow, each: int = 4) -> None:
    """Saturated long enough for the limit to reach the floor."""
    saturate(admission, *flows, each=each)
    while admission.limit != FLOOR:
        admission.adjust(SATURATED)


def test_a_process_that_is_not_saturated_holds_nothing_back() -> None:
    admission = Admission()
    flow = Flow(admission, "a", 100)
    assert all(flow.try_start() for _ in range(50))
    admission.adjust(IDLE)
    assert admission.limit is None
    assert flow.try_start()


def test_saturation_limits_the_process_from_what_runs_down_to_the_floor() -> None:
    admission = Admission()
    flow = Flow(admission, "a", 100)
    saturate(admission, flow, each=12)
    assert admission.limit == 6  # half of the 12 running
    for _ in range(3):
        admission.adjust(SATURATED)
    assert admission.limit == FLOOR
    assert not flow.try_start()  # 12 running, limit at the floor
    assert admission.held == 1


def test_a_limit_grows_back_while_the_loop_keeps_up_and_goes_at_the_cap() -> None:
    admission = Admission()
    flow = Flow(admission, "a", 100)
    saturate(admission, flow)
    seen: list[int] = []
    while admission.limit is not None:
        seen.append(admission.limit)
        admission.adjust(IDLE)
    assert all(a < b for a, b in itertools.pairwise(seen)), seen  # only up
    assert seen[-1] < CAP
    assert len(seen) < 60  # about a dozen seconds at four steps a second


def test_a_lag_between_the_marks_keeps_the_limit() -> None:
    admission = Admission()
    saturate(admission, Flow(admission, "a", 100))
    limit = admission.limit
    admission.adjust((LAG_LOW_S + LAG_HIGH_S) / 2)
    assert admission.limit == limit


def test_turned_off_it_never_limits() -> None:
    admission = Admission(enabled=False)
    flow = Flow(admission, "a", 100)
    saturate(admission, flow)
    assert admission.limit is None
    assert flow.try_start()


def test_a_quiet_account_starts_at_once_beside_a_saturating_backlog() -> None:
    admission = Admission()
    noisy = Flow(admission, "noisy", 100)
    at_floor(admission, noisy, each=8)
    assert not noisy.try_start()
    quiet = Flow(admission, "quiet", 1)
    assert quiet.try_start()  # nothing of its own running
    assert quiet.try_start()  # one running, but far behind the backlog's share
    assert not noisy.try_start()


def test_the_account_furthest_ahead_waits_for_a_slot_and_gets_it_when_one_frees() -> None:
    admission = Admission()
    noisy = Flow(admission, "noisy", 100)
    saturate(admission, noisy, each=2)  # limit 1 (the floor), 2 running
    assert admission.limit == FLOOR == 1
    assert not noisy.try_start()
    noisy.finish()  # 1 running: still at the limit
    assert noisy.pumped == 0
    noisy.finish()  # none running: its turn
    assert noisy.pumped == 1
    assert noisy.started == 3
    assert admission.running == 1


def test_slots_go_out_fairly_by_messages_between_two_backlogs() -> None:
    admission = Admission()
    big = Flow(admission, "big", 100)
    small = Flow(admission, "small", 50)
    saturate(admission, big, small, each=1)  # limit 1 (the floor), both running
    running: list[Flow] = [big, small]
    big.log = small.log = running
    for _ in range(300):
        # The oldest batch ends; then each backlog asks for more until told to wait, as a consumer
        # with a full queue and free lane slots does (up to 8 in flight of its own).
        done = running.pop(0)
        done.finish()
        for f in (big, small):
            while f.lane.running < 8 and f.try_start():
                pass
    sent = Counter({"big": big.started * big.size, "small": small.started * small.size})
    assert abs(sent["big"] - sent["small"]) <= 200, sent  # equal shares in messages, within two batches
    assert small.started > big.started * 1.8
    assert admission.running <= 3  # the limit (1), overstepped by the one behind by less than a batch


def test_within_an_account_the_urgent_lane_gets_the_slot_first() -> None:
    admission = Admission()
    bulk = Flow(admission, "a", 100, rank=2)
    urgent = Flow(admission, "a", 10, rank=0)
    at_floor(admission, bulk, urgent, each=2)
    assert not bulk.try_start()
    assert not urgent.try_start()
    bulk.finish()
    bulk.finish()
    urgent.finish()  # one running: still at the limit
    assert (bulk.started, urgent.started) == (2, 2)
    urgent.finish()  # bulk queued first, but the slot that frees is urgent's
    assert (bulk.started, urgent.started) == (2, 3)
    assert bulk.pumped == 0


def test_an_urgent_lane_with_nothing_in_flight_never_waits() -> None:
    admission = Admission()
    normal = Flow(admission, "a", 100)
    urgent = Flow(admission, "a", 1, rank=0)
    at_floor(admission, normal, each=6)
    assert not normal.try_start()
    assert urgent.try_start()


def test_the_metrics_count_every_hold_between_two_reports() -> None:
    from gateway.app import Gateway
    from gateway.obs import metrics as m

    admission = Admission()
    report = Gateway._adjust_admission(admission)
    flows = [Flow(admission, "a", 100, rank=rank) for rank in (1, 2, 2)]  # one account: none behind another
    at_floor(admission, *flows, each=2)
    before = m.ADMISSION_HELD._value.get()
    assert not any(f.try_start() for f in flows)
    report(SATURATED)
    assert m.ADMISSION_HELD._value.get() - before == 3
    report(SATURATED)  # nothing held since: nothing counted twice
    assert m.ADMISSION_HELD._value.get() - before == 3
    assert m.ADMISSION_LIMIT._value.get() == FLOOR


async def test_a_report_that_fails_does_not_end_the_loop_watch() -> None:
    import asyncio

    from gateway.obs.loop import watch_lag

    reports: list[float] = []

    def report(lag_s: float) -> None:
        reports.append(lag_s)
        if len(reports) == 1:
            raise RuntimeError("a report that fails")

    watch = asyncio.create_task(watch_lag(report, 0.03))
    try:
        for _ in range(200):
            if len(reports) >= 3:
                break
            await asyncio.sleep(0.01)
    finally:
        watch.cancel()
    assert len(reports) >= 3
