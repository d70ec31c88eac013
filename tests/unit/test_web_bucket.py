"""The webhook rate bucket: at most its rate, a wait for a turn up to its queue, then refusals."""

from __future__ import annotations

import pytest

from gateway.ops.web import Bucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_past_the_rate_a_caller_waits_for_its_turn_up_to_the_queue_then_is_refused() -> None:
    clock = Clock()
    bucket = Bucket(10, queue_s=1.0, clock=clock)
    assert [bucket.take() for _ in range(10)] == [0.0] * 10  # a full second's worth at once
    waits = [bucket.take() for _ in range(10)]
    assert waits == pytest.approx([0.1 * (i + 1) for i in range(10)])  # one turn each tenth of a second
    assert bucket.take() is None  # its turn would come after more than a second
    clock.now += 0.5  # five tokens came, all promised already
    assert bucket.take() == pytest.approx(0.6)
    assert bucket.take() == pytest.approx(0.7)


def test_without_a_queue_past_the_rate_is_refused_at_once_and_time_refills() -> None:
    clock = Clock()
    bucket = Bucket(2, clock=clock)
    assert [bucket.take(), bucket.take(), bucket.take()] == [0.0, 0.0, None]
    clock.now += 0.5
    assert bucket.take() == 0.0
    assert bucket.take() is None
