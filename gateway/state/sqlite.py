"""Embedded backend: one SQLite file, for a single node (the laptop default).

Each operation is one `BEGIN IMMEDIATE` transaction, so several processes on one host sharing the
file still decide atomically. Calls run on one dedicated thread so the event loop never blocks on
the file lock.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gateway.clock import SYSTEM, Clock
from gateway.contract import REPLAYABLE
from gateway.errors import StoreRefused
from gateway.state.base import (
    HOLDER,
    LANE_DEMAND_MARGIN_S,
    LOWEST_RANK,
    NORMAL_RANK,
    NOTHING,
    OPTOUT_ALL,
    THROTTLE_COOLDOWN_S,
    THROTTLE_MIN_FACTOR,
    THROTTLE_RECOVERY_PER_S,
    AccountState,
    BatchRecord,
    Budget,
    BudgetCounter,
    Claim,
    ClaimState,
    Delivery,
    Epoch,
    EpochMemory,
    FinalState,
    Grant,
    OptOut,
    Pause,
    RecordShortcuts,
    RetryNote,
    StoredResult,
    Tracked,
    Trail,
    WebhookHint,
    distrust_new,
    note_budget_use,
)

T = TypeVar("T")
WAL_CHECKPOINT_PAGES = 10_000
_IN_CHUNK = 500  # ids or numbers per `IN (...)` (SQLite's bound-parameter limit is 32,766 from 3.32, 999 before)


def _in_chunks(items: Sequence[str]) -> Iterator[tuple[Sequence[str], str]]:
    """`items` in slices an `IN (...)` can take, each with its placeholders (`?,?,...`)."""
    for k in range(0, len(items), _IN_CHUNK):
        chunk = items[k : k + _IN_CHUNK]
        yield chunk, ",".join("?" * len(chunk))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS dedupe (
    account TEXT NOT NULL,
    uid TEXT NOT NULL,
    state TEXT NOT NULL,          -- inflight | unknown | done
    owner TEXT,
    lease_until REAL,
    result TEXT,
    expires_at REAL NOT NULL,
    PRIMARY KEY (account, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedupe_expiry ON dedupe (expires_at);
CREATE TABLE IF NOT EXISTS bucket (key TEXT PRIMARY KEY, tokens REAL NOT NULL, ts REAL NOT NULL);
-- A throttled key: the factor set by the last cut and that cut's time (state.base: THROTTLE_*).
-- a lane of an account's bucket (rank 0 urgent, 1 normal, 2 bulk): its demand mark and share bucket
CREATE TABLE IF NOT EXISTS lane (
    key TEXT NOT NULL, rank INTEGER NOT NULL, demand_until REAL NOT NULL, share REAL, share_ts REAL,
    PRIMARY KEY (key, rank)
);
CREATE TABLE IF NOT EXISTS throttle (key TEXT PRIMARY KEY, factor REAL NOT NULL, cut_at REAL NOT NULL);
-- Accepted messages waiting for their delivery report (state: open | claim | final).
CREATE TABLE IF NOT EXISTS dlr (
    account TEXT NOT NULL,
    mid TEXT NOT NULL,
    record TEXT NOT NULL,
    state TEXT NOT NULL,
    owner TEXT,
    lease_until REAL,
    due_at REAL,
    accepted_at REAL NOT NULL,
    polls INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (account, mid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dlr_due ON dlr (account, due_at) WHERE due_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS dlr_open ON dlr (account, accepted_at) WHERE state != 'final';
CREATE TABLE IF NOT EXISTS dlr_early (
    account TEXT NOT NULL, mid TEXT NOT NULL, report TEXT NOT NULL, until REAL NOT NULL, PRIMARY KEY (account, mid)
) WITHOUT ROWID;
-- A webhook event id and the message id it first named.
CREATE TABLE IF NOT EXISTS dlr_bound (
    account TEXT NOT NULL, event TEXT NOT NULL, mid TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (account, event)
) WITHOUT ROWID;
-- For `gateway trace`: a retried request's last attempt, a final delivery status, and the
-- requests with a stored result by recipient.
CREATE TABLE IF NOT EXISTS trail (
    account TEXT NOT NULL, uid TEXT NOT NULL, note TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (account, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dlr_final (
    account TEXT NOT NULL, mid TEXT NOT NULL, status TEXT NOT NULL, at TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (account, mid)
) WITHOUT ROWID;
-- Appended in time order and read by a scan (an operator's question, not the send path's), so
-- a batch's rows cost no index upkeep; expired rows are a prefix of the rowid order.
CREATE TABLE IF NOT EXISTS numbers (
    account TEXT NOT NULL, num TEXT NOT NULL, uid TEXT NOT NULL, at REAL NOT NULL, expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pause (
    account TEXT NOT NULL, owner TEXT NOT NULL, record TEXT NOT NULL, until REAL NOT NULL, PRIMARY KEY (account, owner)
) WITHOUT ROWID;
-- The opt-out registry: scope is an account's name or '*' (every account).
CREATE TABLE IF NOT EXISTS optout (
    scope TEXT NOT NULL, num TEXT NOT NULL, record TEXT NOT NULL, PRIMARY KEY (scope, num)
) WITHOUT ROWID;
-- Limits (budgets, country velocity, recipient frequency: core/budgets.py): each counter's count
-- in its period, and each claimed request's draws (`name=amount|...`) until its batch's record
-- spends or refunds them.
CREATE TABLE IF NOT EXISTS counter (
    account TEXT NOT NULL, name TEXT NOT NULL, used INTEGER NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (account, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hold (
    account TEXT NOT NULL, uid TEXT NOT NULL, draws TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (account, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS epoch (
    account TEXT PRIMARY KEY, id TEXT NOT NULL, since REAL NOT NULL, lost INTEGER NOT NULL
);
"""


