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

from collections.abc import Sequence
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
from gateway.errors import LookupFailed
from gateway.numbers import number_prefix
from gateway.obs import metrics as m
from gateway.obs.logs import get_logger
from gateway.providers.base import (
    Action,
    ItemResult,
    Outbound,
    ProviderAdapter,
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
    ) -> None:
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
        pause = any(isinstance(x, Finish) and x.pause_account for x in decisions.values())
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
        price = self.account.price_per_part
        cost = round(parts * price, 6) if price is not None and r.status == Status.ACCEPTED else None
        counted = replace(r, parts=parts, encoding=str(item.encoding), cost=cost)
        return replace(decision, result=counted)

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
        """Ask the provider about ids a crashed or unanswered attempt may have sent; return those to send."""
        items = [replace(x, attempted_at=jobs[i].sent_at) for i in idx if (x := jobs[i].item) is not None]
        try:
            found = await self._adapter.lookup(items)
        except LookupFailed as exc:
            log.warning("reconcile_failed", account=self.account.name, count=len(idx), error=str(exc)[:200])
            unknown = ItemResult.failure(
                "lookup_failed", "LookupFailed", "could not tell whether it was sent", Action.AMBIGUOUS
            )
            now = self._clock.now()
            for i in idx:
                decisions[i] = decide(unknown, jobs[i].attempts + 1, self._policy, self._adapter.name, now)
            return []
        to_send = []
        now = self._clock.now()
        for i, result in zip(idx, found, strict=True):
            if result is None:
                to_send.append(i)
            else:
                decisions[i] = decide(result, max(jobs[i].attempts, 1), self._policy, self._adapter.name, now)
        log.info("reconciled", account=self.account.name, found=len(idx) - len(to_send), missing=len(to_send))
        return to_send

    async def _send(
        self, jobs: Sequence[Job], idx: list[int], decisions: dict[int, Decision], taken: Grant | None
    ) -> bool:
        """Send `idx` as rate-limit tokens allow; `taken` is what the claim step granted. Returns
        True when the store failed while taking tokens: the ids still waiting for tokens were not
        sent and wait (their claims stay, so a later copy reconciles after the lease)."""
        name = self.account.name

        async def send_chunk(chunk: list[int]) -> None:
            m.BATCH_SIZE.labels(name).observe(len(chunk))
            started = self._clock.time()
            for i in chunk:
                jobs[i].attempt_at = started
            items = [x for i in chunk if (x := jobs[i].item) is not None]
            try:
                results = await send_split(self._adapter.send, items)
            except Exception as exc:  # an adapter bug: the request may have gone out
                log.exception("adapter_failed", account=name, size=len(chunk))
                failed = ItemResult.failure(
                    "internal", type(exc).__name__, "the provider call failed in the gateway", Action.AMBIGUOUS
                )
                results = [failed] * len(chunk)
            now = self._clock.now()
            for i, result in zip(chunk, results, strict=True):
                decisions[i] = decide(result, jobs[i].attempts + 1, self._policy, self._adapter.name, now)
            if any(r.error is not None and r.error.throttle for r in results):
                await self._limiter.throttled()

        unsent = await self._limiter.pace(idx, taken, send_chunk)
        for i in unsent:
            decisions[i] = self.wait(jobs[i])
        return bool(unsent)

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
                    tracked.append(Tracked(r.provider_message_id, uid, job.phone, job.meta, self.provider, now))
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
