"""Delivery reports: every accepted SMS ends as exactly one `delivered` or `undelivered` event.

    pipeline (accepted, with a provider message id) --record--> Store: result + correlation + first
                                                                poll time, in one atomic step
    webhook  POST /dlr/<provider>/<account> --> Desk.webhook (the provider's WebhookFormat reads it):
                                                the message's poll is due now
    Poller (per account, every replica): due ids --statuses()--> Desk.report
                                                                 begin_final (one caller wins)
                                                                 -> publish on sms.outcomes
                                                                    <status>.<account>, confirmed
                                                                 -> end_final (retried until stored)

- No final event before its `accepted`: a message is recorded with its final event held; the
  worker ends the hold (`Store.announce`) once the broker confirmed the `accepted` outcome, by the
  first copy or by the redelivered one that repeats it after a lost publish. A report for a held
  message publishes nothing and its poll comes again soon. A hold that no announcement ends (the
  store was away at that moment) runs out `pipeline.ANNOUNCE_HOLD_S` after acceptance.
- Exactly one final event: the store lets one caller claim a message's final event at a time;
  it publishes (broker confirm), then marks the message final, trying the mark again until the
  store answers (a store that pauses after the confirm must not let the claim's lease run out
  into a second publish). A poll that comes later finds it final and publishes nothing. A publish
  that fails keeps the claim: its confirm may be what was lost (the connection closed after the
  broker routed it), so the desk asks the broker, reading the `sms.tracking` stream (every event
  is routed there too) from the moment of the publish, and publishes again only when the event is
  not there. A crash between the confirm and the mark, or a broker that cannot be asked for most
  of the claim's lease, leaves a claim whose lease ends, and the message's next poll publishes it
  again (the ways to see a final event twice).
- A webhook is a hint, never a report: Mobizon signs only `eventId|attempt|eventCreateTs`, so the
  message id and status it names are not the provider's word. A webhook whose signature holds
  (for an account with a webhook secret), whose `eventCreateTs` is fresh, and whose `eventId`
  names the message it named the first time, makes that message's status poll due now; the poll
  (the provider's own answer) decides the event. So a forged or rewritten webhook can at most make
  the gateway ask the provider about a message sooner. A rewritten payload with a known `eventId`
  is refused (409) and logged.
- A webhook for a message not recorded yet (the provider answered the webhook faster than the
  gateway recorded the send) is parked in the store and answered 2xx; the desk makes its poll due
  once the correlation exists.
- Polling is SerwerSMS's source of truth (its push format is undocumented) and Mobizon's safety
  net: a message is first polled `dlr_poll_after_s` after acceptance, then at doubling gaps up to
  `dlr_poll_max_gap_s`, in batches (`max_status_ids`), each batch leased to one replica and paid
  for with one rate-limit token of the account. A message without a final status when
  `dlr_window_s` ends becomes `undelivered` with reason `unknown`.
- A webhook is answered 2xx only once its poll is due or it is parked; 503 when the store cannot
  take it, when too many are parked, or (parked all the same) while the account's tracking is being
  rebuilt after a store loss (tracking.py): Mobizon retries. 403 for a bad `sign` or a stale
  `eventCreateTs`, 409 for a rewritten event, 404 for an unknown account, 400 for a malformed or
  oversized body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from gateway import contract as c
from gateway.clock import SYSTEM, Clock
from gateway.config import Account, DlrOptions
from gateway.errors import BadWebhook, LookupFailed
from gateway.numbers import country_of, mask
from gateway.obs import metrics as m
from gateway.obs.logs import get_logger
from gateway.providers import PROVIDERS
from gateway.providers.base import ProviderAdapter, StatusReport, WebhookEvent
from gateway.state import RateStore, ReportStore
from gateway.state.base import FinalState, Tracked, WebhookHint

log = get_logger("gateway.dlr.desk")

# A claim on a final event outlives a publish and a store outage of most of a minute during its mark
# (tried again meanwhile); another caller may publish the event again only after it, which is what a
# crash between the confirm and the mark costs: a repeat, and this long before it.
FINAL_LEASE_S = 60.0
MARK_RETRY_FIRST_S = 0.5  # a final mark that failed is tried again after this, doubling up to the max
MARK_RETRY_MAX_S = 5.0
UNSURE_RETRY_FIRST_S = 2.0  # a publish without a confirm is looked up after this (what the closed connection
# had routed has reached the stream by then), doubling up to the max
UNSURE_RETRY_MAX_S = 5.0
UNSURE_SECOND_LOOK_S = (
    3.0  # an event not in the stream is looked for once more after this, before it is published again
)
UNSURE_READ_TIMEOUT_S = 10.0  # one read of the tracking stream for it; past this it is tried again
SWEEP_S = 0.5  # parked webhooks of the accounts this replica parked some for are matched this often
FULL_SWEEP_S = 60.0  # every account's, in turn within this (hints other replicas parked: a replica that died)
SWEEP_LIMIT = 500  # parked webhooks looked at per account and sweep
# A webhook for a message not recorded yet waits this long for its record (a record comes within
# seconds of the send; a poll finds the message's status anyway), at most PARK_MAX per account:
# a flood of webhooks for unknown messages neither grows the store nor the sweep's work unbounded.
PARK_TTL_S = 3600.0
PARK_MAX = 10_000
LAG_EVERY_S = 5.0  # the poll-lag gauge is refreshed this often, for up to LAG_ACCOUNTS accounts in turn
LAG_ACCOUNTS = 50
EPOCH_EVERY_S = 30.0  # each account's store epoch is looked at in turn within this (a loss starts a rebuild)
# An account with traffic (messages just tracked, a webhook, a poll that found messages due) polls
# every HOT_POLL_S; every other account is looked at with one store query for all of them every
# LOOK_EVERY_S, and polls when it has a poll due (PollScheduler). At most POLL_CONCURRENCY accounts
# poll at once.
HOT_POLL_S = 1.0
LOOK_EVERY_S = 2.0
POLL_CONCURRENCY = 64
# A final report held back (its `accepted` is not out yet) is asked for again after this, doubling
# with each poll up to the max: a hold ends within moments of the outcome's confirm, or at its time.
HELD_AGAIN_S = 2.0
HELD_AGAIN_MAX_S = 60.0
WEBHOOK_DEADLINE_S = 4.0  # a webhook's answer is due within 5 s (Mobizon's wait)
# `eventCreateTs` is in an undocumented time zone and Mobizon retries for about an hour: an event
# further than this from now (either way) is a replay, not a retry.
WEBHOOK_FRESH_S = 26 * 3600.0


class EventSink(Protocol):
    """Where final events go (the Publisher)."""

    async def outcome(
        self,
        *,
        account: str,
        status: str,
        body: bytes,
        unique_id: str | None,
        reply_to: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None: ...


def held_gap(polls: int) -> float:
    """The wait before asking again about a message whose final report was held back."""
    return float(min(HELD_AGAIN_S * 2 ** min(polls, 8), HELD_AGAIN_MAX_S))


def poll_gap(dlr: DlrOptions, polls: int) -> float:
    """The wait after the `polls`-th poll of a message: doubling from `dlr_poll_after_s`."""
    return float(min(dlr.poll_after_s * 2 ** min(polls, 30), dlr.poll_max_gap_s))


class PollerStore(ReportStore, RateStore, Protocol):
    """A poller's store: the due messages, and one token of the account's rate per poll."""


class DueStore(Protocol):
    async def due_accounts(self, accounts: Sequence[str]) -> set[str]: ...


class Desk:
    """Turns final reports into final events, exactly once per message."""

    def __init__(
        self,
        *,
        store: ReportStore,
        sink: EventSink,
        accounts: Sequence[Account],
        owner: str,
        clock: Clock = SYSTEM,
        rebuild: Callable[[str], Awaitable[object]] | None = None,
        published: Callable[[str, list[str], float], Awaitable[set[str]]] | None = None,
        health: Callable[[str, str | None, bool], None] | None = None,
    ) -> None:
        """`rebuild(account)` writes the account's delivery tracking back after the store lost it
        (tracking.rebuild); the desk calls it when it sees the account's store epoch change.
        `published(account, message_ids, since)` says which events the broker routed since then
        (tracking.events_published); without it a failed publish gives its claim back.
        `health(via, country, undelivered)` hears of each final event (core/routes.py: a route's
        delivery health)."""
        self._store = store
        self._sink = sink
        self._accounts = {a.name: a for a in accounts}
        self._owner = owner
        self._clock = clock
        self._marks: set[asyncio.Task[None]] = set()  # final marks tried again in the background
        self._rebuild = rebuild
        self._published = published
        self._rebuilding: dict[str, asyncio.Task[None]] = {}
        self._health = health
        self._parked: dict[str, float] = {}  # account -> until when this replica may have hints parked
        self._lag_turn = 0  # where measure_lag goes on
        self._turns: dict[str, tuple[int, float]] = {}  # each round over the accounts: where, and its credit
        self.wakers: dict[str, Callable[[], None]] = {}  # account -> its poller's wake (Poller.wake)
        # The accounts whose requests may go through each account (their routes): a webhook of a
        # message one of them sent that way is tracked under that one.
        self._homes: dict[str, list[str]] = {a.name: [] for a in accounts}
        for home in accounts:
            for way in home.routes_to[1:]:
                self._homes.setdefault(way, []).append(home.name)

    # -- one report -----------------------------------------------------------------------------------

    async def report(self, account: str, report: StatusReport, source: str) -> FinalState | None:
        """Publish the final event a final report owes, and say what became of it: CLAIMED when
        this call published it; DONE or BUSY when another did or does; HELD when the message's
        `accepted` outcome is not known to be out yet (nothing is published: report it again
        later); UNKNOWN when its correlation is unknown (not recorded, or its window is over).
        None for a report that is not final (it owes nothing)."""
        if report.final is None:
            m.DLR_REPORTS.labels(account, source, "not_final").inc()
            return None
        # Each claim has its own holder: two reports of one message in this process (a webhook and
        # its duplicate, or a poll) must not both win.
        holder = f"{self._owner}:{secrets.token_hex(6)}"
        message_id = report.provider_message_id
        state, tracked = await self._store.begin_final(account, message_id, holder, FINAL_LEASE_S)
        if state is FinalState.UNKNOWN:
            return state
        if state is FinalState.HELD:
            m.DLR_REPORTS.labels(account, source, "held").inc()
            return state
        if state is not FinalState.CLAIMED or tracked is None:
            m.DLR_REPORTS.labels(account, source, "already_final").inc()
            return state
        attempted = self._clock.time()
        try:
            await self._publish(account, tracked, report)
        except Exception as exc:
            if self._published is None:
                await asyncio.shield(self._store.abandon_final(account, message_id, holder))
                raise
            # The claim stays ours: whether the event went out is the broker's to say.
            log.warning("dlr_publish_unsure", account=account, provider_message_id=message_id, error=type(exc).__name__)
            task = asyncio.create_task(self._settle_unsure(account, holder, tracked, report, attempted))
            self._marks.add(task)
            task.add_done_callback(self._marks.discard)
            return FinalState.BUSY
        except BaseException:
            await asyncio.shield(self._store.abandon_final(account, message_id, holder))
            raise
        m.DLR_REPORTS.labels(account, source, "published").inc()
        await self._mark(account, message_id, holder, report)
        return FinalState.CLAIMED

    async def _settle_unsure(
        self, account: str, holder: str, tracked: Tracked, report: StatusReport, attempted: float
    ) -> None:
        """A publish whose confirm never came: look for the event in the tracking stream, and
        publish it again only when two reads, `UNSURE_SECOND_LOOK_S` apart, did not find it (what
        the closed connection had routed can reach the stream late on a loaded broker), while the
        claim is ours (most of its lease); then mark it final. Past that, the claim is given back
        and the next poll publishes."""
        assert self._published is not None
        message_id = report.provider_message_id
        deadline = self._clock.monotonic() + FINAL_LEASE_S * 0.75
        delay = UNSURE_RETRY_FIRST_S
        absent_once = False
        while True:
            await self._clock.sleep(delay)
            try:
                async with asyncio.timeout(UNSURE_READ_TIMEOUT_S):
                    found = message_id in await self._published(account, [message_id], attempted)
                if found:
                    log.info("dlr_publish_found", account=account, provider_message_id=message_id)
                elif not absent_once:
                    absent_once, delay = True, UNSURE_SECOND_LOOK_S
                    continue
                else:
                    await self._publish(account, tracked, report)
                    m.DLR_REPORTS.labels(account, "unsure", "published").inc()
            except Exception as exc:  # noqa: BLE001 - the broker is still away: look again, or give it back
                if self._clock.monotonic() + delay > deadline:
                    log.warning(
                        "dlr_publish_given_back",
                        account=account,
                        provider_message_id=message_id,
                        error=type(exc).__name__,
                    )
                    with contextlib.suppress(Exception):
                        await self._store.abandon_final(account, message_id, holder)
                    return
                delay = min(delay * 2, UNSURE_RETRY_MAX_S)
                continue
            await self._mark(account, message_id, holder, report)
            return

    async def _mark(self, account: str, message_id: str, holder: str, report: StatusReport) -> None:
        """Mark a published event final; tried again in the background while the store is away."""
        assert report.final is not None
        final = (str(report.final), c.rfc3339(report.at or self._clock.now()))
        try:
            await self._store.end_final(account, message_id, holder, *final)
        except BaseException as exc:
            # Published: the mark must land, or the lease ends and the event goes out again.
            log.warning("dlr_mark_failed", account=account, provider_message_id=message_id, error=type(exc).__name__)
            task = asyncio.create_task(self._mark_until_stored(account, message_id, holder, final))
            self._marks.add(task)
            task.add_done_callback(self._marks.discard)
            if not isinstance(exc, Exception):
                raise

    async def _mark_until_stored(self, account: str, message_id: str, holder: str, final: tuple[str, str]) -> None:
        delay = MARK_RETRY_FIRST_S
        while True:
            await self._clock.sleep(delay)
            try:
                await self._store.end_final(account, message_id, holder, *final)
            except Exception:  # noqa: BLE001 - the store is still away
                delay = min(delay * 2, MARK_RETRY_MAX_S)
            else:
                log.info("dlr_marked_late", account=account, provider_message_id=message_id)
                return

    async def finish_marks(self, timeout_s: float) -> int:
        """At shutdown: stop any rebuild (the next process's loss check does not see it: see the
        docs/delivery-reports.md), and wait up to `timeout_s` for final marks still being tried; returns how many were
        left (their events may be published again after the lease)."""
        for task in self._rebuilding.values():
            task.cancel()
        await asyncio.gather(*self._rebuilding.values(), return_exceptions=True)
        if not self._marks:
            return 0
        _done, late = await asyncio.wait(set(self._marks), timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("dlr_marks_left", count=len(late))
        return len(late)

    async def _publish(self, account: str, t: Tracked, report: StatusReport) -> None:
        assert report.final is not None
        status = report.final
        error = None
        if status is c.Status.UNDELIVERED:
            why = report.reason or report.status
            error = c.OutcomeError(why, "Undelivered", f"the provider reports {report.status}", False)
        body = c.outcome_body(
            unique_id=t.unique_id,
            account=account,
            to=t.to,
            status=status,
            provider=t.provider,
            provider_message_id=t.provider_message_id,
            error=error,
            provider_status=report.status,
            meta=t.meta,
            at=self._clock.now(),
            status_at=report.at or self._clock.now(),
            reason=report.reason,
            via=t.via or account,
        )
        await self._sink.outcome(account=account, status=str(status), body=body, unique_id=t.unique_id)
        m.DLR_EVENTS.labels(account, str(status)).inc()
        if self._health is not None:
            self._health(t.via or account, country_of(t.to) if t.to else None, status is c.Status.UNDELIVERED)
        log.info(
            "sms_report",
            account=account,
            unique_id=t.unique_id,
            to=mask(t.to),
            status=str(status),
            provider_status=report.status,
            reason=report.reason,
            provider_message_id=t.provider_message_id,
        )

    # -- webhooks -----------------------------------------------------------------------------------

    async def webhook(self, provider: str, account_name: str, body: bytes | None, content_type: str) -> tuple[int, str]:
        """Handle one webhook request (`body` None: larger than the limit): (HTTP status, reason)."""
        provider = provider if provider in PROVIDERS else "(unknown)"  # a bounded label
        account = self._accounts.get(account_name)
        found = PROVIDERS.get(provider)
        hooks = found.webhooks if found is not None else None
        if hooks is None or account is None or account.provider != provider:
            return _rejected(provider, 404, "unknown_account")
        if body is None:
            return _rejected(provider, 400, "oversized")
        try:
            event = hooks.parse(body, content_type)
        except BadWebhook as exc:
            return _rejected(provider, 400, "malformed", exc)
        secret = account.webhook_secret
        if secret is not None and not hooks.verify(event, secret.get_secret_value()):
            return _rejected(provider, 403, "bad_signature")
        if event.report is None:
            m.DLR_REPORTS.labels(account.name, "webhook", "other_event").inc()
            return 200, "ignored"
        created = hooks.created_at(event)
        if created is not None and abs(self._clock.time() - created) > WEBHOOK_FRESH_S:
            return _rejected(provider, 403, "stale")
        try:
            async with asyncio.timeout(WEBHOOK_DEADLINE_S):  # no task of its own, as wait_for would make
                return await self._webhook_report(provider, account.name, event)
        except Exception as exc:  # noqa: BLE001 - the store is away: the provider retries
            log.warning("dlr_webhook_unavailable", account=account.name, error=type(exc).__name__)
            return _rejected(provider, 503, "unavailable")

    async def _webhook_report(self, provider: str, account: str, event: WebhookEvent) -> tuple[int, str]:
        assert event.report is not None
        message_id = event.report.provider_message_id
        hint = WebhookHint(_park(event.report), 2 * WEBHOOK_FRESH_S, PARK_TTL_S, PARK_MAX)
        # A retry of an event seen before makes the poll due again: its first try may have been
        # answered 503 after the binding.
        bound, action = await self._store.hint(account, event.event_id, message_id, hint)
        for home in self._homes.get(account, ()) if action == "parked" else ():
            # Not this account's own: a message another account's route sent through it.
            found, took = await self._store.hint(home, event.event_id, message_id, hint)
            if took != "parked":
                bound, action, account = found, took, home
                break
        if action == "refused":
            log.warning(
                "dlr_webhook_refused",
                account=account,
                reason="event_rewritten",
                event_id=event.event_id,
                provider_message_id=message_id[:64],
                bound_to=bound,
            )
            return _rejected(provider, 409, "event_rewritten")
        if action == "full":  # too many hints for unknown messages: the provider retries later
            return _rejected(provider, 503, "parked_full")
        if action == "parked":
            self._parked[account] = self._clock.monotonic() + PARK_TTL_S
        if action == "parked" and account in self._rebuilding:
            # The store lost its tracking and it is being rebuilt: the hint is parked all the same,
            # and the provider is asked to come again rather than told the report was taken.
            return _rejected(provider, 503, "rebuilding")
        result = "duplicate" if bound is not None else action
        m.DLR_REPORTS.labels(account, "webhook", result).inc()
        wake = self.wakers.get(account)
        if wake is not None and action != "parked":
            wake()
        return 200, "duplicate" if bound is not None else "ok"

    # -- parked reports and the lag gauge -------------------------------------------------------------

    async def sweep(self, *, also: Sequence[str] = ()) -> int:
        """Make the polls of parked webhooks due once their correlation exists (one store call per
        account): of the accounts this replica parked hints for, and `also` these (the full sweep's
        turn); returns how many. An idle account costs no store call here but in its turn."""
        now = self._clock.monotonic()
        self._parked = {name: until for name, until in self._parked.items() if until > now}
        matched = 0
        for name in dict.fromkeys([*self._parked, *also]):
            matched += await self._store.match_parked(name, SWEEP_LIMIT)
        return matched

    async def watch_epochs(self, *, looking: Collection[str] = ()) -> None:
        """Start a rebuild for each account whose store epoch changed (one at a time per account):
        seen by a claim, or, for the accounts `looking`, by looking at its epoch (a store call each)."""
        if self._rebuild is None:
            return
        looking = set(looking)
        for name in self._accounts:
            if await self._store.epoch_changed(name, look=name in looking) and name not in self._rebuilding:
                task = asyncio.create_task(self._rebuild_account(name), name=f"rebuild tracking {name}")
                self._rebuilding[name] = task

    async def _rebuild_account(self, name: str) -> None:
        assert self._rebuild is not None
        try:
            await self._rebuild(name)
        except Exception as exc:
            log.exception("tracking_rebuild_failed", account=name, error=type(exc).__name__)
        finally:
            self._rebuilding.pop(name, None)

    async def measure_lag(self) -> None:
        """The poll-lag gauge of up to `LAG_ACCOUNTS` accounts, the next ones each time."""
        now = self._clock.time()
        names = list(self._accounts)
        turn = [names[(self._lag_turn + k) % len(names)] for k in range(min(LAG_ACCOUNTS, len(names)))]
        self._lag_turn = (self._lag_turn + len(turn)) % max(1, len(names))
        for name in turn:
            oldest = await self._store.oldest_open(name)
            m.DLR_POLL_LAG.labels(name).set(0.0 if oldest is None else max(0.0, now - oldest))

    def _turn(self, which: str, every_s: float) -> list[str]:
        """The next accounts of a round that reaches every account once per `every_s`, a share
        each `SWEEP_S` tick: a thousand accounts' store calls spread over the round, not a burst
        that queues a drain's store calls behind it."""
        names = list(self._accounts)
        if not names:
            return []
        start, credit = self._turns.get(which, (0, 0.0))
        credit += len(names) * SWEEP_S / every_s  # one account in 60 ticks, with 1 account and 30 s
        share = min(len(names), math.floor(credit))
        self._turns[which] = ((start + share) % len(names), credit - share)
        return [names[(start + k) % len(names)] for k in range(share)]

    async def run(self) -> None:
        """Sweep parked webhooks, watch the store epochs and refresh the lag gauge until cancelled.
        Every account's epoch is looked at once at the start, then in turn within `EPOCH_EVERY_S`;
        every account's parked hints are swept in turn within `FULL_SWEEP_S`."""
        last_lag = -LAG_EVERY_S
        first = True
        while True:
            try:
                await self.sweep(also=self._turn("sweep", FULL_SWEEP_S))
                looking = list(self._accounts) if first else self._turn("epoch", EPOCH_EVERY_S)
                await self.watch_epochs(looking=looking)
                first = False
                if self._clock.monotonic() - last_lag >= LAG_EVERY_S:
                    last_lag = self._clock.monotonic()
                    await self.measure_lag()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store or broker is away: the next round retries
                log.warning("dlr_sweep_failed", error=type(exc).__name__)
            raise_if_cancelled()
            await self._clock.sleep(SWEEP_S)


