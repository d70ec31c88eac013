"""The batch orchestration, as values: what happens to each request, decided without any AMQP.

    admit    bytes -> SendRequest -> Outbound        (or a decision at once: invalid, expired, or
                                                      the lane's policy deferring it: lanes.py)
    run      claim + rate-limit tokens (one store round trip)
             -> reconcile the ids an earlier attempt may have sent (adapter lookup)
             -> send as tokens allow (ratelimit), splitting what the provider says is too large
             -> decide per message: Finish (outcome, maybe a dead letter) | Retry | Wait
             -> record what the decisions mean in the store, before anything is published

It works only through the `Store` and `ProviderAdapter` protocols and an injected `Clock`; the
consumer turns its deliveries into `Job`s and carries the decisions out (settle.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from gateway import contract as c
from gateway.clock import SYSTEM, Clock
from gateway.config import Account, SendOptions
from gateway.contract import DeadReason, InvalidRequest, Lane, OutcomeError, PolicyCode, Status
from gateway.core import budgets, lanes
from gateway.core.decisions import (
    Decision,
    Defer,
    Finish,
    Job,
    Refusal,
    Retry,
    Wait,
    already_done,
    decide,
    expired,
    finish,
    invalid,
    is_expired,
    prepare,
    refused,
)
from gateway.core.ratelimit import RateLimiter
from gateway.core.retry import RetryPolicy, retry_delays_ms, wait_delay_ms
from gateway.core.routes import Routes, provably_unsent
from gateway.errors import LookupFailed
from gateway.numbers import country_of, number_prefix
from gateway.obs import metrics as m
from gateway.obs.logs import get_logger
from gateway.providers.base import (
    Action,
    ItemResult,
    Outbound,
    ProviderAdapter,
    ProviderError,
    send_split,
)
from gateway.state import Claim, ClaimState, Grant, SendStore, StoredResult
from gateway.state.base import BatchRecord, BudgetCounter, CounterKind, RetryNote, Tracked

# The decisions are re-exported: the bus settles what the pipeline decides, by these names.

log = get_logger("gateway.core.pipeline")
RECORD_RETRY_FIRST_S = 0.2  # a batch's record that failed is tried again after this, then doubling
RECORD_RETRY_MAX_S = 2.0
# An accepted message's final delivery event is held until its `accepted` outcome is confirmed out
# (the worker announces it to the store), or this long after acceptance: by then a lost `accepted`
# was published again by the request's redelivered copy, or the store was away when it was.
ANNOUNCE_HOLD_S = 300.0


# -- the pipeline of one account ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchResult:
    decisions: list[Decision]  # one per job, in order
    store_failed: bool  # the store failed on the way: the caller backs the account off
    pause_account: bool  # the provider refused the account itself (credentials, blocked, quota)
    sent: int = 0  # jobs handed to the provider's send call (not answered from the store)
    tracked: Sequence[Tracked] = ()  # accepted messages now tracked (stored): their copy goes to the stream

    @property
    def congested(self) -> bool:
        """Some message meets a retryable provider failure (a timeout, a 5xx, throttling): the
        provider is struggling, so the account's in-flight limit backs off (concurrency.py)."""
        return any(isinstance(d, Retry) for d in self.decisions)


@dataclass(frozen=True, slots=True)
class Sender:
    """A configured account as a way out: its settings (sender name, price) and its adapter."""

    account: Account
    adapter: ProviderAdapter


