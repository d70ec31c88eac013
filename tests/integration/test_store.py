"""One contract, two backends: every test runs against SQLite and against the real Redis.

Both stores run on a `FakeClock` (the Redis scripts take the time as an argument when a clock is
injected), so leases, buckets and throttles are tested without sleeping. Only the expiry of done
records is Redis's own key TTL, on the server's clock."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.state import Claim, ClaimState, Grant, StoredResult
from gateway.state.base import (
    OPTOUT_ALL,
    THROTTLE_COOLDOWN_S,
    THROTTLE_MIN_FACTOR,
    THROTTLE_RECOVERY_PER_S,
    AccountState,
    BatchRecord,
    Budget,
    BudgetAsk,
    BudgetCounter,
    CounterKind,
    Draw,
    FinalState,
    OptOut,
    Pause,
    RetryNote,
    Tracked,
    WebhookHint,
)
from gateway.state.redis import RedisStore
from gateway.state.sqlite import SqliteStore
from testkit import REDIS_URL
from tests.fakes import FakeClock

pytestmark = pytest.mark.integration

RESULT = StoredResult(status="accepted", provider="serwersms", provider_message_id="p1", parts=1, attempts=1)
REJECTED = StoredResult(status="rejected", provider="serwersms", attempts=1)
RESULT_P9 = StoredResult(status="accepted", provider="serwersms", provider_message_id="p9", parts=1, attempts=1)


URLS: dict[str, str] = {"redis": REDIS_URL}


# Both backends, with the one-part-at-a-time shortcuts of `RecordShortcuts` the tests use.
Backend = SqliteStore | RedisStore


def open_store(kind: str, tmp_path: Path, clock: FakeClock) -> Backend:
    return SqliteStore(tmp_path / "state.sqlite3", clock) if kind == "sqlite" else RedisStore(URLS[kind], clock)


@pytest.fixture(params=["sqlite", "redis", "redis-cluster", "redis-sentinel"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, services: None, clock: FakeClock
) -> AsyncIterator[Backend]:
    if request.param == "redis-cluster":
        URLS["redis-cluster"] = request.getfixturevalue("redis_cluster").url
    if request.param == "redis-sentinel":
        URLS["redis-sentinel"] = request.getfixturevalue("redis_sentinels").url
    s = open_store(request.param, tmp_path, clock)
    s.kind = request.param  # type: ignore[union-attr]  # which deployment, for the helpers below
    await s.ping()
    yield s
    await s.close()


async def claim(store: Backend, account: str, uids: list[str], owner: str, lease_s: float) -> dict[str, Claim]:
    """Claims alone: the bucket is never the limit here (tokens are tested on their own below)."""
    claims, _ = await store.claim_and_acquire(account, uids, owner, lease_s, rate=1e6, burst=10**6)
    return claims


@pytest.fixture
def account() -> str:
    return f"acc{secrets.token_hex(4)}"


async def test_first_claim_is_new_then_busy_then_done(store: Backend, account: str) -> None:
    first = await claim(store, account, ["a", "b"], "w1", 30)
    assert {k: v.state for k, v in first.items()} == {"a": ClaimState.NEW, "b": ClaimState.NEW}
    again = await claim(store, account, ["a"], "w2", 30)
    assert again["a"].state is ClaimState.BUSY
    await store.complete(account, {"a": RESULT}, 60)
    done = await claim(store, account, ["a"], "w2", 30)
    assert done["a"].state is ClaimState.DONE
    assert done["a"].result == RESULT


async def test_concurrent_claims_give_exactly_one_new(store: Backend, account: str) -> None:
    results = await asyncio.gather(*(claim(store, account, ["same"], f"w{i}", 30) for i in range(10)))
    states = sorted(str(r["same"].state) for r in results)
    assert states == ["busy"] * 9 + ["new"]


async def test_accounts_are_separate(store: Backend, account: str) -> None:
    await claim(store, account, ["x"], "w1", 30)
    other = await claim(store, account + "b", ["x"], "w1", 30)
    assert other["x"].state is ClaimState.NEW


async def test_expired_lease_and_unknown_records_must_be_reconciled(
    store: Backend, account: str, clock: FakeClock
) -> None:
    await claim(store, account, ["crashed"], "dead-worker", 0.2)
    await claim(store, account, ["unsure"], "w1", 30)
    await store.mark_unknown(account, ["unsure"], 60)
    assert (await claim(store, account, ["crashed"], "w2", 30))["crashed"].state is ClaimState.BUSY
    clock.advance(0.3)
    claims = await claim(store, account, ["crashed", "unsure"], "w2", 30)
    assert claims["crashed"].state is ClaimState.RECONCILE
    assert claims["unsure"].state is ClaimState.RECONCILE
    # The reconciling worker holds the claim now.
    assert (await claim(store, account, ["unsure"], "w3", 30))["unsure"].state is ClaimState.BUSY


async def test_release_only_drops_our_own_claim(store: Backend, account: str) -> None:
    await claim(store, account, ["r"], "w1", 30)
    await store.release(account, ["r"], "someone-else")
    assert (await claim(store, account, ["r"], "w2", 30))["r"].state is ClaimState.BUSY
    await store.release(account, ["r"], "w1")
    assert (await claim(store, account, ["r"], "w2", 30))["r"].state is ClaimState.NEW


async def test_done_records_expire_after_the_window(store: Backend, account: str, clock: FakeClock) -> None:
    await claim(store, account, ["old"], "w1", 30)
    await store.complete(account, {"old": RESULT}, 0.3)
    assert (await claim(store, account, ["old"], "w1", 30))["old"].state is ClaimState.DONE
    clock.advance(0.5)
    await asyncio.sleep(0.5)  # Redis expires keys on its own clock
    assert (await claim(store, account, ["old"], "w1", 30))["old"].state is ClaimState.NEW


async def test_token_bucket_grants_burst_then_rate(store: Backend, account: str, clock: FakeClock) -> None:
    first = await store.acquire(account, 30, rate=10, burst=20)
    assert (first.granted, round(first.wait_s, 3), first.factor) == (20, 0.1, 1.0)
    assert (await store.acquire(account, 30, rate=10, burst=20)).granted == 0
    clock.advance(0.35)
    assert (await store.acquire(account, 30, rate=10, burst=20)).granted == 3
    clock.advance(100)
    assert (await store.acquire(account, 30, rate=10, burst=20)).granted == 20  # never more than the burst


async def test_token_bucket_is_shared_by_concurrent_callers(store: Backend, account: str, clock: FakeClock) -> None:
    total = 0
    for _ in range(50):  # one simulated second, 20 ms apart, four callers each time
        grants = await asyncio.gather(*(store.acquire(account, 3, rate=50, burst=10) for _ in range(4)))
        total += sum(g.granted for g in grants)
        clock.advance(0.02)
    # The burst, then what the rate refilled over 0.98 s (one token may still be a fraction short).
    assert 10 + 49 - 1 <= total <= 10 + 49


async def test_a_throttle_halves_the_rate_for_every_replica_and_recovers(
    store: Backend, account: str, clock: FakeClock, tmp_path: Path
) -> None:
    replica = open_store(store.kind, tmp_path, clock)  # type: ignore[union-attr]  # a second process, same store
    try:
        await store.acquire(account, 100, rate=100, burst=10)
        assert await store.throttle(account) == 0.5
        # Another replica reporting the same throttle within the cooldown does not cut again.
        assert await replica.throttle(account) == 0.5
        grant = await replica.acquire(account, 100, rate=100, burst=10)
        assert (grant.granted, grant.factor) == (0, 0.5)  # the throttle emptied the bucket
        clock.advance(0.1)
        grant = await replica.acquire(account, 100, rate=100, burst=10)
        assert grant.granted == 5  # 100/s x 0.5 for 0.1 s (the burst is 5 now)
        clock.advance(THROTTLE_COOLDOWN_S)
        recovered = 0.5 + (0.1 + THROTTLE_COOLDOWN_S) * THROTTLE_RECOVERY_PER_S  # since the cut
        assert await replica.throttle(account) == pytest.approx(recovered / 2)
        for _ in range(8):
            await store.throttle(account)
            clock.advance(THROTTLE_COOLDOWN_S)
        factor = (await store.acquire(account, 1, rate=100, burst=10)).factor
        assert factor >= THROTTLE_MIN_FACTOR
        assert factor < 0.5
        clock.advance(1 / THROTTLE_RECOVERY_PER_S)
        assert (await replica.acquire(account, 1, rate=100, burst=10)).factor == 1.0  # recovered
    finally:
        await replica.close()


URGENT, NORMAL, BULK = 0, 1, 2  # lane ranks


async def test_a_waiting_urgent_lane_leaves_a_lower_lane_only_its_share_on_every_replica(
    store: Backend, account: str, clock: FakeClock, tmp_path: Path
) -> None:
    replica = open_store(store.kind, tmp_path, clock)  # type: ignore[union-attr]  # the bulk lane's replica
    try:
        assert (await replica.acquire(account, 100, rate=100, burst=10, rank=BULK, min_share=0.1)).granted == 10
        urgent = await store.acquire(account, 5, rate=100, burst=10, rank=URGENT)
        assert urgent.granted == 0  # the bulk lane emptied the bucket: the urgent lane marks its demand
        clock.advance(0.1)  # 10 tokens refilled
        # The bulk lane on the other replica gets its share (burst 10 x 0.1 = 1 token), not the refill.
        bulk = await replica.acquire(account, 100, rate=100, burst=10, rank=BULK, min_share=0.1)
        assert bulk.granted == 1
        assert bulk.wait_s == pytest.approx(0.1)  # its share refills at 100/s x 0.1
        assert (await store.acquire(account, 5, rate=100, burst=10, rank=URGENT)).granted == 5
        # Served, the urgent lane's mark is gone: the bulk lane takes what is left.
        assert (await replica.acquire(account, 100, rate=100, burst=10, rank=BULK, min_share=0.1)).granted == 4
    finally:
        await replica.close()


async def test_an_urgent_flood_leaves_the_lower_lanes_their_minimum_share(
    store: Backend, account: str, clock: FakeClock
) -> None:
    sent = {URGENT: 0, BULK: 0}
    for _ in range(200):  # two simulated seconds, both lanes always wanting more
        for rank in (URGENT, BULK):
            sent[rank] += (await store.acquire(account, 50, rate=100, burst=10, rank=rank, min_share=0.1)).granted
        clock.advance(0.01)
    assert sent[URGENT] + sent[BULK] <= 10 + 200  # never above the rate, whatever the lanes
    assert 20 - 2 <= sent[BULK] <= 20 + 2  # 10 % of 100/s over two seconds
    assert sent[URGENT] >= 170


async def test_strict_priority_with_no_minimum_share_and_a_mark_that_runs_out(
    store: Backend, account: str, clock: FakeClock
) -> None:
    await store.acquire(account, 10, rate=100, burst=10, rank=BULK)
    assert (await store.acquire(account, 1, rate=100, burst=10, rank=NORMAL)).granted == 0  # marks demand
    clock.advance(0.05)
    assert (await store.acquire(account, 50, rate=100, burst=10, rank=BULK, min_share=0.0)).granted == 0
    # The urgent lane is not below the normal one: it takes freely.
    assert (await store.acquire(account, 2, rate=100, burst=10, rank=URGENT)).granted == 2
    # The normal lane's process went away without looking again: its mark runs out after its
    # expected next look (0.01 s) plus the margin, and the bulk lane takes the whole bucket again.
    clock.advance(0.3)
    assert (await store.acquire(account, 50, rate=100, burst=10, rank=BULK, min_share=0.0)).granted == 10


async def test_claim_and_acquire_takes_tokens_for_new_claims_only(store: Backend, account: str) -> None:
    await store.complete(account, {"done": RESULT}, 60)
    await claim(store, account, ["busy"], "w2", 30)
    uids = ["done", "busy", "n1", "n2", "n3"]
    claims, grant = await store.claim_and_acquire(account, uids, "w1", 30, rate=10, burst=2)
    assert {k: v.state for k, v in claims.items()} == {
        "done": ClaimState.DONE,
        "busy": ClaimState.BUSY,
        "n1": ClaimState.NEW,
        "n2": ClaimState.NEW,
        "n3": ClaimState.NEW,
    }
    assert claims["done"].result == RESULT
    assert (grant.granted, round(grant.wait_s, 2)) == (2, 0.1)  # three new, the burst of 2, 1 more in 0.1 s
    # The same bucket as `acquire`: it is empty now.
    assert (await store.acquire(account, 1, rate=10, burst=2)).granted == 0
    # Nothing new: no tokens taken, no wait.
    assert await store.claim_and_acquire(account, ["done"], "w1", 30, rate=10, burst=2) == (
        {"done": claims["done"]},
        Grant(0, 0.0),
    )


async def forget(store: Backend, account: str) -> None:
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


async def test_a_store_that_forgot_is_reconciled_not_trusted(store: Backend, account: str) -> None:
    first, _ = await store.claim_and_acquire(account, ["sent"], "w1", 30, 1e6, 10**6, recovery_s=600)
    assert first["sent"].state is ClaimState.NEW
    await forget(store, account)
    # The same process finds its epoch gone: every NEW answer is distrusted for the recovery window,
    # the id it had claimed and ids it never saw alike.
    after, _ = await store.claim_and_acquire(account, ["sent", "other"], "w1", 30, 1e6, 10**6, recovery_s=600)
    assert {k: v.state for k, v in after.items()} == {"sent": ClaimState.RECONCILE, "other": ClaimState.RECONCILE}
    # Once the window is over, NEW is NEW again.
    later, _ = await store.claim_and_acquire(account, ["third"], "w1", 30, 1e6, 10**6, recovery_s=0)
    assert later["third"].state is ClaimState.NEW


async def test_a_process_that_joins_after_the_loss_learns_it_from_the_epoch(
    store: Backend, account: str, tmp_path: Path
) -> None:
    await store.claim_and_acquire(account, ["a"], "w1", 30, 1e6, 10**6)
    await forget(store, account)
    await store.claim_and_acquire(account, ["b"], "w1", 30, 1e6, 10**6)  # marks the new epoch lost
    other = open_store(store.kind, tmp_path, FakeClock())  # type: ignore[union-attr]
    try:
        claims, _ = await other.claim_and_acquire(account, ["c"], "w2", 30, 1e6, 10**6, recovery_s=600)
    finally:
        await other.close()
    assert claims["c"].state is ClaimState.RECONCILE


async def test_a_fresh_store_distrusts_only_copies_seen_before(store: Backend, account: str) -> None:
    # Nobody saw an earlier epoch (first start, or the store and every replica restarted together):
    # a producer's new id is NEW, a redelivered copy is reconciled.
    claims, grant = await store.claim_and_acquire(
        account, ["fresh", "redelivered"], "w1", 30, 1e6, 10**6, suspect={"redelivered"}, recovery_s=600
    )
    assert {k: v.state for k, v in claims.items()} == {
        "fresh": ClaimState.NEW,
        "redelivered": ClaimState.RECONCILE,
    }
    assert grant.granted == 2  # the reconciled id keeps its token for the send that may follow


# -- delivery reports ---------------------------------------------------------------------------------


def tracked(mid: str, at: float) -> Tracked:
    return Tracked(mid, f"u-{mid}", "+48500600700", {"k": "v"}, "serwersms", at)


async def test_one_caller_publishes_a_final_event(store: Backend, account: str, clock: FakeClock) -> None:
    now = clock.time()
    await store.track(account, [tracked("m1", now)], first_poll_s=60, ttl_s=600)
    assert await store.begin_final(account, "nope", "w1", 30) == (FinalState.UNKNOWN, None)
    state, record = await store.begin_final(account, "m1", "w1", 30)
    assert (state, record) == (FinalState.CLAIMED, tracked("m1", now))
    assert (await store.begin_final(account, "m1", "w2", 30))[0] is FinalState.BUSY
    await store.abandon_final(account, "m1", "w1")  # the publish failed: someone else may try
    assert (await store.begin_final(account, "m1", "w2", 30))[0] is FinalState.CLAIMED
    await store.end_final(account, "m1", "w2")
    assert (await store.begin_final(account, "m1", "w1", 30))[0] is FinalState.DONE
    # Tracking the same id again (a reconciled copy) does not reopen it.
    await store.track(account, [tracked("m1", now)], first_poll_s=0, ttl_s=600)
    assert (await store.begin_final(account, "m1", "w1", 30))[0] is FinalState.DONE


async def test_a_held_final_event_waits_for_its_announcement_or_its_time(
    store: Backend, account: str, clock: FakeClock
) -> None:
    now = clock.time()
    batch = BatchRecord(tracked=[tracked("m1", now), tracked("m2", now)], first_poll_s=60, track_ttl_s=600, hold_s=30)
    await store.record(account, batch)
    assert await store.begin_final(account, "m1", "w1", 30) == (FinalState.HELD, None)
    await store.announce(account, ["m1"])
    assert await store.begin_final(account, "m1", "w1", 30) == (FinalState.CLAIMED, tracked("m1", now))
    await store.announce(account, ["m1"])  # an announcement never takes a caller's claim
    assert (await store.begin_final(account, "m1", "w2", 30))[0] is FinalState.BUSY
    # Never announced (the store was away then): held until the hold's time is over.
    clock.advance(29)
    assert (await store.begin_final(account, "m2", "w1", 30))[0] is FinalState.HELD
    clock.advance(2)
    assert (await store.begin_final(account, "m2", "w1", 30))[0] is FinalState.CLAIMED


async def test_a_claim_whose_lease_ran_out_can_be_taken(store: Backend, account: str, clock: FakeClock) -> None:
    await store.track(account, [tracked("m1", clock.time())], first_poll_s=60, ttl_s=600)
    assert (await store.begin_final(account, "m1", "crashed", 5))[0] is FinalState.CLAIMED
    clock.advance(6)
    assert (await store.begin_final(account, "m1", "w2", 5))[0] is FinalState.CLAIMED


async def test_due_polls_are_leased_to_one_caller(store: Backend, account: str, clock: FakeClock) -> None:
    now = clock.time()
    await store.track(account, [tracked(f"m{i}", now + i) for i in range(5)], first_poll_s=10, ttl_s=600)
    assert await store.due_polls(account, 10, lease_s=30) == []
    assert await store.oldest_open(account) == now
    clock.advance(12)  # m0, m1, m2 are due
    first = await store.due_polls(account, 2, lease_s=30)
    second = await store.due_polls(account, 10, lease_s=30)
    assert [t.provider_message_id for t in first] == ["m0", "m1"]
    assert [t.provider_message_id for t in second] == ["m2"]  # the others are leased
    await store.poll_later(account, {"m0": clock.time() + 5})
    await store.begin_final(account, "m1", "w1", 30)
    await store.end_final(account, "m1", "w1")
    clock.advance(31)
    again = await store.due_polls(account, 10, lease_s=30)
    assert {t.provider_message_id: t.polls for t in again} == {"m0": 1, "m2": 0, "m3": 0, "m4": 0}
    assert await store.oldest_open(account) == now  # m0 is still open; m1 is final


async def test_due_accounts_names_the_accounts_with_a_poll_due_and_leases_nothing(
    store: Backend, account: str, clock: FakeClock
) -> None:
    now = clock.time()
    others = [f"{account}o{i}" for i in range(30)]  # idle: nothing tracked
    busy, later = account, account + "later"
    await store.track(busy, [tracked("m1", now)], first_poll_s=10, ttl_s=600)
    await store.track(later, [tracked("m2", now)], first_poll_s=100, ttl_s=600)
    names = [busy, later, *others]
    assert await store.due_accounts(names) == set()
    clock.advance(12)
    assert await store.due_accounts(names) == {busy}
    assert await store.due_accounts(names) == {busy}  # a look leases nothing
    assert [t.provider_message_id for t in await store.due_polls(busy, 10, lease_s=30)] == ["m1"]
    assert await store.due_accounts(names) == set()  # leased to a poller
    await store.begin_final(busy, "m1", "w1", 30)
    await store.end_final(busy, "m1", "w1")
    clock.advance(100)
    assert await store.due_accounts(names) == {later}  # m1 is final; m2's first poll is due
    assert await store.due_accounts([]) == set()


def hint_of(report: str, park_ttl_s: float = 10, park_max: int = 100) -> WebhookHint:
    return WebhookHint(report, bind_ttl_s=60, park_ttl_s=park_ttl_s, park_max=park_max)


async def test_a_webhook_hint_binds_its_event_and_makes_the_poll_due_or_parks(
    store: Backend, account: str, clock: FakeClock
) -> None:
    now = clock.time()
    await store.track(account, [tracked("m1", now), tracked("m2", now)], first_poll_s=60, ttl_s=600)
    assert await store.hint(account, "26", "m1", hint_of("r")) == (None, "poll_due")
    assert await store.hint(account, "26", "m1", hint_of("r")) == ("m1", "poll_due")  # a retry
    assert await store.hint(account, "26", "m2", hint_of("r")) == ("m1", "refused")  # a rewrite: nothing done
    assert await store.hint(account + "x", "26", "m2", hint_of("r")) == (None, "parked")  # another account
    assert [t.provider_message_id for t in await store.due_polls(account, 10, lease_s=30)] == ["m1"]
    # A final message's hint makes nothing due.
    await store.begin_final(account, "m2", "w1", 30)
    await store.end_final(account, "m2", "w1")
    assert await store.hint(account, "27", "m2", hint_of("r")) == (None, "poll_due")
    assert await store.due_polls(account, 10, lease_s=30) == []


async def test_parked_hints_are_bounded_expire_and_are_matched_once_tracked(
    store: Backend, account: str, clock: FakeClock
) -> None:
    assert await store.hint(account, "1", "early", hint_of("r1")) == (None, "parked")
    assert await store.hint(account, "2", "stale", hint_of("r2", park_ttl_s=1)) == (None, "parked")
    assert await store.hint(account, "3", "late", hint_of("r3", park_max=2)) == (None, "full")
    assert await store.match_parked(account, 10) == 0  # nothing tracked yet
    clock.advance(2)  # `stale` has expired
    now = clock.time()
    await store.track(account, [tracked(m, now) for m in ("early", "stale")], first_poll_s=60, ttl_s=600)
    assert await store.match_parked(account, 10) == 1
    assert [t.provider_message_id for t in await store.due_polls(account, 10, lease_s=30)] == ["early"]
    assert await store.match_parked(account, 10) == 0  # matched hints are gone


async def test_a_batch_record_stores_results_and_their_tracking_together(
    store: Backend, account: str, clock: FakeClock
) -> None:
    """One atomic step: results (which end the claims), unknown marks, releases (only our own
    claims) and tracking; writing the same record again changes nothing."""
    uids = ["done", "unsure", "mine", "theirs"]
    await claim(store, account, uids[:3], "w1", 30)
    await claim(store, account, ["theirs"], "w2", 30)
    batch = BatchRecord(
        done={"done": RESULT},
        unknown=["unsure"],
        release=["mine", "theirs"],
        owner="w1",
        ttl_s=60,
        tracked=[tracked("p1", clock.time())],
        first_poll_s=0,
        track_ttl_s=600,
    )
    await store.record(account, batch)
    await store.record(account, batch)  # tried again after a lost answer: the same state
    claims = await claim(store, account, uids, "w3", 30)
    assert {u: c.state for u, c in claims.items()} == {
        "done": ClaimState.DONE,
        "unsure": ClaimState.RECONCILE,
        "mine": ClaimState.NEW,
        "theirs": ClaimState.BUSY,  # w2's claim: not w1's to release
    }
    assert claims["theirs"].owner == "w2"
    assert claims["theirs"].lease_left_s == pytest.approx(30, abs=1)
    assert [t.provider_message_id for t in await store.due_polls(account, 10, lease_s=30)] == ["p1"]


async def test_a_replay_claims_a_rejected_failed_or_expired_result_again_once(store: Backend, account: str) -> None:
    """`x-gateway-replay`: a re-driven dead letter is sent again when its result was rejected,
    failed or expired, but never when it was accepted; of two replayed copies only one gets it."""
    results = {s: StoredResult(status=s, provider="serwersms", attempts=1) for s in ("rejected", "failed", "expired")}
    await store.complete(account, {**results, "ok": RESULT}, 60)
    uids = [*results, "ok"]
    plain = await claim(store, account, uids, "w1", 30)
    assert {u: c.state for u, c in plain.items()} == dict.fromkeys(uids, ClaimState.DONE)  # no replay: duplicate

    first, _ = await store.claim_and_acquire(account, uids, "w1", 30, 1e6, 10**6, replay=set(uids))
    assert {u: c.state for u, c in first.items()} == {
        "rejected": ClaimState.RECONCILE,
        "failed": ClaimState.RECONCILE,
        "expired": ClaimState.RECONCILE,
        "ok": ClaimState.DONE,
    }
    second, _ = await store.claim_and_acquire(account, uids, "w2", 30, 1e6, 10**6, replay=set(uids))
    assert {u: c.state for u, c in second.items()} == {**dict.fromkeys(results, ClaimState.BUSY), "ok": ClaimState.DONE}
    await store.complete(account, dict.fromkeys(results, RESULT), 60)  # the replays were accepted
    third, _ = await store.claim_and_acquire(account, uids, "w2", 30, 1e6, 10**6, replay=set(uids))
    assert {u: c.state for u, c in third.items()} == dict.fromkeys(uids, ClaimState.DONE)


async def test_pauses_and_throttling_are_visible_to_operators(store: Backend, account: str, clock: FakeClock) -> None:
    assert await store.account_state(account) == AccountState((), 1.0)
    now = clock.time()
    await store.note_pause(account, Pause("gw-1", "account_error", "3000", now + 300))
    await store.note_pause(account, Pause("gw-2", "store_failed", None, now + 5))
    await store.throttle(account)
    state = await store.account_state(account)
    assert [(p.owner, p.reason, p.code) for p in state.pauses] == [
        ("gw-1", "account_error", "3000"),
        ("gw-2", "store_failed", None),
    ]
    assert state.throttle_factor == 0.5
    clock.advance(10)
    assert [p.owner for p in (await store.account_state(account)).pauses] == ["gw-1"]  # gw-2's pause ended


async def test_a_lost_epoch_is_reported_once_and_marked_final_messages_stay_final(
    store: Backend, account: str, clock: FakeClock
) -> None:
    assert not await store.epoch_changed(account)  # the first look creates the epoch
    assert not await store.epoch_changed(account)
    await forget(store, account)
    assert await store.epoch_changed(account)  # this process had seen the old one
    assert not await store.epoch_changed(account)  # once
    # A rebuild: one message already had its event, one did not, one was never tracked again.
    now = clock.time()
    await store.mark_final(account, ["ended", "orphan"], ttl_s=600)
    await store.track(account, [tracked("ended", now), tracked("open", now)], first_poll_s=0, ttl_s=600)
    assert (await store.begin_final(account, "ended", "w1", 30))[0] is FinalState.DONE
    assert (await store.begin_final(account, "orphan", "w1", 30))[0] is FinalState.DONE
    assert [t.provider_message_id for t in await store.due_polls(account, 10, lease_s=30)] == ["open"]


async def test_the_trail_of_a_request_follows_it_from_claim_to_retry_to_result_to_delivery(
    store: Backend, account: str, clock: FakeClock
) -> None:
    empty = await store.trail(account, "u1")
    assert (empty.claim, empty.retry, empty.delivery) == (None, None, None)
    await claim(store, account, ["u1"], "w1", 30)
    busy = (await store.trail(account, "u1")).claim
    assert busy is not None
    assert (busy.state, busy.owner) == (ClaimState.BUSY, "w1")
    # A failed attempt: the claim is released and the retry noted.
    note = RetryNote(1, "500", "provider error", clock.time(), clock.time() + 5)
    await store.record(account, BatchRecord(release=["u1"], owner="w1", ttl_s=600, retries={"u1": note}))
    waiting = await store.trail(account, "u1")
    assert waiting.claim is None
    assert waiting.retry == note
    # The next attempt is accepted and tracked; its number is indexed.
    await claim(store, account, ["u1"], "w2", 30)
    tracked = Tracked("p1", "u1", "+48500600700", None, "serwersms", clock.time())
    batch = BatchRecord(
        done={"u1": RESULT},
        ttl_s=600,
        tracked=[tracked],
        first_poll_s=60,
        track_ttl_s=600,
        numbers={"u1": "+48500600700"},
    )
    await store.record(account, batch)
    done = await store.trail(account, "u1")
    assert done.claim is not None
    assert done.claim.result == RESULT
    assert done.delivery is not None
    assert (done.delivery.state, done.delivery.polls, done.delivery.final_status) == ("open", 0, None)
    assert done.delivery.next_poll_at == pytest.approx(clock.time() + 60)
    assert await store.by_number(account, "+48500600700") == ["u1"]
    assert await store.by_number(account, "+48500600701") == []
    # Its delivery report: the final event published, its status kept.
    state, _ = await store.begin_final(account, "p1", "desk", 60)
    assert state is FinalState.CLAIMED
    await store.end_final(account, "p1", "desk", "delivered", "2026-12-06T10:00:00Z")
    final = (await store.trail(account, "u1")).delivery
    assert final is not None
    assert (final.state, final.final_status, final.final_at) == ("final", "delivered", "2026-12-06T10:00:00Z")


async def test_a_held_delivery_and_an_unknown_mark_read_as_such(store: Backend, account: str, clock: FakeClock) -> None:
    await claim(store, account, ["h", "x"], "w1", 30)
    tracked = Tracked("p9", "h", None, None, "serwersms", clock.time())
    await store.record(
        account,
        BatchRecord(done={"h": RESULT_P9}, unknown=["x"], ttl_s=600, tracked=[tracked], track_ttl_s=600, hold_s=300),
    )
    held = (await store.trail(account, "h")).delivery
    assert held is not None
    assert held.state == "held"
    unknown = (await store.trail(account, "x")).claim
    assert unknown is not None
    assert unknown.state is ClaimState.RECONCILE


async def test_numbers_list_newest_first(store: Backend, account: str, clock: FakeClock) -> None:
    for i in range(3):
        await claim(store, account, [f"n{i}"], "w1", 30)
        await store.record(account, BatchRecord(done={f"n{i}": RESULT}, ttl_s=600, numbers={f"n{i}": "+48500600700"}))
        clock.advance(1)
    assert await store.by_number(account, "+48500600700") == ["n2", "n1", "n0"]
    assert await store.by_number(account, "+48500600700", limit=2) == ["n2", "n1"]


# -- the opt-out registry -------------------------------------------------------------------------


def _numbers(n: int) -> list[str]:
    """Numbers no other test uses (the `all` scope is shared by every test on one Redis)."""
    base = secrets.randbelow(10**8)
    return [f"+4860{(base + i) % 10**8:08d}" for i in range(n)]


async def test_opt_outs_of_an_account_and_of_all_accounts_are_found_in_one_call(store: Backend, account: str) -> None:
    mine, everyone, neither = _numbers(3)
    assert await store.optout_add(account, [OptOut(mine, 1.0, "cli", "STOP", "ops")]) == 1
    assert await store.optout_add(OPTOUT_ALL, [OptOut(everyone, 2.0, "bus", "crm", "billing")]) == 1
    assert await store.opted_out(account, [mine, everyone, neither]) == {mine, everyone}
    assert await store.opted_out(account + "x", [mine, everyone, neither]) == {everyone}  # another account
    assert await store.opted_out(account, []) == set()
    await store.optout_remove(OPTOUT_ALL, [everyone])
    await store.optout_remove(account, [mine])


async def test_adding_again_refreshes_an_entry_and_removing_counts_what_was_there(store: Backend, account: str) -> None:
    a, b = _numbers(2)
    assert await store.optout_add(account, [OptOut(a, 1.0, "cli"), OptOut(b, 1.0, "cli")]) == 2
    assert await store.optout_add(account, [OptOut(a, 5.0, "bus", "sms-reply", "crm")]) == 0
    page, cursor = await store.optout_page(account)
    assert cursor is None
    assert {e.number: e for e in page}[a] == OptOut(a, 5.0, "bus", "sms-reply", "crm")
    assert await store.optout_count(account) == 2
    assert await store.optout_remove(account, [a, a, _numbers(1)[0]]) == 1
    assert await store.opted_out(account, [a, b]) == {b}
    assert await store.optout_count(account) == 1
    await store.optout_remove(account, [b])  # the registry never expires: nothing stays behind in Redis


async def test_a_large_registry_pages_through_every_entry_once(store: Backend, account: str) -> None:
    numbers = _numbers(2500)
    assert await store.optout_add(account, [OptOut(n, 1.0, "import", "file.csv") for n in numbers]) == 2500
    seen: list[str] = []
    cursor: str | None = ""
    while cursor is not None:
        page, cursor = await store.optout_page(account, cursor, 1000)
        seen += [e.number for e in page]
    assert sorted(set(seen)) == sorted(numbers)  # Redis's scan may repeat an entry; none is missing
    assert await store.opted_out(account, numbers[:300] + _numbers(5)) == set(numbers[:300])
    assert await store.optout_remove(account, numbers) == 2500


# -- budgets ----------------------------------------------------------------------------------------


FAR_FUTURE = 1_800_000_000 + 86400  # a day past the fake clock (January 2027): later than the server's clock too


def _budget(
    uids: list[str], limit: int, parts: int = 1, *, enforce: bool = True, app_limit: int | None = None
) -> Budget:
    counters = [BudgetCounter(f"account:day:{secrets.token_hex(3)}", "account", "day", limit, FAR_FUTURE)]
    if app_limit is not None:
        counters.append(BudgetCounter(f"app:crm:day:{secrets.token_hex(3)}", "app:crm", "day", app_limit, FAR_FUTURE))
    draws = tuple(Draw(c, parts, enforce) for c in range(len(counters)))
    return Budget(tuple(counters), {u: BudgetAsk(draws) for u in uids})


async def claim_with(
    store: Backend, account: str, uids: list[str], budget: Budget, owner: str = "w1"
) -> dict[str, Claim]:
    claims, _ = await store.claim_and_acquire(account, uids, owner, 30, rate=1e6, burst=10**6, budget=budget)
    return claims


async def test_a_budget_claims_what_fits_in_order_and_a_refund_makes_room(store: Backend, account: str) -> None:
    budget = _budget(["a", "b", "c", "d"], limit=5, parts=2)
    claims = await claim_with(store, account, ["a", "b", "c", "d"], budget)
    assert [claims[u].state for u in "abcd"] == [ClaimState.NEW, ClaimState.NEW, ClaimState.QUOTA, ClaimState.QUOTA]
    assert claims["c"].budget == budget.counters[0]
    assert await store.budget_use(account, budget.counters) == [4]
    # The provider refused a: its parts come back; b was accepted: its parts stay spent.
    await store.record(account, BatchRecord(done={"a": REJECTED, "b": RESULT}, ttl_s=60, refund=["a"], spend=["b"]))
    assert await store.budget_use(account, budget.counters) == [2]
    again = await claim_with(store, account, ["c", "d"], budget)
    assert [again[u].state for u in "cd"] == [ClaimState.NEW, ClaimState.QUOTA]
    # A refund of a hold already spent (or never made) changes nothing.
    await store.record(account, BatchRecord(refund=["b", "zz"]))
    assert await store.budget_use(account, budget.counters) == [4]


async def test_an_unenforced_lane_is_counted_past_the_limit(store: Backend, account: str) -> None:
    budget = _budget(["u1", "u2", "u3"], limit=2, enforce=False)
    claims = await claim_with(store, account, ["u1", "u2", "u3"], budget)
    assert {c.state for c in claims.values()} == {ClaimState.NEW}
    assert await store.budget_use(account, budget.counters) == [3]


async def test_an_application_budget_and_the_account_budget_both_hold(store: Backend, account: str) -> None:
    budget = _budget(["x1", "x2", "x3"], limit=10, app_limit=2)
    claims = await claim_with(store, account, ["x1", "x2", "x3"], budget)
    assert [claims[u].state for u in ("x1", "x2", "x3")] == [ClaimState.NEW, ClaimState.NEW, ClaimState.QUOTA]
    assert claims["x3"].budget == budget.counters[1]
    assert await store.budget_use(account, budget.counters) == [2, 2]  # nothing drawn for the refused one


async def test_a_claim_taken_again_keeps_its_hold_and_one_without_a_hold_is_counted(
    store: Backend, account: str, clock: FakeClock
) -> None:
    budget = _budget(["held", "bare"], limit=1)
    await claim_with(store, account, ["held"], budget, owner="dead")
    await claim(store, account, ["bare"], "dead", 30)  # claimed before the account had a budget
    clock.advance(31)  # both leases ran out: the next copies reconcile
    claims = await claim_with(store, account, ["held", "bare"], budget)
    assert {c.state for c in claims.values()} == {ClaimState.RECONCILE}  # never refused: they may be out
    assert await store.budget_use(account, budget.counters) == [2]  # held counted once, bare once, past 1


async def test_concurrent_claims_never_go_over_a_budget(store: Backend, account: str) -> None:
    uids = [[f"r{r}-{i}" for i in range(10)] for r in range(10)]
    budget = _budget([u for batch in uids for u in batch], limit=25)
    results = await asyncio.gather(
        *(claim_with(store, account, batch, budget, f"w{r}") for r, batch in enumerate(uids))
    )
    states = [c.state for claims in results for c in claims.values()]
    assert states.count(ClaimState.NEW) == 25
    assert states.count(ClaimState.QUOTA) == 75
    assert await store.budget_use(account, budget.counters) == [25]


async def test_draws_of_different_amounts_and_kinds_are_held_and_refunded_each_their_own(
    store: Backend, account: str
) -> None:
    # Parts from a budget, one message from a country's hourly cap: the cap refuses the third.
    parts = BudgetCounter(f"account:day:{secrets.token_hex(3)}", "account", "day", 100, FAR_FUTURE)
    cap = BudgetCounter(
        f"country:NG:hour:{secrets.token_hex(3)}", "country:NG", "hour", 2, FAR_FUTURE, CounterKind.VELOCITY
    )
    ask = BudgetAsk((Draw(0, 3), Draw(1, 1)))
    budget = Budget((parts, cap), {"m1": ask, "m2": ask, "m3": ask})
    claims = await claim_with(store, account, ["m1", "m2", "m3"], budget)
    assert [claims[u].state for u in ("m1", "m2", "m3")] == [ClaimState.NEW, ClaimState.NEW, ClaimState.QUOTA]
    assert claims["m3"].budget == cap
    assert await store.budget_use(account, [parts, cap]) == [6, 2]
    await store.record(account, BatchRecord(refund=["m1"]))
    assert await store.budget_use(account, [parts, cap]) == [3, 1]