class Poller:
    """Polls one account's accepted messages whose status poll is due."""

    def __init__(
        self,
        *,
        desk: Desk,
        account: Account,
        adapter: ProviderAdapter,
        store: PollerStore,
        dlr: DlrOptions,
        clock: Clock = SYSTEM,
        ways: Mapping[str, tuple[Account, ProviderAdapter]] | None = None,
    ) -> None:
        """`ways`: the other accounts (by name) whose messages this account's tracking may hold."""
        self._desk = desk
        self._account = account
        self._adapter = adapter
        self._ways = {**(ways or {}), account.name: (account, adapter)}
        self.scheduler: PollScheduler | None = None  # set by the scheduler that runs its rounds
        desk.wakers[account.name] = self.wake
        self._store = store
        self._dlr = dlr
        self._clock = clock
        self._lease_s = max(30.0, 3 * account.http_timeout_s)

    async def poll_once(self) -> int:
        """One round: take the due messages (leased to this replica), ask the provider, publish the
        final ones, schedule the rest. Returns how many messages were looked at."""
        name = self._account.name
        due = await self._store.due_polls(name, self._adapter.max_status_ids, self._lease_s)
        if not due:
            return 0
        now = self._clock.time()
        window = self._dlr.window_s
        later: dict[str, float] = {}
        ended = [t for t in due if t.accepted_at + window <= now]
        for t in ended:
            gone = StatusReport(t.provider_message_id, "unknown", c.Status.UNDELIVERED, "unknown")
            if await self._desk.report(name, gone, "window") is FinalState.HELD:
                later[t.provider_message_id] = now + held_gap(t.polls)
        asking = [t for t in due if t.accepted_at + window > now]
        # A message another account sent (its route, or a failover) is polled through that account.
        by_way: dict[str, list[Tracked]] = {}
        for t in asking:
            by_way.setdefault(t.via if t.via is not None and t.via in self._ways else name, []).append(t)
        groups = [
            (via, ts[k : k + self._ways[via][1].max_status_ids])
            for via, ts in by_way.items()
            for k in range(0, len(ts), self._ways[via][1].max_status_ids)
        ]
        for via, group in groups:
            account, adapter = self._ways[via]
            await self._take_token(account)
            m.DLR_POLLS.labels(name).inc()
            try:
                reports = {
                    r.provider_message_id: r for r in await adapter.statuses([t.provider_message_id for t in group])
                }
            except LookupFailed as exc:
                log.warning("dlr_poll_failed", account=name, via=via, count=len(group), error=str(exc)[:200])
                reports = {}
            for t in group:
                report = reports.get(t.provider_message_id)
                if report is not None and report.final is not None:
                    if await self._desk.report(name, report, "poll") is FinalState.HELD:
                        later[t.provider_message_id] = now + held_gap(t.polls)
                else:
                    gap = poll_gap(self._dlr, t.polls + 1)
                    later[t.provider_message_id] = min(now + gap, t.accepted_at + window)
        await self._store.poll_later(name, later)
        return len(due)

    async def _take_token(self, a: Account) -> None:
        """A poll is one provider call: it waits for one token of the polled account's rate budget."""
        while True:
            grant = await self._store.acquire(a.name, 1, a.rate_per_s, a.burst)
            if grant.granted:
                return
            await self._clock.sleep(max(grant.wait_s, 0.01))

    @property
    def name(self) -> str:
        return self._account.name

    def wake(self) -> None:
        """Look for due polls at the next tick (a webhook made one due, or a batch tracked new
        messages), and poll every second again while they come."""
        if self.scheduler is not None:
            self.scheduler.wake(self._account.name)

    async def round(self) -> bool:
        """Poll while full batches are due. True when any message was looked at."""
        looked = False
        while True:
            try:
                polled = await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the leases run out and the next round takes them again
                log.warning("dlr_poll_round_failed", account=self._account.name, error=type(exc).__name__)
                return looked
            raise_if_cancelled()
            looked = looked or polled > 0
            if polled < self._adapter.max_status_ids:
                return looked


