"""The state store contract shared by the Redis and SQLite backends.

Dedupe record per (account, unique_id), one of:
- in flight: a worker (`owner`) holds a claim until `lease_until`; nobody else may send it.
- unknown:   a send may or may not have reached the provider; the next claim must reconcile.
- done:      the terminal result, kept for the dedupe window; copies get `duplicate`.

`claim_and_acquire` decides atomically, for each id of a batch:
- NEW:       nothing was known; the caller now holds the claim and may send.
- DONE:      a result exists (returned).
- BUSY:      another live claim holds it; the caller must not send (wait and look again).
- RECONCILE: the record was unknown, or a claim whose lease ran out (a crashed worker), or a
             `replay` id whose result was rejected, failed or expired (a re-driven dead letter);
             the caller now holds the claim and must ask the provider what happened before sending.

A store that forgets (Redis restarted without persistence, a failover to a replica that had not
caught up, a deleted SQLite file) would answer NEW for ids that were claimed, and maybe sent, before
the loss. So each account has an *epoch* record that never expires: created with the store's first
claim, it is gone after a loss. A claim that finds no epoch creates one; when the caller had seen an
earlier epoch, the new one is marked `lost` (a process that used the store found it empty). For
`recovery_s` after an epoch starts, NEW is not trusted and is answered RECONCILE instead:
- for every id when the epoch is `lost`;
- for the `suspect` ids (copies the gateway has handled before: redeliveries and its own retry
  copies) when no process saw the loss (a fresh store: the first start, or every replica was
  restarted together with the store).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Protocol

from gateway.contract import OutcomeError
from gateway.obs import metrics as m
from gateway.obs.logs import get_logger

log = get_logger("gateway.state")
# Built once: `json.dumps` with options builds a new encoder per call (per stored result and record).
_COMPACT_ASCII = json.JSONEncoder(separators=(",", ":"))
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


class ClaimState(StrEnum):
    NEW = "new"
    DONE = "done"
    BUSY = "busy"
    RECONCILE = "reconcile"
    QUOTA = "quota"  # not claimed: a limit it draws from had no room (`Claim.budget` says which)


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A terminal result as later copies report it (the `duplicate` outcome carries it)."""

    status: str
    provider: str | None
    provider_message_id: str | None = None
    parts: int | None = None
    error: OutcomeError | None = None
    attempts: int = 0
    at: str | None = None
    encoding: str | None = None  # gsm7 | ucs2, as counted locally (segments.py)
    cost: float | None = None  # parts x the account's price_per_part, on accepted
    via: str | None = None  # the configured account that sent it (core/routes.py), once a provider had it

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "status": self.status,
            "provider": self.provider,
            "provider_message_id": self.provider_message_id,
            "parts": self.parts,
            "error": self.error.as_dict() if self.error is not None else None,
            "attempts": self.attempts,
            "at": self.at,
        }
        if self.encoding is not None:
            doc["encoding"] = self.encoding
        if self.cost is not None:
            doc["cost"] = self.cost
        if self.via is not None:
            doc["via"] = self.via
        return doc

    def to_json(self) -> str:
        return _COMPACT_ASCII.encode(self.as_dict())

    @classmethod
    def from_json(cls, text: str) -> StoredResult:
        doc = json.loads(text)
        error = doc.pop("error", None)
        # Fields this version does not know (written by a newer replica mid-rollout) are left out.
        known = {k: v for k, v in doc.items() if k in _RESULT_FIELDS}
        return cls(**known, error=OutcomeError.from_dict(error) if error else None)


_RESULT_FIELDS = frozenset(f.name for f in fields(StoredResult)) - {"error"}


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    result: StoredResult | None = None
    owner: str | None = None  # BUSY: who holds the claim
    lease_left_s: float | None = None  # BUSY: how long its lease still runs
    budget: BudgetCounter | None = None  # QUOTA: the budget that had no room


class CounterKind(StrEnum):
    """What a counter limits, and so the refusal when it has no room (contract.PolicyCode)."""

    BUDGET = "budget"  # SMS parts per day or month: quota_exceeded
    VELOCITY = "velocity"  # messages to one country per hour: velocity_blocked
    FREQUENCY = "frequency"  # messages to one recipient per day: frequency_capped


