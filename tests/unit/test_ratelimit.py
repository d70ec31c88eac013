"""Waiting for tokens and the throttle slow-down, on the embedded store and a clock the tests move."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from gateway.config import Account
from gateway.core.ratelimit import RateLimiter
from gateway.state import Store
from gateway.state.sqlite import SqliteStore
from tests.fakes import FailingStore, FakeClock


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.sqlite3", clock)
    yield s
    await s.close()


def account(**kw: object) -> Account:
    doc: dict[str, object] = {"name": "acme", "provider": "serwersms", "base_url": "http://sandbox.invalid"}
    doc.update({"token": "t", "rate_per_s": 10, "burst": 5})
    return Account.model_validate({**doc, **kw})


async def test_pace_hands_out_the_burst_then_one_chunk_per_refill(store: SqliteStore, clock: FakeClock) -> None:
    limiter = RateLimiter(store, account(linger_ms=50), clock)
    sent: list[list[int]] = []

    async def send(chunk: list[int]) -> None:
        sent.append(chunk)

    unsent = await limiter.pace(list(range(8)), None, send)
    assert unsent == []
    # 5 at once (the burst), then 10/s: one token per 0.1 s, never faster.
    assert sent == [[0, 1, 2, 3, 4], [5], [6], [7]]
    assert clock.slept == pytest.approx([0.1, 0.1, 0.1])


async def test_a_throttle_halves_the_pace(store: SqliteStore, clock: FakeClock) -> None:
    sent: list[int] = []

    async def send(chunk: list[int]) -> None:
        sent.extend(chunk)

    limiter = RateLimiter(store, account(burst=1), clock)
    await limiter.throttled()
    assert limiter.factor == 0.5
    await limiter.pace(list(range(4)), None, send)
    assert sent == [0, 1, 2, 3]
    # The throttle emptied the bucket; at 10/s x 0.5 (climbing back 0.1 per s) four tokens take
    # about 0.75 s, where the full rate would take 0.4 s.
    assert 0.7 < sum(clock.slept) < 0.8


async def test_pace_returns_what_it_could_not_hand_out_when_the_store_fails(
    store: SqliteStore, clock: FakeClock
) -> None:
    failing = FailingStore(set(), inner=store)
    limiter = RateLimiter(cast(Store, failing), account(burst=2), clock)
    sent: list[int] = []

    async def send(chunk: list[int]) -> None:
        sent.extend(chunk)
        failing.fail.add("acquire")  # the store goes away after the first grant

    unsent = await limiter.pace(list(range(5)), None, send)
    assert sent == [0, 1]
    assert unsent == [2, 3, 4]