class _Books:
    """A batch's budget inside its claim's transaction (state.base: `Budget`)."""

    def __init__(self, db: sqlite3.Connection, account: str, budget: Budget, now: float, lease_s: float) -> None:
        self._db, self._account, self._budget = db, account, budget
        self._hold_until = now + max(lease_s * 4, 3600)
        self.used: list[int] = []
        for c in budget.counters:
            row = db.execute(
                "SELECT used FROM counter WHERE account=? AND name=? AND expires_at>=?", (account, c.name, now)
            ).fetchone()
            self.used.append(int(row[0]) if row else 0)

    def take(self, uid: str, *, fresh: bool) -> BudgetCounter | None:
        """Draw the id's amounts; the counter without room when a fresh one may not (nothing
        drawn). A claim taken again (it may have been sent) is counted when it holds nothing yet."""
        ask = self._budget.asks.get(uid)
        if ask is None:
            return None
        if not fresh:
            held = self._db.execute("SELECT 1 FROM hold WHERE account=? AND uid=?", (self._account, uid)).fetchone()
            if held is not None:
                return None
        else:
            for d in ask.draws:
                if d.enforced and self.used[d.counter] + d.amount > self._budget.counters[d.counter].limit:
                    return self._budget.counters[d.counter]
        for d in ask.draws:
            counter = self._budget.counters[d.counter]
            self.used[d.counter] += d.amount
            self._db.execute(
                "INSERT INTO counter VALUES (?, ?, ?, ?) "
                "ON CONFLICT (account, name) DO UPDATE SET used = excluded.used, expires_at = excluded.expires_at",
                (self._account, counter.name, self.used[d.counter], counter.expires_at),
            )
        draws = "|".join(f"{self._budget.counters[d.counter].name}={d.amount}" for d in ask.draws)
        self._db.execute(
            "INSERT OR REPLACE INTO hold VALUES (?, ?, ?, ?)", (self._account, uid, draws, self._hold_until)
        )
        return None