@dataclass(frozen=True, slots=True)
class BudgetCounter:
    """One limit's counter for one period: `name` is unique within the account (its scope, period
    and the period's date), `limit` in the kind's unit (parts, or messages), kept until
    `expires_at` (epoch s)."""

    name: str
    scope: str  # "account", "app:<app_id>", "country:<CC>", "recipient:<E.164>"
    period: str  # hour | day | month
    limit: int
    expires_at: float
    kind: CounterKind = CounterKind.BUDGET


@dataclass(frozen=True, slots=True)
class Draw:
    """`amount` from the counter at `counter` (an index into `Budget.counters`); not `enforced`: it
    is counted even past the limit (a lane the limit does not refuse)."""

    counter: int
    amount: int
    enforced: bool = True


@dataclass(frozen=True, slots=True)
class BudgetAsk:
    """What one request draws, from every counter it counts against."""

    draws: tuple[Draw, ...]


@dataclass(frozen=True, slots=True)
class Budget:
    """A batch's limits (budgets in parts, country velocity, recipient frequency), reserved with its
    claim (`ClaimStore.claim_and_acquire`): a NEW claim is taken only when each counter it draws
    from with `enforced` has room, and then counts every draw; a request refused there is not
    claimed (QUOTA). The draws are kept with the claim (a hold) until the record step spends them
    (sent, or maybe sent) or gives them back (`BatchRecord.refund`)."""

    counters: tuple[BudgetCounter, ...]
    asks: Mapping[str, BudgetAsk]


@dataclass(frozen=True, slots=True)
class Epoch:
    """The account's store epoch as one claim found it."""

    id: str
    age_s: float
    lost: bool


class EpochMemory:
    """The epoch id this process last saw, per account: what a claim passes as the `known` epoch,
    and the one place that reports a change (a metric and a warning)."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}
        self._changed: set[str] = set()  # accounts whose epoch changed since `take_changed` last asked

    def known(self, account: str) -> str:
        return self._seen.get(account, "")

    def saw(self, account: str, epoch: Epoch) -> None:
        known = self._seen.get(account)
        if known is not None and known != epoch.id:
            m.STORE_EPOCH_RESETS.labels(account).inc()
            log.warning("store_epoch_changed", account=account, lost=epoch.lost)
            self._changed.add(account)
        self._seen[account] = epoch.id

    def take_changed(self, account: str) -> bool:
        """Whether this process saw the account's epoch change since the last time it was asked."""
        if account in self._changed:
            self._changed.discard(account)
            return True
        return False


def note_budget_use(account: str, counters: Sequence[BudgetCounter], used: Sequence[int]) -> None:
    """The budgets' use as a claim left it, on /metrics (each replica shows the latest it saw)."""
    for counter, parts in zip(counters, used, strict=True):
        if counter.kind is CounterKind.BUDGET:  # recipients and hours would grow the label set without end
            m.BUDGET_USED.labels(account, counter.scope, counter.period).set(parts)
            m.BUDGET_LIMIT.labels(account, counter.scope, counter.period).set(counter.limit)


def distrust_new(
    claims: dict[str, Claim], epoch: Epoch, suspect: Collection[str], recovery_s: float
) -> dict[str, Claim]:
    """Answer RECONCILE instead of NEW where the store may have forgotten a claim (module docstring)."""
    if epoch.age_s >= recovery_s:
        return claims
    out = dict(claims)
    for uid, claim in claims.items():
        if claim.state is ClaimState.NEW and (epoch.lost or uid in suspect):
            out[uid] = Claim(ClaimState.RECONCILE)
    return out