class PollScheduler:
    """One task for every account's delivery-report polls, so what an idle account costs does not
    grow with the accounts configured. An account with traffic (woken, or its last round found
    messages due) polls every `HOT_POLL_S`; the others are looked at together every
    `LOOK_EVERY_S`, with one store query (`due_accounts`) that leases nothing, and poll once it
    finds a poll due. Each account has at most one round running; `POLL_CONCURRENCY` at once."""

    def __init__(
        self,
        pollers: Sequence[Poller],
        store: DueStore,
        *,
        clock: Clock = SYSTEM,
        look_every_s: float = LOOK_EVERY_S,
        concurrency: int = POLL_CONCURRENCY,
    ) -> None:
        self._pollers = {p.name: p for p in pollers}
        for poller in pollers:
            poller.scheduler = self
        self._store = store
        self._clock = clock
        self._look_every_s = look_every_s
        self._gate = asyncio.Semaphore(concurrency)
        self._hot: dict[str, float] = {}  # account -> when (monotonic) its next round is due
        self._woken: set[str] = set()
        self._running: dict[str, asyncio.Task[None]] = {}

    def wake(self, account: str) -> None:
        self._woken.add(account)

    def due_now(self) -> set[str]:
        now = self._clock.monotonic()
        return {n for n in self._woken if n in self._pollers} | {n for n, at in self._hot.items() if at <= now}

    async def run(self) -> None:
        last_look = -self._look_every_s
        try:
            while True:
                due = self.due_now()
                if self._clock.monotonic() - last_look >= self._look_every_s:
                    last_look = self._clock.monotonic()
                    due |= await self._look()
                for name in due:
                    if name not in self._running:
                        woken = name in self._woken
                        self._woken.discard(name)
                        self._hot.pop(name, None)
                        self._running[name] = asyncio.create_task(
                            self._round(name, woken, self._clock.monotonic()), name=f"dlr poll {name}"
                        )
                raise_if_cancelled()
                await self._clock.sleep(HOT_POLL_S)
        finally:
            rounds = list(self._running.values())
            for task in rounds:
                task.cancel()
            if rounds:
                await asyncio.wait(rounds, timeout=5)

    async def _look(self) -> set[str]:
        idle = [n for n in self._pollers if n not in self._hot and n not in self._running]
        if not idle:
            return set()
        try:
            return await self._store.due_accounts(idle)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store is away: the next look asks again
            log.warning("dlr_poll_look_failed", accounts=len(idle), error=type(exc).__name__)
            return set()

    async def _round(self, name: str, woken: bool, started: float) -> None:
        try:
            async with self._gate:
                looked = await self._pollers[name].round()
            if looked or woken:
                # From when the round started: the next tick finds it due, a second on.
                self._hot[name] = started + HOT_POLL_S
        finally:
            self._running.pop(name, None)