class Pipeline:
    """Admission and batches of one lane of one account."""

    def __init__(
        self,
        *,
        account: Account,
        adapter: ProviderAdapter,
        store: SendStore,
        options: SendOptions,
        owner: str,
        lane: Lane = Lane.NORMAL,
        clock: Clock = SYSTEM,
        routes: Routes | None = None,
        senders: Mapping[str, Sender] | None = None,
    ) -> None:
        """`routes` and `senders` (every configured account by name): the accounts this one's
        `route_by_country` and `failover_to` name send through their own adapters and rate limits."""
        self.account = account
        self.lane = lane
        self._rank = lanes.rank(lane)
        self._quiet = account.quiet_window if lane is Lane.BULK else None
        self._defer_delays_ms = retry_delays_ms(options.retry_schedule_s)
        self._adapter = adapter
        self._store = store
        self._options = options
        self._owner = owner
        self._clock = clock
        self._policy = RetryPolicy(options.retry_schedule_s, options.max_attempts)
        # A live claim lasts at most a lease; past it the claim is reconciled, not waited for. The
        # grace covers the store's own recovery (a failover) and a claim renewed meanwhile.
        self._patience_s = options.claim_lease_s + options.wait_grace_s
        self._limiter = RateLimiter(store, account, clock, rank=self._rank)
        # Every account's calls feed its route's circuit (others may fail over to it); only an
        # account with routes of its own chooses among them.
        self._circuits = routes
        self._routes = routes if routes is not None and len(account.routes_to) > 1 else None
        self._ways: dict[str, tuple[Sender, RateLimiter]] = {account.name: (Sender(account, adapter), self._limiter)}
        if self._routes is not None:
            assert senders is not None
            for name in account.routes_to[1:]:
                way = senders[name]
                self._ways[name] = (way, RateLimiter(store, way.account, clock, rank=self._rank))

    @property
    def provider(self) -> str:
        return self._adapter.name

    # -- admission: one message at a time -----------------------------------------------------------

    def admit(self, job: Job, body: bytes, message_id: str | None) -> Decision | None:
        """Decode and prepare one request; a decision when it ends here, None when it joins a batch."""
        now = self._clock.now()
        req = c.decode_request(body, message_id=message_id)
        if isinstance(req, InvalidRequest):
            job.unique_id, job.to, job.meta = req.unique_id, req.to, req.meta
            return invalid(req, now)
        if self.lane is Lane.URGENT and req.expires_at is None:
            if job.valid_until is None:
                job.valid_until = lanes.urgent_deadline(
                    job.published_at, now.timestamp(), self.account.urgent_validity_s
                )
            req = replace(req, expires_at=datetime.fromtimestamp(job.valid_until, UTC))
        job.unique_id, job.to, job.meta, job.request = req.unique_id, req.to, req.meta, req
        if is_expired(req, now):
            return expired(self._adapter.name, job.attempts, now, validity=job.valid_until is not None)
        item = prepare(self.account, req)
        if isinstance(item, InvalidRequest):
            return invalid(item, now)
        if isinstance(item, Refusal):
            return self._refuse(item, now)
        job.item = item
        if self._quiet is not None:
            wait_s = lanes.quiet_wait_s(self._quiet, item.phone, self.account.default_country, now)
            if wait_s > 0:
                return Defer(lanes.defer_step_ms(wait_s, self._defer_delays_ms), "quiet_hours")
        return None

    def wait(self, job: Job, busy: Claim | None = None) -> Decision:
        """Look again later without an attempt; the delay grows with each wait (retry.WAIT_SCHEDULE_S).

        With `busy` (another worker's live claim holds the id) the wait is bounded by time from the
        copy's first such wait: the claim lease plus `wait_grace_s`. A claim still live after that
        was taken again and again meanwhile, and the copy fails rather than loop. Without it (the
        store failed, or the same id came twice in one batch) no time is counted: a store outage
        pauses the account instead of spending the copies' patience."""
        if busy is None:
            return Wait(wait_delay_ms(job.waits), job.waiting_since, own=job.ours)
        now = self._clock.time()
        since = job.waiting_since if job.waiting_since is not None else now
        if now - since <= self._patience_s:
            return Wait(wait_delay_ms(job.waits), since, own=job.ours)
        lease_left = busy.lease_left_s or 0.0
        log.warning(
            "waits_exhausted",
            account=self.account.name,
            unique_id=job.unique_id,
            owner=busy.owner,
            claim_age_s=round(max(0.0, self._options.claim_lease_s - lease_left), 1),
            lease_left_s=round(lease_left, 1),
            waited_s=round(now - since, 1),
            waits=job.waits,
        )
        err = OutcomeError("waits_exhausted", "WaitsExhausted", "gave up waiting for the id's claim", False)
        # Not stored: the claim belongs to another worker, whose result is the id's record.
        return finish(
            Status.FAILED,
            self._adapter.name,
            at=self._clock.now(),
            attempts=job.attempts,
            error=err,
            dead=DeadReason.RETRIES_EXHAUSTED,
            store=False,
        )

    # -- a batch ------------------------------------------------------------------------------------

    async def run(self, jobs: Sequence[Job]) -> BatchResult:
        """A decision for every job. Never raises: a store failure before anything was sent makes
        every job wait; after, the known results stand and the rest wait."""
        try:
            decisions, store_failed, sent = await self._decide(jobs)
        except Exception:
            # Nothing of the batch reached the provider (see _decide). The batch waits in the broker
            # as delayed copies rather than being requeued: a requeue counts towards the queue's
            # delivery limit, whose dead letter has no gateway headers.
            log.exception("batch_failed", account=self.account.name, size=len(jobs))
            return BatchResult([self.wait(j) for j in jobs], store_failed=True, pause_account=False)
        # A routed account's account errors pause its route, not its consumers (core/routes.py).
        pause = self._routes is None and any(isinstance(x, Finish) and x.pause_account for x in decisions.values())
        for i, decision in decisions.items():
            item = jobs[i].item
            if isinstance(decision, Finish) and decision.store and item is not None:
                decisions[i] = self._counted(decision, item)
        batch = self._batch_record(jobs, decisions)
        if not await self._record(batch):
            # Nothing the batch did is stored. Publishing its results now would leave an accepted
            # message untracked (no delivery report, ever) and a result later copies cannot find.
            # So a copy whose result was not stored waits instead: its claim stays, and its next
            # copy reconciles with the provider (never a blind resend). Retries stand: an ambiguous
            # one reconciles anyway, and any other one surely did not send.
            store_failed = True
            for i, decision in decisions.items():
                if isinstance(decision, Finish) and decision.store:
                    decisions[i] = Wait(wait_delay_ms(jobs[i].waits), jobs[i].waiting_since, own=True, unsent=False)
            batch = BatchRecord()
        else:
            self._count_parts(jobs, decisions)
        ordered = [decisions[i] for i in range(len(jobs))]
        return BatchResult(ordered, store_failed, pause, sent, batch.tracked)

    def _counted(self, decision: Finish, item: Outbound) -> Finish:
        """A result this copy made, with what the text costs: the provider's part count when it
        gave one, else the local count; the encoding; on `accepted`, the cost at the account's price."""
        r = decision.result
        parts = r.parts if r.parts is not None else item.parts
        way = self._ways.get(r.via or self.account.name)
        price = way[0].account.price_per_part if way is not None else None
        if price is None:
            price = self.account.price_per_part
        cost = round(parts * price, 6) if price is not None and r.status == Status.ACCEPTED else None
        counted = replace(r, parts=parts, encoding=str(item.encoding), cost=cost)
        d = decision
        return Finish(counted, dead=d.dead, store=d.store, original=d.original, pause_account=d.pause_account)

    def _count_parts(self, jobs: Sequence[Job], decisions: dict[int, Decision]) -> None:
        """The parts, savings and cost of the messages this batch recorded as accepted (once each:
        a later copy finds the stored result and counts nothing)."""
        name = self.account.name
        for i, d in decisions.items():
            item = jobs[i].item
            if not (isinstance(d, Finish) and d.store and d.status is Status.ACCEPTED and item is not None):
                continue
            r = d.result
            m.PARTS.labels(name, r.encoding or str(item.encoding)).inc(r.parts or item.parts)
            if item.parts_saved > 0:
                m.PARTS_SAVED.labels(name).inc(item.parts_saved)
            if r.cost is not None:
                app = jobs[i].app_id
                m.COST.labels(name, app if app in self.account.app_budgets else "other").inc(r.cost)

    async def _decide(self, jobs: Sequence[Job]) -> tuple[dict[int, Decision], bool, int]:
        """Claim, reconcile, send: a decision for every job, whether the store failed on the way,
        and how many were sent. Raises only before anything of the batch was sent (the claim or the
        reconcile failed)."""
        decisions: dict[int, Decision] = {}
        first_of: dict[str, int] = {}
        for i, job in enumerate(jobs):
            assert job.unique_id is not None  # admitted jobs only
            if job.unique_id in first_of:
                decisions[i] = self.wait(job)  # the same id twice in one batch
            else:
                first_of[job.unique_id] = i
        await self._refuse_opted_out(jobs, first_of, decisions)
        budget = budgets.for_batch(
            self.account,
            self.lane,
            {
                uid: budgets.Request(item.parts, jobs[i].app_id, item.phone)
                for uid, i in first_of.items()
                if (item := jobs[i].item) is not None
            },
            self._clock.time(),
        )
        # Requests routed through another account take that account's tokens when they are sent.
        away = (
            {
                uid
                for uid, i in first_of.items()
                if (item := jobs[i].item) is not None
                and self._routes.planned(self.account, country_of(item.phone)) != self.account.name
            }
            if self._routes is not None
            else set()
        )
        # One round trip claims the ids (reserving their budgets) and takes rate-limit tokens for the new ones.
        rate, burst = self._limiter.limits
        claims, grant = await self._store.claim_and_acquire(
            self.account.name,
            list(first_of),
            self._owner,
            self._options.claim_lease_s,
            rate,
            burst,
            rank=self._rank,
            min_share=self.account.lane_min_share,
            suspect={uid for uid, i in first_of.items() if jobs[i].seen_before},
            recovery_s=self._options.store_recovery_s,
            replay={uid for uid, i in first_of.items() if jobs[i].replay},
            budget=budget,
            untokened=away,
        )
        now = self._clock.now()
        reconcile: list[int] = []
        send: list[int] = []
        for uid, i in first_of.items():
            claim = claims[uid]
            if claim.state is ClaimState.DONE:
                assert claim.result is not None
                decisions[i] = already_done(claim.result, ours=jobs[i].ours, at=now)
            elif claim.state is ClaimState.BUSY:
                decisions[i] = self.wait(jobs[i], claim)
            elif claim.state is ClaimState.QUOTA:
                assert claim.budget is not None
                decisions[i] = self._refuse(self._over_limit(claim.budget, jobs[i]), now)
            elif claim.state is ClaimState.RECONCILE or jobs[i].sent_at is not None:
                # A copy that says an earlier attempt may have gone out is reconciled whatever the
                # store says: a store that lost its records answers NEW for it.
                reconcile.append(i)
            else:
                send.append(i)
        if reconcile:
            send += await self._reconcile(jobs, reconcile, decisions)
        now = self._clock.now()
        for i in list(send):
            req = jobs[i].request
            if req is not None and is_expired(req, now):
                decisions[i] = expired(
                    self._adapter.name, jobs[i].attempts, now, validity=jobs[i].valid_until is not None
                )
                send.remove(i)
        taken = grant if grant.granted or grant.wait_s else None
        store_failed = await self._send(jobs, send, decisions, taken)
        return decisions, store_failed, len(send)

    def _refuse(self, refusal: Refusal, now: datetime) -> Finish:
        m.POLICY_REFUSALS.labels(self.account.name, self.lane, refusal.code).inc()
        return refused(refusal, now)

    def _over_limit(self, counter: BudgetCounter, job: Job) -> Refusal:
        """Why a request a counted limit had no room for is refused (core/budgets.py)."""
        every = {"hour": "hourly", "day": "daily", "month": "monthly"}.get(counter.period, counter.period)
        if counter.kind is CounterKind.VELOCITY:
            country = counter.scope.removeprefix("country:")
            number_range = number_prefix(job.phone or "")
            m.VELOCITY_BLOCKED.labels(self.account.name, country, number_range).inc()
            log.warning("velocity_blocked", account=self.account.name, country=country, range=number_range)
            message = f"the {every} cap of {counter.limit} messages to {country} is reached"
            return Refusal(PolicyCode.VELOCITY_BLOCKED, message)
        if counter.kind is CounterKind.FREQUENCY:
            message = f"the recipient already got {counter.limit} messages today (the {every} cap)"
            return Refusal(PolicyCode.FREQUENCY_CAPPED, message)
        what = "the account's" if counter.scope == "account" else f"application {counter.scope[4:]!r}'s"
        return Refusal(PolicyCode.QUOTA_EXCEEDED, f"{what} {every} budget of {counter.limit} parts is spent")

    async def _refuse_opted_out(
        self, jobs: Sequence[Job], first_of: dict[str, int], decisions: dict[int, Decision]
    ) -> None:
        """Refuse the copies to numbers in the opt-out registry (one store round trip for the batch)
        and take them out of `first_of`, so they are neither claimed nor sent. A copy that may
        have gone out before (a redelivery, a wait copy, an ambiguous attempt's retry) is not
        refused: its earlier attempt is reconciled like any other, so an outcome never says
        `rejected` for a message the provider may hold."""
        if self.lane not in self.account.optout_lanes:
            return
        fresh = {
            uid: item.phone
            for uid, i in first_of.items()
            if (item := jobs[i].item) is not None and jobs[i].sent_at is None and not jobs[i].seen_before
        }
        if not fresh:
            return
        opted = await self._store.opted_out(self.account.name, set(fresh.values()))
        if not opted:
            return
        now = self._clock.now()
        refusal = Refusal(PolicyCode.OPTED_OUT, "the number opted out of this account's messages")
        for uid, phone in fresh.items():
            if phone in opted:
                decisions[first_of.pop(uid)] = self._refuse(refusal, now)

    async def _reconcile(self, jobs: Sequence[Job], idx: list[int], decisions: dict[int, Decision]) -> list[int]:
        """Ask the provider about ids a crashed or unanswered attempt may have sent; return those to
        send. A routed account asks every account the copy says an attempt may have reached (all
        its routes when the copy cannot say): found at any is found, and one that cannot be asked
        leaves the request undecided rather than sent again."""
        asks: dict[str, list[int]] = {}
        for i in idx:
            names = (jobs[i].maybe_at or self.account.routes_to) if self._routes is not None else (self.account.name,)
            for name in names:
                asks.setdefault(name, []).append(i)
        answers = await asyncio.gather(*(self._lookup(name, jobs, group) for name, group in asks.items()))
        found: dict[int, tuple[str, ItemResult]] = {}
        unasked: set[int] = set()
        for (name, group), answer in zip(asks.items(), answers, strict=True):
            if answer is None:
                unasked.update(group)
                continue
            for i, result in zip(group, answer, strict=True):
                if result is not None and i not in found:
                    found[i] = (name, result)
        to_send = []
        now = self._clock.now()
        for i in idx:
            if i in found:
                name, result = found[i]
                jobs[i].maybe_at = (name,)
                provider = self._ways[name][0].adapter.name
                decisions[i] = decide(result, max(jobs[i].attempts, 1), self._policy, provider, now, via=name)
            elif i in unasked:
                unknown = ItemResult.failure(
                    "lookup_failed", "LookupFailed", "could not tell whether it was sent", Action.AMBIGUOUS
                )
                decisions[i] = decide(unknown, jobs[i].attempts + 1, self._policy, self._adapter.name, now)
            else:
                to_send.append(i)
        if unasked:
            log.warning("reconcile_failed", account=self.account.name, count=len(unasked))
        log.info("reconciled", account=self.account.name, found=len(found), missing=len(to_send))
        return to_send

    async def _lookup(self, name: str, jobs: Sequence[Job], idx: list[int]) -> list[ItemResult | None] | None:
        """What account `name` knows of the jobs' requests; None when it could not be asked."""
        way = self._ways.get(name)
        if way is None:  # no longer configured: it cannot be asked
            log.warning("reconcile_unknown_account", account=self.account.name, via=name[:64])
            return None
        sender = way[0]
        items = [replace(self._as_sent(jobs[i], sender), attempted_at=jobs[i].sent_at) for i in idx]
        try:
            return await sender.adapter.lookup(items)
        except LookupFailed as exc:
            log.warning("lookup_failed", account=self.account.name, via=name, count=len(idx), error=str(exc)[:200])
            return None

    def _as_sent(self, job: Job, sender: Sender) -> Outbound:
        """The job's item as `sender` sends it: another account's own sender name, unless the
        request named one."""
        item = job.item
        assert item is not None
        if sender.account is self.account:
            return item
        named = job.request.sender if job.request is not None else None
        return replace(item, sender=named or sender.account.sender)

    async def _send(
        self, jobs: Sequence[Job], idx: list[int], decisions: dict[int, Decision], taken: Grant | None
    ) -> bool:
        """Send `idx` as rate-limit tokens allow; `taken` is what the claim step granted. Returns
        True when the store failed while taking tokens: the ids still waiting for tokens were not
        sent and wait (their claims stay, so a later copy reconciles after the lease).

        A routed account sends each request through the account its route chooses; a request that
        account provably did not take (not sent, refused before acceptance) goes on to the next
        usable one in the same batch. One whose answer was lost stays where it went."""
        home = self.account.name
        made: dict[int, int] = {}
        if self._routes is None:
            _moved, failed = await self._send_via(home, jobs, idx, decisions, taken, made)
            return failed
        routes = self._routes
        tried: dict[int, list[str]] = {}
        todo = list(idx)
        store_failed = False
        while todo:
            groups: dict[str, list[int]] = {}
            for i in todo:
                item = jobs[i].item
                assert item is not None
                name, reason = routes.choose(self.account, country_of(item.phone), tried.get(i, ()))
                if not name:
                    if i not in tried:  # its routes are paused: it waits for them, no attempt counted
                        decisions[i] = self._route_paused(jobs[i])
                    continue  # else the last account's answer stands
                if reason is not None:
                    m.FAILOVERS.labels(home, name, str(reason)).inc()
                groups.setdefault(name, []).append(i)
            outs = await asyncio.gather(
                *(
                    self._send_via(name, jobs, group, decisions, taken if name == home else None, made)
                    for name, group in groups.items()
                )
            )
            taken = None  # the claim's tokens are spent once
            todo = []
            for name, (moved, failed) in zip(groups, outs, strict=True):
                store_failed |= failed
                for i in moved:
                    tried.setdefault(i, []).append(name)
                    todo.append(i)
        return store_failed

    def _route_paused(self, job: Job) -> Retry:
        """Every route of the request is paused by an account error: it comes back once the first
        pause ends (through the longest declared delay not past it) without counting an attempt."""
        paused_s = self._routes.paused_for_s(self.account) if self._routes is not None else 0.0
        error = ProviderError(
            "route_paused",
            "RoutePaused",
            "every route of the account is paused by an account error",
            True,
            Action.RETRYABLE,
        )
        delay_ms = lanes.defer_step_ms(paused_s, self._defer_delays_ms)
        return Retry(delay_ms=delay_ms, attempts=job.attempts, error=error, ambiguous=False)

    async def _send_via(
        self,
        name: str,
        jobs: Sequence[Job],
        idx: list[int],
        decisions: dict[int, Decision],
        taken: Grant | None,
        made: dict[int, int],
    ) -> tuple[list[int], bool]:
        """Send `idx` through account `name` at its rate. Returns the jobs it provably did not take
        (a routed account's: they may go on at once) and whether the store failed taking tokens."""
        sender, limiter = self._ways[name]
        adapter = sender.adapter
        routes = self._routes
        circuits = self._circuits
        moved: list[int] = []

        async def call(chunk: list[int]) -> list[ItemResult]:
            items = [self._as_sent(jobs[i], sender) for i in chunk]
            try:
                results = await send_split(adapter.send, items)
            except Exception as exc:  # an adapter bug: the request may have gone out
                log.exception("adapter_failed", account=self.account.name, via=name, size=len(chunk))
                failed = ItemResult.failure(
                    "internal", type(exc).__name__, "the provider call failed in the gateway", Action.AMBIGUOUS
                )
                results = [failed] * len(chunk)
            if circuits is not None:
                circuits.called(name, results)
            return results

        async def send_chunk(chunk: list[int]) -> None:
            m.BATCH_SIZE.labels(name).observe(len(chunk))
            started = self._clock.time()
            for i in chunk:
                jobs[i].attempt_at = started
                made[i] = made.get(i, 0) + 1
                if routes is not None:
                    jobs[i].maybe_at = (name,)
            if routes is None:
                results = await call(chunk)
            else:  # another account's adapter may batch otherwise (its sender, its batch size)
                parts: dict[object, list[int]] = {}
                for i in chunk:
                    parts.setdefault(adapter.batch_key(self._as_sent(jobs[i], sender)), []).append(i)
                pieces = [
                    p[k : k + adapter.max_batch] for p in parts.values() for k in range(0, len(p), adapter.max_batch)
                ]
                answered = await asyncio.gather(*(call(p) for p in pieces))
                by_job = {i: r for p, rs in zip(pieces, answered, strict=True) for i, r in zip(p, rs, strict=True)}
                results = [by_job[i] for i in chunk]
            now = self._clock.now()
            for i, result in zip(chunk, results, strict=True):
                decisions[i] = decide(result, jobs[i].attempts + made[i], self._policy, adapter.name, now, via=name)
                if circuits is not None and result.error is not None and result.error.pause_account:
                    circuits.pause(name, result.error.code)
                if routes is not None and provably_unsent(result):
                    moved.append(i)
            if any(r.error is not None and r.error.throttle for r in results):
                await limiter.throttled()

        unsent = await limiter.pace(idx, taken, send_chunk)
        for i in unsent:
            decisions[i] = self.wait(jobs[i])
        return moved, bool(unsent)

    def _batch_record(self, jobs: Sequence[Job], decisions: dict[int, Decision]) -> BatchRecord:
        """What the decisions mean to the state store: results, unknown marks, released claims, and
        the accepted messages' correlation for delivery reports (dlr.py). Test requests and messages
        without a provider id are not tracked."""
        done: dict[str, StoredResult] = {}
        unknown: list[str] = []
        release: list[str] = []
        tracked: list[Tracked] = []
        retries: dict[str, RetryNote] = {}
        numbers: dict[str, str] = {}
        track = self._options.dlr.enabled
        now = self._clock.time()
        for i, decision in decisions.items():
            job = jobs[i]
            uid = job.unique_id
            assert uid is not None
            if isinstance(decision, Finish) and decision.store:
                r = done[uid] = decision.result
                if job.phone:
                    numbers[uid] = job.phone
                is_test = job.item is not None and job.item.test
                if track and r.status == Status.ACCEPTED and r.provider_message_id and not is_test:
                    via = r.via if r.via != self.account.name else None
                    provider = r.provider or self.provider
                    tracked.append(Tracked(r.provider_message_id, uid, job.phone, job.meta, provider, now, via=via))
            elif isinstance(decision, Retry):
                (unknown if decision.ambiguous else release).append(uid)
                err = decision.error
                retries[uid] = RetryNote(decision.attempts, err.code, err.message, now, now + decision.delay_ms / 1000)
        refund: list[str] = []
        spend: list[str] = []
        if self.account.has_limits:
            # The claims' held draws come back when the provider refused the message, it expired
            # before the provider got it, or its retry surely did not send (its next copy draws
            # again); an accepted one, or one failed after an attempt that may have gone out, spends them.
            given_back = (Status.REJECTED, Status.EXPIRED)
            refund = [*release, *(uid for uid, r in done.items() if r.status in given_back)]
            spend = [uid for uid, r in done.items() if r.status not in given_back]
        s = self._options
        return BatchRecord(
            refund=refund,
            spend=spend,
            done=done,
            unknown=unknown,
            release=release,
            owner=self._owner,
            ttl_s=self.account.dedupe_window_s,
            tracked=tracked,
            first_poll_s=s.dlr.poll_after_s,
            track_ttl_s=s.dlr.track_ttl_s,
            hold_s=ANNOUNCE_HOLD_S,
            retries=retries,
            numbers=numbers,
        )

    async def _record(self, batch: BatchRecord) -> bool:
        """Store the batch's record before anything is published, trying again while the store is
        away (a pause, a failover) for up to half a claim lease. False when it never answered."""
        if not batch:
            return True
        deadline = self._clock.monotonic() + self._options.claim_lease_s / 2
        delay = RECORD_RETRY_FIRST_S
        while True:
            try:
                await self._store.record(self.account.name, batch)
            except Exception as exc:  # noqa: BLE001 - the store is away: try again, then give up
                name, error = self.account.name, type(exc).__name__
                if self._clock.monotonic() + delay > deadline:
                    log.error("record_failed", account=name, size=len(batch.done), error=error)  # noqa: TRY400
                    return False
                log.warning("record_retry", account=name, error=error, delay_s=delay)
            else:
                return True
            await self._clock.sleep(delay)
            delay = min(delay * 2, RECORD_RETRY_MAX_S)