@dataclass(frozen=True, slots=True)
class Tracked:
    """An accepted message waiting for its delivery report: the correlation from the provider's
    message id back to the request, and how often its status was polled."""

    provider_message_id: str
    unique_id: str
    to: str | None
    meta: dict[str, Any] | None
    provider: str
    accepted_at: float  # epoch seconds
    polls: int = 0
    via: str | None = None  # the configured account that sent it, when not the one it is tracked under

    def to_json(self) -> str:
        doc = {
            "i": self.provider_message_id,
            "u": self.unique_id,
            "t": self.to,
            "m": self.meta,
            "p": self.provider,
            "a": self.accepted_at,
        }
        if self.via is not None:
            doc["v"] = self.via
        return _COMPACT.encode(doc)

    @classmethod
    def from_json(cls, text: str, polls: int = 0) -> Tracked:
        d = json.loads(text)
        return cls(d["i"], d["u"], d["t"], d["m"], d["p"], float(d["a"]), polls, d.get("v"))


@dataclass(frozen=True, slots=True)
class RetryNote:
    """A request's last failed attempt and when its copy comes back (`gateway trace`)."""

    attempts: int
    code: str
    message: str
    at: float  # epoch seconds
    retry_at: float

    def to_json(self) -> str:
        doc = {"n": self.attempts, "c": self.code, "m": self.message, "a": self.at, "r": self.retry_at}
        return _COMPACT.encode(doc)

    @classmethod
    def from_json(cls, text: str) -> RetryNote:
        d = json.loads(text)
        return cls(int(d["n"]), str(d["c"]), str(d["m"]), float(d["a"]), float(d["r"]))


@dataclass(frozen=True, slots=True)
class Delivery:
    """An accepted message's delivery tracking as the store holds it (`gateway trace`)."""

    tracked: Tracked
    state: str  # open (polls running) | held (its `accepted` not known out yet) | claim | final
    polls: int
    next_poll_at: float | None
    final_status: str | None = None  # once final: delivered | undelivered
    final_at: str | None = None  # the provider's status time, RFC 3339


@dataclass(frozen=True, slots=True)
class Trail:
    """What the store knows of one request: its claim or result, its last retry, and its delivery."""

    claim: Claim | None  # None: no claim and no result (never seen, waiting for a retry, or forgotten)
    retry: RetryNote | None
    delivery: Delivery | None


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """What one batch's decisions mean to the store, written in one atomic step (`Store.record`):
    an accepted message's result and its delivery tracking are stored together or not at all."""

    done: Mapping[str, StoredResult] = field(default_factory=dict)  # terminal results (ends the claims)
    unknown: Sequence[str] = ()  # the send may have happened: the next claim reconciles first
    release: Sequence[str] = ()  # the send surely did not happen: our claims are forgotten
    owner: str = ""  # whose claims `release` may delete
    ttl_s: float = 0.0  # the dedupe window of `done` and `unknown`
    tracked: Sequence[Tracked] = ()  # accepted messages waiting for their delivery report
    first_poll_s: float = 0.0  # each tracked message's first status poll, after acceptance
    track_ttl_s: float = 0.0  # how long a tracked message's correlation is kept
    # > 0: each tracked message's final event is held (FinalState.HELD) until `announce` says its
    # `accepted` outcome is out, or this long after acceptance, whichever comes first.
    hold_s: float = 0.0
    # For `gateway trace`, kept for the dedupe window: each retried request's last attempt (a
    # `RetryNote`), and the recipient of each stored result (E.164), found again by number.
    retries: Mapping[str, RetryNote] = field(default_factory=dict)
    numbers: Mapping[str, str] = field(default_factory=dict)
    # Budget holds (`Budget`): `refund` gives the parts back (the provider refused the message, or
    # it surely was not sent), `spend` keeps them counted (accepted, or maybe sent) and ends the hold.
    refund: Sequence[str] = ()
    spend: Sequence[str] = ()

    def __bool__(self) -> bool:
        return bool(
            self.done or self.unknown or self.release or self.tracked or self.retries or self.refund or self.spend
        )


class RecordShortcuts:
    """One part of a `BatchRecord` at a time, through the store's `record`."""

    async def record(self, account: str, batch: BatchRecord) -> None:
        raise NotImplementedError

    async def complete(self, account: str, results: dict[str, StoredResult], ttl_s: float) -> None:
        await self.record(account, BatchRecord(done=results, ttl_s=ttl_s))

    async def mark_unknown(self, account: str, uids: list[str], ttl_s: float) -> None:
        await self.record(account, BatchRecord(unknown=uids, ttl_s=ttl_s))

    async def release(self, account: str, uids: list[str], owner: str) -> None:
        await self.record(account, BatchRecord(release=uids, owner=owner))

    async def track(self, account: str, records: Sequence[Tracked], first_poll_s: float, ttl_s: float) -> None:
        await self.record(account, BatchRecord(tracked=records, first_poll_s=first_poll_s, track_ttl_s=ttl_s))


