"""What `gateway trace`'s bookkeeping costs the send path: a batch's `Store.record` with and
without the recipients' number index, on SQLite and on the Redis at 127.0.0.1, interleaved.

    python -m bench.store_record [batches]

Each round records `batches` batches of 100 accepted, tracked messages (what a drain writes)
twice: once as the store wrote them before (`numbers` empty), once with every number indexed.
It prints microseconds per message, the median and range over 5 rounds of each."""

from __future__ import annotations

import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gateway.state.base import BatchRecord, StoredResult, Tracked
from gateway.state.redis import RedisStore
from gateway.state.sqlite import SqliteStore
from testkit import REDIS_URL

BATCH = 100
ROUNDS = 5


def batch(prefix: str, numbers: bool) -> BatchRecord:
    now = time.time()
    uids = [f"{prefix}-{i}" for i in range(BATCH)]
    done = {u: StoredResult("accepted", "serwersms", f"p-{u}", 1, None, 1, "2026-12-06T10:00:00Z") for u in uids}
    tracked = [Tracked(f"p-{u}", u, f"+48500{i:06d}", None, "serwersms", now) for i, u in enumerate(uids)]
    return BatchRecord(
        done=done,
        ttl_s=3600,
        tracked=tracked,
        first_poll_s=300,
        track_ttl_s=7200,
        numbers={u: f"+48500{i:06d}" for i, u in enumerate(uids)} if numbers else {},
    )


async def timed(store: SqliteStore | RedisStore, account: str, batches: int, numbers: bool) -> float:
    work = [batch(f"{secrets.token_hex(4)}-{b}", numbers) for b in range(batches)]
    start = time.perf_counter()
    for b in work:
        await store.record(account, b)
    return (time.perf_counter() - start) / (batches * BATCH) * 1e6


async def main(batches: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"sqlite": SqliteStore(Path(tmp) / "s.sqlite3"), "redis": RedisStore(REDIS_URL)}
        for name, store in stores.items():
            await store.ping()
            account = f"bench{secrets.token_hex(3)}"
            figures: dict[bool, list[float]] = {False: [], True: []}
            await timed(store, account, 5, True)  # warm: schema, scripts loaded
            for _ in range(ROUNDS):
                for numbers in (False, True):
                    figures[numbers].append(await timed(store, account, batches, numbers))
            base, new = (statistics.median(figures[k]) for k in (False, True))
            print(
                f"{name}: without the number index {base:.1f} us/msg ({min(figures[False]):.1f}-"
                f"{max(figures[False]):.1f}), with it {new:.1f} us/msg ({min(figures[True]):.1f}-"
                f"{max(figures[True]):.1f}): {new / base:.2f}x"
            )
            await store.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50))
