"""One contract, two backends: every test runs against SQLite and against the real Redis."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.state import Claim, ClaimState, Store, StoredResult
from gateway.state.redis import RedisStore
from gateway.state.sqlite import SqliteStore
from tests.support import REDIS_URL

pytestmark = pytest.mark.integration

RESULT = StoredResult(status="accepted", provider="serwersms", provider_message_id="p1", parts=1, attempts=1)


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, services: None) -> AsyncIterator[Store]:
    s: Store = SqliteStore(tmp_path / "state.sqlite3") if request.param == "sqlite" else RedisStore(REDIS_URL)
    await s.ping()
    yield s
    await s.close()


async def claim(store: Store, account: str, uids: list[str], owner: str, lease_s: float) -> dict[str, Claim]:
    """Claims alone: the bucket is never the limit here (tokens are tested on their own below)."""
    claims, _, _ = await store.claim_and_acquire(account, uids, owner, lease_s, rate=1e6, burst=10**6)
    return claims


@pytest.fixture
def account() -> str:
    return f"acc{secrets.token_hex(4)}"


async def test_first_claim_is_new_then_busy_then_done(store: Store, account: str) -> None:
    first = await claim(store, account, ["a", "b"], "w1", 30)
    assert {k: v.state for k, v in first.items()} == {"a": ClaimState.NEW, "b": ClaimState.NEW}
    again = await claim(store, account, ["a"], "w2", 30)
    assert again["a"].state is ClaimState.BUSY
    await store.complete(account, {"a": RESULT}, 60)
    done = await claim(store, account, ["a"], "w2", 30)
    assert done["a"].state is ClaimState.DONE
    assert done["a"].result == RESULT
    assert await store.peek(account, ["a", "b", "c"]) == {"a": RESULT}


async def test_concurrent_claims_give_exactly_one_new(store: Store, account: str) -> None:
    results = await asyncio.gather(*(claim(store, account, ["same"], f"w{i}", 30) for i in range(10)))
    states = sorted(str(r["same"].state) for r in results)
    assert states == ["busy"] * 9 + ["new"]


async def test_accounts_are_separate(store: Store, account: str) -> None:
    await claim(store, account, ["x"], "w1", 30)
    other = await claim(store, account + "b", ["x"], "w1", 30)
    assert other["x"].state is ClaimState.NEW


async def test_expired_lease_and_unknown_records_must_be_reconciled(store: Store, account: str) -> None:
    await claim(store, account, ["crashed"], "dead-worker", 0.2)
    await claim(store, account, ["unsure"], "w1", 30)
    await store.mark_unknown(account, ["unsure"], 60)
    await asyncio.sleep(0.3)
    claims = await claim(store, account, ["crashed", "unsure"], "w2", 30)
    assert claims["crashed"].state is ClaimState.RECONCILE
    assert claims["unsure"].state is ClaimState.RECONCILE
    # The reconciling worker holds the claim now.
    assert (await claim(store, account, ["unsure"], "w3", 30))["unsure"].state is ClaimState.BUSY


async def test_release_only_drops_our_own_claim(store: Store, account: str) -> None:
    await claim(store, account, ["r"], "w1", 30)
    await store.release(account, ["r"], "someone-else")
    assert (await claim(store, account, ["r"], "w2", 30))["r"].state is ClaimState.BUSY
    await store.release(account, ["r"], "w1")
    assert (await claim(store, account, ["r"], "w2", 30))["r"].state is ClaimState.NEW


async def test_done_records_expire_after_the_window(store: Store, account: str) -> None:
    await claim(store, account, ["old"], "w1", 30)
    await store.complete(account, {"old": RESULT}, 0.3)
    await asyncio.sleep(0.5)
    assert (await claim(store, account, ["old"], "w1", 30))["old"].state is ClaimState.NEW


async def test_token_bucket_grants_burst_then_rate(store: Store, account: str) -> None:
    granted, wait = await store.acquire(account, 30, rate=10, burst=20)
    assert granted == 20
    assert 0 < wait <= 0.11
    granted, _ = await store.acquire(account, 30, rate=10, burst=20)
    assert granted == 0
    await asyncio.sleep(0.35)
    granted, _ = await store.acquire(account, 30, rate=10, burst=20)
    assert 2 <= granted <= 5


async def test_token_bucket_is_shared_by_concurrent_callers(store: Store, account: str) -> None:
    start = time.monotonic()
    total = 0
    while time.monotonic() - start < 1.0:
        grants = await asyncio.gather(*(store.acquire(account, 3, rate=50, burst=10) for _ in range(4)))
        total += sum(g for g, _ in grants)
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - start
    # Never more than the burst plus what the rate refilled over the elapsed time.
    assert total <= 10 + 50 * elapsed + 1
    assert total >= 10 + 50 * 0.5


async def test_claim_and_acquire_takes_tokens_for_new_claims_only(store: Store, account: str) -> None:
    await store.complete(account, {"done": RESULT}, 60)
    await claim(store, account, ["busy"], "w2", 30)
    claims, granted, wait = await store.claim_and_acquire(
        account, ["done", "busy", "n1", "n2", "n3"], "w1", 30, rate=10, burst=2
    )
    assert {k: v.state for k, v in claims.items()} == {
        "done": ClaimState.DONE,
        "busy": ClaimState.BUSY,
        "n1": ClaimState.NEW,
        "n2": ClaimState.NEW,
        "n3": ClaimState.NEW,
    }
    assert claims["done"].result == RESULT
    assert (granted, round(wait, 2)) == (2, 0.1)  # three new, the burst of 2 granted, 1 more in 0.1 s
    # The same bucket as `acquire`: it is empty now.
    assert (await store.acquire(account, 1, rate=10, burst=2))[0] == 0
    # Nothing new: no tokens taken, no wait.
    assert await store.claim_and_acquire(account, ["done"], "w1", 30, rate=10, burst=2) == (
        {"done": claims["done"]},
        0,
        0.0,
    )


async def forget(store: Store, account: str) -> None:
    """What a Redis restarted without persistence (or a lost SQLite file) does to one account."""
    if isinstance(store, RedisStore):
        keys = [k async for k in store._redis.scan_iter(match=f"smsgw:{{{account}}}:*")]
        if keys:
            await store._redis.delete(*keys)
    else:
        assert isinstance(store, SqliteStore)

        def wipe(db: object) -> None:
            db.execute("DELETE FROM dedupe WHERE account=?", (account,))  # type: ignore[attr-defined]
            db.execute("DELETE FROM epoch WHERE account=?", (account,))  # type: ignore[attr-defined]

        await store._run(wipe)


async def test_a_store_that_forgot_is_reconciled_not_trusted(store: Store, account: str) -> None:
    first, _, _ = await store.claim_and_acquire(account, ["sent"], "w1", 30, 1e6, 10**6, recovery_s=600)
    assert first["sent"].state is ClaimState.NEW
    await forget(store, account)
    # The same process finds its epoch gone: every NEW answer is distrusted for the recovery window,
    # the id it had claimed and ids it never saw alike.
    after, _, _ = await store.claim_and_acquire(account, ["sent", "other"], "w1", 30, 1e6, 10**6, recovery_s=600)
    assert {k: v.state for k, v in after.items()} == {"sent": ClaimState.RECONCILE, "other": ClaimState.RECONCILE}
    # Once the window is over, NEW is NEW again.
    later, _, _ = await store.claim_and_acquire(account, ["third"], "w1", 30, 1e6, 10**6, recovery_s=0)
    assert later["third"].state is ClaimState.NEW


async def test_a_process_that_joins_after_the_loss_learns_it_from_the_epoch(
    store: Store, account: str, tmp_path: Path
) -> None:
    await store.claim_and_acquire(account, ["a"], "w1", 30, 1e6, 10**6)
    await forget(store, account)
    await store.claim_and_acquire(account, ["b"], "w1", 30, 1e6, 10**6)  # marks the new epoch lost
    other: Store = SqliteStore(tmp_path / "state.sqlite3") if isinstance(store, SqliteStore) else RedisStore(REDIS_URL)
    try:
        claims, _, _ = await other.claim_and_acquire(account, ["c"], "w2", 30, 1e6, 10**6, recovery_s=600)
    finally:
        await other.close()
    assert claims["c"].state is ClaimState.RECONCILE


async def test_a_fresh_store_distrusts_only_copies_seen_before(store: Store, account: str) -> None:
    # Nobody saw an earlier epoch (first start, or the store and every replica restarted together):
    # a producer's new id is NEW, a redelivered copy is reconciled.
    claims, granted, _ = await store.claim_and_acquire(
        account, ["fresh", "redelivered"], "w1", 30, 1e6, 10**6, suspect={"redelivered"}, recovery_s=600
    )
    assert {k: v.state for k, v in claims.items()} == {
        "fresh": ClaimState.NEW,
        "redelivered": ClaimState.RECONCILE,
    }
    assert granted == 2  # the reconciled id keeps its token for the send that may follow