@dataclass(frozen=True, slots=True)
class WebhookHint:
    """What `Store.hint` needs besides the ids: the webhook's report (kept while parked) and bounds."""

    report: str
    bind_ttl_s: float
    park_ttl_s: float
    park_max: int


class FinalState(StrEnum):
    """Who publishes a message's final delivery event (exactly one caller does)."""

    CLAIMED = "claimed"  # this caller: publish, then `end_final` (or `abandon_final` on failure)
    DONE = "done"  # published already
    BUSY = "busy"  # another caller holds the claim (its lease runs); it publishes
    HELD = "held"  # the message's `accepted` outcome is not known to be out yet: ask again later
    UNKNOWN = "unknown"  # no correlation (not recorded yet, or its window is over)


# A held message's final claim belongs to this holder (no caller's holder looks like it), its lease
# running to the end of the hold: a hold is a claim that no one publishes, given back by `announce`.
HOLDER = "~accepted-not-out"


# The account's slow-down after the provider throttles (Mobizon 30, HTTP 429). It is kept with the
# account's token bucket, so every replica sharing the store slows down together, and applied in the
# same atomic step as each grant: rate x factor, burst x factor (at least 1).
THROTTLE_MIN_FACTOR = 0.05  # never below 5 % of the configured rate
THROTTLE_COOLDOWN_S = 1.0  # throttle answers within this long after a cut are one event (one halving)
THROTTLE_RECOVERY_PER_S = 0.1  # the factor climbs back linearly: from 0.5 to 1.0 in 5 s

# Lanes share the account's bucket by rank (0 urgent, 1 normal, 2 bulk). A lane that asked for more
# tokens than it got marks its demand in the bucket until its next look is due plus this margin.
# While a higher lane's mark is live, a lower lane's grant comes from its own share bucket instead
# (rate x factor x min_share, burst likewise, at least 1), charged to the account's bucket even
# below zero: the lower lane keeps its share, the higher lanes get the rest, and no replica's lower
# lane can take the tokens another replica's higher lane waits for.
LANE_DEMAND_MARGIN_S = 0.25
NORMAL_RANK = 1
LOWEST_RANK = 2


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token request got: tokens now, seconds until one more, and the slow-down factor."""

    granted: int
    wait_s: float
    factor: float = 1.0


NOTHING = Grant(0, 0.0)


@dataclass(frozen=True, slots=True)
class Pause:
    """One replica's pause of an account's consumption, as `gateway accounts` shows it."""

    owner: str  # the replica; `<replica>/route` for the state of the account's route (core/routes.py)
    reason: str  # account_error | store_failed; a route's: paused | open | half_open | drained
    code: str | None  # the provider's code that paused it; a route's: why
    until: float  # epoch seconds
    since: float | None = None  # epoch seconds (a route's state)

    def to_json(self) -> str:
        doc: dict[str, Any] = {"r": self.reason, "c": self.code, "u": self.until}
        if self.since is not None:
            doc["s"] = self.since
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, owner: str, text: str) -> Pause:
        d = json.loads(text)
        return cls(owner, d["r"], d["c"], float(d["u"]), d.get("s"))


@dataclass(frozen=True, slots=True)
class AccountState:
    """What the store knows of an account right now: live pauses and the throttle factor."""

    pauses: tuple[Pause, ...]
    throttle_factor: float


class ClaimStore(Protocol):
    """Who sends each id, and what became of it: the send path's claims and records."""

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
        """Claim every id of a batch at once (see the module docstring), then take tokens from the
        account's bucket (as `acquire`, for the lane of `rank`) for the NEW claims, in one atomic
        step and one round trip. An `untokened` id takes none: another account sends it, at its rate.
        A `replay` id whose stored result is in `contract.REPLAYABLE` is claimed again (RECONCILE)
        in the same step, so of two replayed copies only one is sent.
        With a `budget`, an id that would be NEW is claimed only when its parts fit every counter
        it draws from (else QUOTA, not claimed, no token), and its parts are held; a RECONCILE id
        without a hold (its earlier claim had none) is counted without being refused: it may have
        been sent. The ids are taken in order, so the budget's last parts go to the earliest.
        NEW answers are then checked against the account's epoch (`distrust_new`); ids turned into
        RECONCILE keep the tokens taken for them. Nothing new: `NOTHING`, no tokens taken."""
        ...

    async def budget_use(self, account: str, counters: Sequence[BudgetCounter]) -> list[int]:
        """The parts counted so far against each counter (0 for one never drawn from)."""
        ...

    async def record(self, account: str, batch: BatchRecord) -> None:
        """Write a batch's results, unknown marks, releases and delivery tracking in one atomic step
        (one round trip): after a failure none of it is stored, and calling again is safe (a result
        is set again, a release deletes only our claims, a tracked message is left as it is)."""
        ...