class SqliteStore(RecordShortcuts):
    def __init__(self, path: Path, clock: Clock = SYSTEM) -> None:
        self._path = path
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None
        self._ops = 0
        self._epochs = EpochMemory()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self._path)!r})"

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, isolation_level=None, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # A batch's record touches a page per message in the id-keyed tables, and each commit
            # writes those pages to the log. Checkpointing every 10,000 pages (about 40 MB of log)
            # rather than 1,000 writes a page that several batches touched back to the file once.
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def tx() -> T:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return out

        return await asyncio.get_running_loop().run_in_executor(self._pool, tx)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read on the store's thread, without a write lock (WAL: readers see the last commit)."""

        def read() -> T:
            return fn(self._conn())

        return await asyncio.get_running_loop().run_in_executor(self._pool, read)

    def _sweep(self, db: sqlite3.Connection, now: float) -> None:
        self._ops += 1
        if self._ops % 1000 == 0:
            db.execute("DELETE FROM dedupe WHERE expires_at < ?", (now,))
            db.execute("DELETE FROM dlr WHERE expires_at < ?", (now,))
            db.execute("DELETE FROM dlr_bound WHERE expires_at < ?", (now,))
            db.execute("DELETE FROM dlr_early WHERE until < ?", (now,))
            db.execute("DELETE FROM trail WHERE expires_at < ?", (now,))
            db.execute("DELETE FROM dlr_final WHERE expires_at < ?", (now,))
            db.execute("DELETE FROM counter WHERE expires_at < ?", (now,))
            db.execute("DELETE FROM hold WHERE expires_at < ?", (now,))
            db.execute(
                "DELETE FROM numbers WHERE rowid < "
                "(SELECT coalesce(min(rowid), 1 << 62) FROM (SELECT rowid FROM numbers WHERE expires_at >= ? LIMIT 1))",
                (now,),
            )

    async def claim_and_acquire(
        self,
        account: str,
        uids: list[str],
        owner: str,
        lease_s: float,
        rate: float,
        burst: int,
        *,
        suspect: Collection[str] = (),
        recovery_s: float = 0.0,
        replay: Collection[str] = (),
        rank: int = NORMAL_RANK,
        min_share: float = 0.0,
        budget: Budget | None = None,
        untokened: Collection[str] = (),
    ) -> tuple[dict[str, Claim], Grant]:
        known = self._epochs.known(account)
        used: list[int] = []

        def op(db: sqlite3.Connection) -> tuple[dict[str, Claim], Grant, Epoch]:
            epoch = self._epoch(db, account, known)
            books = _Books(db, account, budget, self._clock.time(), lease_s) if budget is not None else None
            claims = self._claim(db, account, uids, owner, lease_s, replay, books)
            if books is not None:
                used[:] = books.used
            fresh = sum(1 for u, c in claims.items() if c.state is ClaimState.NEW and u not in untokened)
            grant = self._take(db, account, fresh, rate, burst, rank, min_share) if fresh else Grant(0, 0.0)
            return claims, grant, epoch

        if not uids:
            return {}, NOTHING
        claims, grant, epoch = await self._run(op)
        self._epochs.saw(account, epoch)
        if budget is not None:
            note_budget_use(account, budget.counters, used)
        return distrust_new(claims, epoch, suspect, recovery_s), grant

    async def budget_use(self, account: str, counters: Sequence[BudgetCounter]) -> list[int]:
        now = self._clock.time()

        def op(db: sqlite3.Connection) -> list[int]:
            out = []
            for c in counters:
                row = db.execute(
                    "SELECT used FROM counter WHERE account=? AND name=? AND expires_at>=?", (account, c.name, now)
                ).fetchone()
                out.append(int(row[0]) if row else 0)
            return out

        return await self._read(op)

    def _epoch(self, db: sqlite3.Connection, account: str, known: str) -> Epoch:
        """The account's epoch (see state.base), created when missing; `lost` once a caller that
        knew an earlier one finds it gone or replaced."""
        now = self._clock.time()
        row = db.execute("SELECT id, since, lost FROM epoch WHERE account=?", (account,)).fetchone()
        if row is None:
            epoch = Epoch(secrets.token_hex(8), 0.0, bool(known))
            db.execute("INSERT INTO epoch VALUES (?, ?, ?, ?)", (account, epoch.id, now, int(epoch.lost)))
            return epoch
        epoch_id, since, lost = row
        if known and known != epoch_id and not lost:
            lost = 1
            db.execute("UPDATE epoch SET lost=1 WHERE account=?", (account,))
        return Epoch(epoch_id, now - since, bool(lost))

    def _claim(
        self,
        db: sqlite3.Connection,
        account: str,
        uids: list[str],
        owner: str,
        lease_s: float,
        replay: Collection[str] = (),
        books: _Books | None = None,
    ) -> dict[str, Claim]:
        now = self._clock.time()
        self._sweep(db, now)
        rows: dict[str, tuple[str, float | None, str | None, str | None]] = {}
        for chunk, marks in _in_chunks(uids):
            for uid, *row in db.execute(
                "SELECT uid, state, lease_until, result, owner FROM dedupe "  # noqa: S608 - placeholders only
                f"WHERE account=? AND expires_at>=? AND uid IN ({marks})",
                (account, now, *chunk),
            ):
                rows[uid] = tuple(row)
        out: dict[str, Claim] = {}
        taken: list[tuple[str, str, str, float, float]] = []
        until, expires = now + lease_s, now + max(lease_s * 4, 3600)
        for uid in uids:
            row = rows.get(uid)
            if row is not None and row[0] == "done":
                assert row[2] is not None
                result = StoredResult.from_json(row[2])
                if not (uid in replay and result.status in REPLAYABLE):
                    out[uid] = Claim(ClaimState.DONE, result)
                    continue
            if row is not None and row[0] == "inflight" and row[1] is not None and row[1] > now:
                out[uid] = Claim(ClaimState.BUSY, owner=row[3], lease_left_s=row[1] - now)
                continue
            if books is not None:
                full = books.take(uid, fresh=row is None)
                if full is not None:
                    out[uid] = Claim(ClaimState.QUOTA, budget=full)
                    continue
            taken.append((account, uid, owner, until, expires))
            out[uid] = Claim(ClaimState.NEW if row is None else ClaimState.RECONCILE)
        if taken:
            db.executemany("INSERT OR REPLACE INTO dedupe VALUES (?, ?, 'inflight', ?, ?, NULL, ?)", taken)
        return out

    async def record(self, account: str, batch: BatchRecord) -> None:
        def op(db: sqlite3.Connection) -> None:
            now = self._clock.time()
            self._sweep(db, now)
            expires = now + batch.ttl_s
            if batch.done:
                db.executemany(
                    "INSERT OR REPLACE INTO dedupe VALUES (?, ?, 'done', NULL, NULL, ?, ?)",
                    [(account, uid, r.to_json(), expires) for uid, r in batch.done.items()],
                )
            if batch.unknown:
                db.executemany(
                    "INSERT OR REPLACE INTO dedupe VALUES (?, ?, 'unknown', NULL, NULL, NULL, ?)",
                    [(account, uid, expires) for uid in batch.unknown],
                )
            if batch.release:
                db.executemany(
                    "DELETE FROM dedupe WHERE account=? AND uid=? AND state='inflight' AND owner=?",
                    [(account, uid, batch.owner) for uid in batch.release],
                )
            if batch.tracked:
                until, first, hold = now + batch.track_ttl_s, batch.first_poll_s, batch.hold_s
                state, holder = ("claim", HOLDER) if hold > 0 else ("open", None)
                rows = [
                    (
                        account,
                        t.provider_message_id,
                        t.to_json(),
                        state,
                        holder,
                        t.accepted_at + hold if hold > 0 else None,
                        t.accepted_at + first,
                        t.accepted_at,
                        until,
                    )
                    for t in batch.tracked
                ]
                db.executemany("INSERT OR IGNORE INTO dlr VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)", rows)
            if batch.retries:
                db.executemany(
                    "INSERT OR REPLACE INTO trail VALUES (?, ?, ?, ?)",
                    [(account, uid, note.to_json(), expires) for uid, note in batch.retries.items()],
                )
            if batch.numbers:
                db.executemany(
                    "INSERT INTO numbers VALUES (?, ?, ?, ?, ?)",
                    [(account, num, uid, now, expires) for uid, num in batch.numbers.items()],
                )
            for uid in batch.refund:
                hold = db.execute("SELECT draws FROM hold WHERE account=? AND uid=?", (account, uid)).fetchone()
                if hold is not None:
                    draws = [d.rpartition("=") for d in hold[0].split("|") if d]
                    db.executemany(
                        "UPDATE counter SET used = used - ? WHERE account=? AND name=?",
                        [(int(amount), account, name) for name, _, amount in draws],
                    )
            if batch.refund or batch.spend:
                db.executemany(
                    "DELETE FROM hold WHERE account=? AND uid=?",
                    [(account, uid) for uid in (*batch.refund, *batch.spend)],
                )

        if batch:
            await self._run(op)

    async def acquire(
        self, key: str, want: int, rate: float, burst: int, rank: int = NORMAL_RANK, min_share: float = 0.0
    ) -> Grant:
        return await self._run(lambda db: self._take(db, key, want, rate, burst, rank, min_share))

    def _factor(self, db: sqlite3.Connection, key: str, now: float) -> tuple[float, float | None]:
        """(the key's throttle factor now, the time of its last cut or None)."""
        row = db.execute("SELECT factor, cut_at FROM throttle WHERE key=?", (key,)).fetchone()
        if row is None:
            return 1.0, None
        return min(1.0, row[0] + max(0.0, now - row[1]) * THROTTLE_RECOVERY_PER_S), row[1]

    def _take(
        self,
        db: sqlite3.Connection,
        key: str,
        want: int,
        rate: float,
        burst: int,
        rank: int = NORMAL_RANK,
        min_share: float = 0.0,
    ) -> Grant:
        now = self._clock.time()
        factor, cut_at = self._factor(db, key, now)
        if cut_at is not None and factor >= 1.0:
            db.execute("DELETE FROM throttle WHERE key=?", (key,))
        rate, burst_f = rate * factor, burst * factor
        cap = float(max(1, int(burst_f + 0.5)))
        row = db.execute("SELECT tokens, ts FROM bucket WHERE key=?", (key,)).fetchone()
        tokens, ts = (cap, now) if row is None else (row[0], row[1])
        tokens = min(cap, tokens + max(0.0, now - ts) * rate)
        above = (
            rank > 0
            and db.execute(
                "SELECT 1 FROM lane WHERE key=? AND rank<? AND demand_until>? LIMIT 1", (key, rank, now)
            ).fetchone()
        )
        if above:
            # A higher lane waits: this one gets its share (state.base: LANE_DEMAND_MARGIN_S), carved
            # out of the rate: granted even when the higher lane emptied the bucket, which then runs
            # below zero and pays it back from the refill.
            share_rate, share_cap = rate * min_share, float(max(1, int(burst_f * min_share + 0.5)))
            mine = db.execute("SELECT share, share_ts FROM lane WHERE key=? AND rank=?", (key, rank)).fetchone()
            share, share_ts = (share_cap, now) if mine is None or mine[0] is None else (mine[0], mine[1])
            share = min(share_cap, share + max(0.0, now - share_ts) * share_rate)
            grant = min(want, int(share + share_rate * 1e-6)) if share_rate > 0 else 0
            share -= grant
            wait = LANE_DEMAND_MARGIN_S if share_rate <= 0 else (1 - share) / share_rate if share < 1 else 0.0
            db.execute(
                "INSERT INTO lane VALUES (?, ?, 0, ?, ?) ON CONFLICT (key, rank) DO UPDATE SET share=?, share_ts=?",
                (key, rank, share, now, share, now),
            )
            tokens -= grant
        else:
            # A token due within a microsecond counts: epoch seconds near 1.8e9 carry ~2e-7 s of float error.
            grant = min(want, int(tokens + rate * 1e-6))
            tokens -= grant
            wait = (1 - tokens) / rate if tokens < 1 else 0.0
        db.execute("INSERT OR REPLACE INTO bucket VALUES (?, ?, ?)", (key, tokens, now))
        if rank < LOWEST_RANK:
            if grant < want:
                until = now + wait + LANE_DEMAND_MARGIN_S
                db.execute(
                    "INSERT INTO lane VALUES (?, ?, ?, NULL, NULL) "
                    "ON CONFLICT (key, rank) DO UPDATE SET demand_until=?",
                    (key, rank, until, until),
                )
            else:
                db.execute("UPDATE lane SET demand_until=0 WHERE key=? AND rank=? AND demand_until>0", (key, rank))
        return Grant(grant, wait, factor)

    async def throttle(self, key: str) -> float:
        def op(db: sqlite3.Connection) -> float:
            now = self._clock.time()
            factor, cut_at = self._factor(db, key, now)
            if cut_at is not None and now - cut_at < THROTTLE_COOLDOWN_S:
                return factor
            factor = max(THROTTLE_MIN_FACTOR, factor / 2)
            db.execute("INSERT OR REPLACE INTO throttle VALUES (?, ?, ?)", (key, factor, now))
            db.execute("INSERT OR REPLACE INTO bucket VALUES (?, 0, ?)", (key, now))
            return factor

        return await self._run(op)

    async def note_pause(self, account: str, pause: Pause) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM pause WHERE until < ?", (self._clock.time(),))
            db.execute(
                "INSERT OR REPLACE INTO pause VALUES (?, ?, ?, ?)", (account, pause.owner, pause.to_json(), pause.until)
            )

        await self._run(op)

    async def account_state(self, account: str) -> AccountState:
        def op(db: sqlite3.Connection) -> AccountState:
            now = self._clock.time()
            rows = db.execute(
                "SELECT owner, record FROM pause WHERE account=? AND until > ? ORDER BY owner", (account, now)
            ).fetchall()
            return AccountState(tuple(Pause.from_json(o, r) for o, r in rows), self._factor(db, account, now)[0])

        return await self._run(op)

    # -- delivery reports ---------------------------------------------------------------------------

    async def epoch_changed(self, account: str, *, look: bool = True) -> bool:
        if look:
            known = self._epochs.known(account)
            self._epochs.saw(account, await self._run(lambda db: self._epoch(db, account, known)))
        return self._epochs.take_changed(account)

    async def mark_final(self, account: str, message_ids: Sequence[str], ttl_s: float) -> None:
        def op(db: sqlite3.Connection) -> None:
            now = self._clock.time()
            db.executemany(
                "INSERT INTO dlr VALUES (?, ?, '', 'final', NULL, NULL, NULL, ?, 0, ?) "
                "ON CONFLICT (account, mid) DO UPDATE SET state='final', due_at=NULL",
                [(account, mid, now, now + ttl_s) for mid in message_ids],
            )

        if message_ids:
            await self._run(op)

    async def begin_final(
        self, account: str, message_id: str, owner: str, lease_s: float
    ) -> tuple[FinalState, Tracked | None]:
        def op(db: sqlite3.Connection) -> tuple[FinalState, Tracked | None]:
            now = self._clock.time()
            row = db.execute(
                "SELECT record, state, owner, lease_until FROM dlr WHERE account=? AND mid=? AND expires_at>=?",
                (account, message_id, now),
            ).fetchone()
            if row is None:
                return FinalState.UNKNOWN, None
            record, state, holder, lease_until = row
            if state == "final":
                return FinalState.DONE, None
            if state == "claim" and holder != owner and lease_until > now:
                return (FinalState.HELD if holder == HOLDER else FinalState.BUSY), None
            db.execute(
                "UPDATE dlr SET state='claim', owner=?, lease_until=? WHERE account=? AND mid=?",
                (owner, now + lease_s, account, message_id),
            )
            return FinalState.CLAIMED, Tracked.from_json(record)

        return await self._run(op)

    async def announce(self, account: str, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self._run(
                lambda db: db.executemany(
                    "UPDATE dlr SET state='open' WHERE account=? AND mid=? AND state='claim' AND owner=?",
                    [(account, mid, HOLDER) for mid in message_ids],
                )
            )

    async def end_final(self, account: str, message_id: str, owner: str, status: str = "", status_at: str = "") -> None:
        def op(db: sqlite3.Connection) -> None:
            ended = db.execute(
                "UPDATE dlr SET state='final', due_at=NULL WHERE account=? AND mid=? AND owner=? RETURNING expires_at",
                (account, message_id, owner),
            ).fetchone()
            if ended is not None and status:
                db.execute(
                    "INSERT OR REPLACE INTO dlr_final VALUES (?, ?, ?, ?, ?)",
                    (account, message_id, status, status_at, ended[0]),
                )

        await self._run(op)

    async def trail(self, account: str, unique_id: str) -> Trail:
        def op(db: sqlite3.Connection) -> Trail:
            now = self._clock.time()
            claim: Claim | None = None
            row = db.execute(
                "SELECT state, owner, lease_until, result FROM dedupe WHERE account=? AND uid=? AND expires_at>=?",
                (account, unique_id, now),
            ).fetchone()
            if row is not None:
                state, owner, lease_until, result = row
                if state == "done":
                    claim = Claim(ClaimState.DONE, StoredResult.from_json(result))
                elif state == "inflight" and lease_until > now:
                    claim = Claim(ClaimState.BUSY, owner=owner, lease_left_s=lease_until - now)
                else:  # an unknown mark, or a claim whose lease ran out: the next copy reconciles
                    claim = Claim(ClaimState.RECONCILE, owner=owner)
            note = db.execute(
                "SELECT note FROM trail WHERE account=? AND uid=? AND expires_at>=?", (account, unique_id, now)
            ).fetchone()
            retry = RetryNote.from_json(note[0]) if note is not None else None
            delivery = None
            mid = claim.result.provider_message_id if claim is not None and claim.result is not None else None
            if mid:
                found = db.execute(
                    "SELECT d.record, d.state, d.owner, d.polls, d.due_at, f.status, f.at FROM dlr d "
                    "LEFT JOIN dlr_final f ON f.account=d.account AND f.mid=d.mid "
                    "WHERE d.account=? AND d.mid=? AND d.expires_at>=?",
                    (account, mid, now),
                ).fetchone()
                if found is not None:
                    record, state, holder, polls, due_at, status, status_at = found
                    if state == "claim" and holder == HOLDER:
                        state = "held"
                    delivery = Delivery(Tracked.from_json(record, polls), state, polls, due_at, status, status_at)
            return Trail(claim, retry, delivery)

        return await self._run(op)

    async def by_number(self, account: str, number: str, limit: int = 50, window_s: float = 86400.0) -> list[str]:
        def op(db: sqlite3.Connection) -> list[str]:
            now = self._clock.time()
            rows = db.execute(
                "SELECT uid FROM numbers WHERE account=? AND num=? AND expires_at>=? AND at>=? "
                "ORDER BY rowid DESC LIMIT ?",
                (account, number, now, now - window_s, limit),
            ).fetchall()
            return list(dict.fromkeys(r[0] for r in rows))

        return await self._run(op)

    async def abandon_final(self, account: str, message_id: str, owner: str) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE dlr SET state='open' WHERE account=? AND mid=? AND state='claim' AND owner=?",
                (account, message_id, owner),
            )
        )

    async def due_polls(self, account: str, limit: int, lease_s: float) -> list[Tracked]:
        def op(db: sqlite3.Connection) -> list[Tracked]:
            now = self._clock.time()
            rows = db.execute(
                "SELECT mid, record, polls FROM dlr WHERE account=? AND due_at IS NOT NULL AND due_at<=? "
                "AND state!='final' AND expires_at>=? ORDER BY due_at LIMIT ?",
                (account, now, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE dlr SET due_at=? WHERE account=? AND mid=?", [(now + lease_s, account, r[0]) for r in rows]
            )
            return [Tracked.from_json(record, polls) for _, record, polls in rows]

        return await self._run(op)

    async def due_accounts(self, accounts: Sequence[str]) -> set[str]:
        def op(db: sqlite3.Connection) -> set[str]:
            now = self._clock.time()
            query = (
                "SELECT 1 FROM dlr WHERE account=? AND due_at IS NOT NULL AND due_at<=? "
                "AND state!='final' AND expires_at>=? LIMIT 1"
            )
            return {a for a in accounts if db.execute(query, (a, now, now)).fetchone() is not None}

        return await self._read(op)

    async def poll_later(self, account: str, next_at: Mapping[str, float]) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE dlr SET due_at=?, polls=polls+1 WHERE account=? AND mid=? AND state!='final'",
                [(at, account, mid) for mid, at in next_at.items()],
            )

        if next_at:
            await self._run(op)

    async def hint(self, account: str, event_id: str, message_id: str, hint: WebhookHint) -> tuple[str | None, str]:
        def op(db: sqlite3.Connection) -> tuple[str | None, str]:
            now = self._clock.time()
            row = db.execute(
                "SELECT mid FROM dlr_bound WHERE account=? AND event=? AND expires_at>=?", (account, event_id, now)
            ).fetchone()
            before = None if row is None else str(row[0])
            if before is not None and before != message_id:
                return before, "refused"
            if before is None:
                db.execute(
                    "INSERT OR REPLACE INTO dlr_bound VALUES (?, ?, ?, ?)",
                    (account, event_id, message_id, now + hint.bind_ttl_s),
                )
            state = db.execute(
                "SELECT state FROM dlr WHERE account=? AND mid=? AND expires_at>=?", (account, message_id, now)
            ).fetchone()
            if state is not None:
                if state[0] != "final":
                    db.execute(
                        "UPDATE dlr SET due_at=MIN(COALESCE(due_at, ?), ?) WHERE account=? AND mid=?",
                        (now, now, account, message_id),
                    )
                return before, "poll_due"
            (held,) = db.execute("SELECT COUNT(*) FROM dlr_early WHERE account=?", (account,)).fetchone()
            if held >= hint.park_max:
                return before, "full"
            db.execute(
                "INSERT OR REPLACE INTO dlr_early VALUES (?, ?, ?, ?)",
                (account, message_id, hint.report, now + hint.park_ttl_s),
            )
            return before, "parked"

        return await self._run(op)

    async def match_parked(self, account: str, limit: int) -> int:
        def op(db: sqlite3.Connection) -> int:
            now = self._clock.time()
            db.execute("DELETE FROM dlr_early WHERE account=? AND until<?", (account, now))
            rows = db.execute(
                "SELECT e.mid, d.state FROM dlr_early e JOIN dlr d ON d.account=e.account AND d.mid=e.mid "
                "WHERE e.account=? AND d.expires_at>=? LIMIT ?",
                (account, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE dlr SET due_at=MIN(COALESCE(due_at, ?), ?) WHERE account=? AND mid=?",
                [(now, now, account, mid) for mid, state in rows if state != "final"],
            )
            db.executemany("DELETE FROM dlr_early WHERE account=? AND mid=?", [(account, mid) for mid, _ in rows])
            return len(rows)

        return await self._run(op)

    async def oldest_open(self, account: str) -> float | None:
        def op(db: sqlite3.Connection) -> float | None:
            row = db.execute(
                "SELECT MIN(accepted_at) FROM dlr WHERE account=? AND state!='final' AND expires_at>=?",
                (account, self._clock.time()),
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._run(op)

    # -- the opt-out registry ----------------------------------------------------------------------

    async def opted_out(self, account: str, numbers: Collection[str]) -> set[str]:
        wanted = list(dict.fromkeys(numbers))
        if not wanted:
            return set()

        def op(db: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for chunk, marks in _in_chunks(wanted):
                rows = db.execute(
                    f"SELECT num FROM optout WHERE scope IN (?, ?) AND num IN ({marks})",  # noqa: S608 - marks only
                    (account, OPTOUT_ALL, *chunk),
                )
                found.update(r[0] for r in rows)
            return found

        return await self._read(op)

    async def optout_add(self, scope: str, entries: Sequence[OptOut]) -> int:
        rows = [(scope, e.number, e.to_json()) for e in entries]

        def op(db: sqlite3.Connection) -> int:
            count = "SELECT count(*) FROM optout WHERE scope = ?"
            before = int(db.execute(count, (scope,)).fetchone()[0])
            db.executemany(
                "INSERT INTO optout (scope, num, record) VALUES (?, ?, ?) "
                "ON CONFLICT (scope, num) DO UPDATE SET record = excluded.record",
                rows,
            )
            return int(db.execute(count, (scope,)).fetchone()[0]) - before

        return await self._run(op)

    async def optout_remove(self, scope: str, numbers: Sequence[str]) -> int:
        def op(db: sqlite3.Connection) -> int:
            before = db.total_changes
            db.executemany("DELETE FROM optout WHERE scope = ? AND num = ?", [(scope, n) for n in numbers])
            return db.total_changes - before

        return await self._run(op)

    async def optout_page(self, scope: str, cursor: str = "", limit: int = 1000) -> tuple[list[OptOut], str | None]:
        def op(db: sqlite3.Connection) -> list[OptOut]:
            rows = db.execute(
                "SELECT num, record FROM optout WHERE scope = ? AND num > ? ORDER BY num LIMIT ?",
                (scope, cursor, limit),
            )
            return [OptOut.from_json(num, record) for num, record in rows]

        page = await self._read(op)
        return page, (page[-1].number if len(page) == limit else None)

    async def optout_count(self, scope: str) -> int:
        def op(db: sqlite3.Connection) -> int:
            return int(db.execute("SELECT count(*) FROM optout WHERE scope = ?", (scope,)).fetchone()[0])

        return await self._read(op)

    async def ping(self) -> None:
        """Raises StoreRefused when the file cannot be opened, created or written."""
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchone())
        except (sqlite3.Error, OSError) as exc:
            raise StoreRefused(f"the state file {self._path} cannot be used: {type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=True)