def raise_if_cancelled() -> None:
    """End a loop whose task was asked to stop even though no CancelledError reached it: a library
    can swallow the one a cancel throws (anyio, under httpx's connect, does when its own Happy
    Eyeballs cancellation lands in the same loop turn), and the loop would then run on for good,
    holding the shutdown that waits for it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


REJECT_LOG_EVERY_S = 1.0  # a refused webhook is one line per reason per second at most, with a count
_reject_log: dict[str, tuple[float, int]] = {}  # reason -> (time of the last line, refusals since)


def _rejected(provider: str, status: int, reason: str, exc: Exception | None = None) -> tuple[int, str]:
    m.DLR_REJECTED.labels(provider, reason).inc()
    last, count = _reject_log.get(reason, (-REJECT_LOG_EVERY_S, 0))
    now = time.monotonic()
    if now - last < REJECT_LOG_EVERY_S:
        _reject_log[reason] = (last, count + 1)
        return status, reason
    _reject_log[reason] = (now, 0)
    log.info(
        "dlr_webhook_rejected",
        provider=provider,
        status=status,
        reason=reason,
        detail=str(exc or "")[:200],
        also_since_last_line=count,
    )
    return status, reason


def _park(report: StatusReport) -> str:
    at = report.at.isoformat() if report.at is not None else None
    return json.dumps({"s": report.status, "f": report.final, "r": report.reason, "at": at})