class RateStore(Protocol):
    """Each account's token bucket and throttle factor, shared by every replica."""

    async def acquire(
        self, key: str, want: int, rate: float, burst: int, rank: int = NORMAL_RANK, min_share: float = 0.0
    ) -> Grant:
        """Token bucket shared by every process using this store, at the configured `rate` and
        `burst` scaled by the key's current throttle factor, for the lane of `rank`: while a lane
        of a lower rank waits, this one gets at most its `min_share` (LANE_DEMAND_MARGIN_S)."""
        ...

    async def throttle(self, key: str) -> float:
        """The provider throttled: halve the key's factor (once per `THROTTLE_COOLDOWN_S`, however
        many replicas report it) and empty the bucket down to the new burst. Returns the factor."""
        ...


class PauseStore(Protocol):
    """Account pauses, recorded for operators."""

    async def note_pause(self, account: str, pause: Pause) -> None:
        """Record a replica's pause until `pause.until` (for operators; consumption is not shared)."""
        ...

    async def account_state(self, account: str) -> AccountState:
        """The pauses still running and the account's throttle factor (1.0: not throttled)."""
        ...


class ReportStore(Protocol):
    """Delivery reports: correlations, final-event claims and holds, polls, webhook hints, epochs."""

    async def epoch_changed(self, account: str, *, look: bool = True) -> bool:
        """True once after this process saw the account's epoch change (the store lost its data
        meanwhile), in a claim or, with `look`, by looking at it now (creating it when missing, as a
        claim does). Without `look` no store call is made."""
        ...

    async def mark_final(self, account: str, message_ids: Sequence[str], ttl_s: float) -> None:
        """These messages had their final event (a rebuild after a store loss found it): never
        poll or publish them again, whether they are tracked or not."""
        ...

    async def begin_final(
        self, account: str, message_id: str, owner: str, lease_s: float
    ) -> tuple[FinalState, Tracked | None]:
        """Claim the right to publish a message's final event (the correlation comes with CLAIMED).
        HELD while the message was recorded with a hold that neither `announce` nor time ended."""
        ...

    async def announce(self, account: str, message_ids: Sequence[str]) -> None:
        """These messages' `accepted` outcomes are confirmed by the broker: end their holds, so
        their final events may go out (ids without a hold, or unknown, are left as they are)."""
        ...

    async def end_final(self, account: str, message_id: str, owner: str, status: str = "", status_at: str = "") -> None:
        """The final event is published: the message is done, never polled or published again.
        Its status and the provider's time of it are kept with the correlation (`gateway trace`)."""
        ...

    async def abandon_final(self, account: str, message_id: str, owner: str) -> None:
        """Publishing failed: give the claim back (a webhook retry or a poll finishes it)."""
        ...

    async def due_polls(self, account: str, limit: int, lease_s: float) -> list[Tracked]:
        """Messages whose status poll is due, oldest due first, at most `limit`; they are leased to
        the caller for `lease_s` (no other replica takes them meanwhile)."""
        ...

    async def due_accounts(self, accounts: Sequence[str]) -> set[str]:
        """Which of these accounts have a status poll due now, in one round trip, leasing nothing:
        the poll scheduler's look at idle accounts (dlr/desk.py: `PollScheduler`)."""
        ...

    async def poll_later(self, account: str, next_at: Mapping[str, float]) -> None:
        """Polled without a final status: count the poll and set each message's next poll time."""
        ...

    async def hint(self, account: str, event_id: str, message_id: str, hint: WebhookHint) -> tuple[str | None, str]:
        """A webhook's hint, in one atomic step: bind `event_id` to `message_id` for `hint.bind_ttl_s`
        unless it is bound already; then make the message's poll due now when it is tracked, or
        park the hint (at most `hint.park_max` per account, each for `hint.park_ttl_s`). Returns the
        message id the event was bound to before (None: new) and what was done: `poll_due`,
        `parked`, `full` (nothing parked: too many), or `refused` (bound to another message:
        nothing done)."""
        ...

    async def match_parked(self, account: str, limit: int) -> int:
        """Make the polls of up to `limit` parked hints whose message is tracked now due, and drop
        those hints (and expired ones); returns how many were matched."""
        ...

    async def oldest_open(self, account: str) -> float | None:
        """Acceptance time (epoch s) of the oldest tracked message without a final event."""
        ...


class TraceStore(Protocol):
    """Reads for `gateway trace`: nothing here is on the send path."""

    async def trail(self, account: str, unique_id: str) -> Trail:
        """The request's claim or result, its last retry note, and, when it was accepted, its
        delivery tracking."""

    async def by_number(self, account: str, number: str, limit: int = 50, window_s: float = 86400.0) -> list[str]:
        """The unique_ids with a stored result to this E.164 number within the last `window_s`
        (the account's dedupe window), newest first."""


OPTOUT_ALL = "*"  # the opt-out scope of every account (routing key `all` on sms.optout)


@dataclass(frozen=True, slots=True)
class OptOut:
    """A number that may not get the account's (or, in scope `OPTOUT_ALL`, any account's) normal
    and bulk messages: when, who said so and through what."""

    number: str  # E.164
    at: float  # epoch seconds: when the person opted out, as the source said
    via: str  # cli | bus | import
    source: str = ""  # the source's own words: `sms-reply`, `crm`, a file name
    by: str = ""  # who: the operator (CLI) or the producing application (bus: app_id / user_id)

    def to_json(self) -> str:
        return _COMPACT.encode({"at": self.at, "via": self.via, "source": self.source, "by": self.by})

    @classmethod
    def from_json(cls, number: str, text: str) -> OptOut:
        doc = json.loads(text)
        return cls(number, float(doc["at"]), str(doc["via"]), str(doc.get("source", "")), str(doc.get("by", "")))


class OptOutStore(Protocol):
    """The opt-out registry, per account and for all accounts (`OPTOUT_ALL`)."""

    async def opted_out(self, account: str, numbers: Collection[str]) -> set[str]:
        """Which of `numbers` opted out of the account or of all accounts: one round trip, however
        many numbers and entries."""
        ...

    async def optout_add(self, scope: str, entries: Sequence[OptOut]) -> int:
        """Add (or refresh) entries; returns how many numbers were new in the scope."""
        ...

    async def optout_remove(self, scope: str, numbers: Sequence[str]) -> int:
        """Remove numbers from the scope; returns how many were there."""
        ...

    async def optout_page(self, scope: str, cursor: str = "", limit: int = 1000) -> tuple[list[OptOut], str | None]:
        """About `limit` entries of the scope from `cursor` ("" first), and the cursor of the next
        page (None after the last): list and export walk the registry with it."""
        ...

    async def optout_count(self, scope: str) -> int: ...


class SendStore(ClaimStore, RateStore, OptOutStore, Protocol):
    """What the pipeline of one account needs: claims, tokens and the opt-out registry."""


class Store(ClaimStore, RateStore, OptOutStore, PauseStore, ReportStore, TraceStore, Protocol):
    """Everything, as both backends implement it (Redis and SQLite); components take the part they use."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
