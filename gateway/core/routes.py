"""Which configured account sends a request, without I/O: routes by the recipient's country, the
ordered failover list, and the state of each sending account's route in this process.

    request of account A to country X
      -> candidates: A.route_by_country[X] (or [*], else A), then A.failover_to, in order
      -> the first whose route is usable: not paused (an account error), circuit not open, X not
         drained (delivery health); none usable: the first, as if there were no failover

A route's circuit (one per sending account and process):

    closed --`failures` calls in a row fail in transport, 5xx or timeout,
             or over `error_rate` of the window's calls fail retryably--> open (since, why)
    open   --`open_s` later, one call may go--> half-open --it succeeds--> closed (failback)
                                                          --it fails----> open again

Moving a request is the pipeline's to decide, and only for one no provider may hold (never sent,
refused before acceptance, reconciled as absent): a route's state says where the next request
goes, never that an earlier attempt did not arrive.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.clock import SYSTEM, Clock
from gateway.config import Account, FailoverOptions
from gateway.obs import metrics as m
from gateway.obs.logs import get_logger
from gateway.providers.base import Action, ItemResult, Verdict

log = get_logger("gateway.core.routes")


class Circuit(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class MoveReason(StrEnum):
    """Why a request went through another account than its first candidate (sms_failovers_total)."""

    PAUSED = "paused"  # the first answered an account error (credentials, blocked, quota)
    OPEN = "open"  # its circuit is open
    DRAINED = "drained"  # the country is drained from it (undelivered share)
    UNSENT = "unsent"  # it refused or could not take this very request, provably unsent


def call_failed(results: Sequence[ItemResult]) -> bool:
    """A provider call that says the provider itself is struggling: every item failed retryably
    (transport, 5xx, a timeout, a bad answer). A throttle or one item's own code says nothing of it."""
    if not results:
        return False
    return all(
        r.verdict in (Verdict.RETRY, Verdict.AMBIGUOUS)
        and r.error is not None
        and r.error.action in (Action.RETRYABLE, Action.AMBIGUOUS)
        for r in results
    )


def provably_unsent(result: ItemResult) -> bool:
    """The provider surely did not take it, and not because it asks us to slow down (a throttle is
    retried on the same account): it may go through another account at once."""
    error = result.error
    if result.verdict is Verdict.RETRY:
        return error is None or error.action not in (Action.THROTTLE, Action.SPLIT)
    return result.verdict is Verdict.REJECTED and error is not None and error.action is Action.ACCOUNT


def _retryable(result: ItemResult) -> bool:
    error = result.error
    return result.verdict in (Verdict.RETRY, Verdict.AMBIGUOUS) and (
        error is None or error.action is not Action.THROTTLE
    )


@dataclass(slots=True)
class _Drain:
    until: float  # monotonic
    share: float


@dataclass(slots=True)
class Route:
    """One sending account's state in this process."""

    name: str
    circuit: Circuit = Circuit.CLOSED
    since: float = 0.0  # epoch seconds of the last change
    why: str = ""
    opened_at: float = 0.0  # monotonic, while open
    probing: bool = False  # half-open: the one probe call is out
    in_a_row: int = 0  # calls failed in a row
    calls: deque[tuple[float, bool]] = field(default_factory=deque)  # (monotonic, failed) in the window
    paused_until: float = 0.0  # monotonic
    pause_code: str | None = None
    drained: dict[str, _Drain] = field(default_factory=dict)  # country -> drain
    reports: dict[str, deque[tuple[float, bool]]] = field(default_factory=dict)  # country -> (monotonic, undelivered)

    def describe(self, now: float, mono: float) -> dict[str, object]:
        """What `gateway accounts` and the status endpoint show of it."""
        doc: dict[str, object] = {"state": str(self.circuit), "since": round(self.since, 3), "why": self.why}
        if self.paused_until > mono:
            doc["paused_for_s"] = round(self.paused_until - mono, 1)
            doc["pause_code"] = self.pause_code
        drained = {c: round(d.share, 3) for c, d in self.drained.items() if d.until > mono}
        if drained:
            doc["drained"] = drained
        return doc


class Routes:
    """The routes of every configured account in this process, shared by all their lanes."""

    def __init__(
        self, accounts: Iterable[Account], options: FailoverOptions, *, pause_s: float, clock: Clock = SYSTEM
    ) -> None:
        """`pause_s`: how long an account error takes a route out (the account pause)."""
        self.accounts = {a.name: a for a in accounts}
        self.options = options
        self.pause_s = pause_s
        self._clock = clock
        self.routes = {name: Route(name, since=clock.time()) for name in self.accounts}
        self._changed: set[str] = set()  # routes whose state operators have not been told of
        for name in self.routes:
            self._gauge(name)

    # -- choosing ---------------------------------------------------------------------------------------

    def candidates(self, home: Account, country: str | None) -> list[str]:
        """Who may send a request of `home` to `country`, in order."""
        return list(dict.fromkeys((home.route_for(country), *home.failover_to)))

    def choose(self, home: Account, country: str | None, tried: Sequence[str] = ()) -> tuple[str, MoveReason | None]:
        """The account that sends it now, and why it is not the first candidate (None: it is).
        `tried`: accounts this batch already had refuse it (provably unsent); they are skipped.
        "" when none may take it now: every candidate was tried, or the first is paused by an
        account error and no other is usable. Otherwise, with none usable, the first (a route that
        is open or drained is still the only way out, as without failover)."""
        names = self.candidates(home, country)
        first = names[0]
        reason: MoveReason | None = MoveReason.UNSENT if first in tried else None
        for name in names:
            if name in tried:
                continue
            why = self.unusable(name, country)
            if why is None:
                return name, (None if name == first else reason)
            reason = reason or why
        if tried or reason is MoveReason.PAUSED:
            return "", reason
        return first, None

    def planned(self, home: Account, country: str | None) -> str:
        """Where `choose` would send it, without taking a half-open route's probe."""
        names = self.candidates(home, country)
        mono = self._clock.monotonic()
        for name in names:
            r = self.routes[name]
            drain = r.drained.get(country or "")
            if r.paused_until > mono or (drain is not None and drain.until > mono):
                continue
            if r.circuit is Circuit.CLOSED or mono - r.opened_at >= self.options.open_s:
                return name
        return names[0]

    def paused_for_s(self, home: Account) -> float:
        """Seconds until the first of `home`'s routes comes back from its pause."""
        mono = self._clock.monotonic()
        left = [self.routes[n].paused_until - mono for n in home.routes_to if self.routes[n].paused_until > mono]
        return min(left, default=0.0)

    def unusable(self, name: str, country: str | None) -> MoveReason | None:
        """Why the route to `name` takes no request now (None: it does). An open circuit whose wait
        is over lets one probe through (half-open)."""
        r = self.routes[name]
        mono = self._clock.monotonic()
        if r.paused_until > mono:
            return MoveReason.PAUSED
        drain = r.drained.get(country or "")
        if drain is not None and drain.until > mono:
            return MoveReason.DRAINED
        if r.circuit is Circuit.OPEN:
            if mono - r.opened_at < self.options.open_s:
                return MoveReason.OPEN
            self._set(r, Circuit.HALF_OPEN, "probing")
        if r.circuit is Circuit.HALF_OPEN:
            if r.probing and mono - r.opened_at < 2 * self.options.open_s:
                return MoveReason.OPEN
            r.probing = True
            r.opened_at = mono
        return None

    def failover_configured(self, home: Account) -> bool:
        return len(home.routes_to) > 1

    # -- what calls and reports say ------------------------------------------------------------------------

    def called(self, name: str, results: Sequence[ItemResult]) -> None:
        """One provider call of `name` answered `results`: the circuit counts it."""
        r = self.routes[name]
        o = self.options
        mono = self._clock.monotonic()
        failed = call_failed(results)
        retryable = failed or any(_retryable(x) for x in results)
        r.calls.append((mono, retryable))
        while r.calls and r.calls[0][0] < mono - o.window_s:
            r.calls.popleft()
        r.in_a_row = r.in_a_row + 1 if failed else 0
        if r.circuit is Circuit.HALF_OPEN:
            r.probing = False
            if failed:
                self._open(r, mono, "the probe call failed")
            else:
                r.calls.clear()
                self._set(r, Circuit.CLOSED, "the probe call succeeded")
            return
        if r.circuit is not Circuit.CLOSED:
            return
        if r.in_a_row >= o.failures:
            self._open(r, mono, f"{r.in_a_row} calls in a row failed ({_code(results)})")
        elif len(r.calls) >= o.min_calls:
            share = sum(1 for _, bad in r.calls if bad) / len(r.calls)
            if share > o.error_rate:
                self._open(r, mono, f"{share:.0%} of {len(r.calls)} calls failed retryably in {o.window_s:g} s")

    def pause(self, name: str, code: str | None) -> None:
        """`name` answered an account error: no request goes its way for the account pause."""
        r = self.routes[name]
        seconds = self.pause_s
        until = self._clock.monotonic() + seconds
        if until > r.paused_until:
            if r.paused_until <= self._clock.monotonic():
                log.warning("route_paused", account=name, code=code, seconds=seconds)
            r.paused_until, r.pause_code = until, code
            r.since, r.why = self._clock.time(), f"account error {code}"
            self._changed.add(name)

    def reported(self, name: str, country: str | None, undelivered: bool) -> None:
        """A final delivery report of a message `name` sent to `country`: the route's health."""
        if not country:
            return
        r = self.routes.get(name)
        if r is None:
            return
        o = self.options
        mono = self._clock.monotonic()
        window = r.reports.setdefault(country, deque())
        window.append((mono, undelivered))
        while window and window[0][0] < mono - o.health_window_s:
            window.popleft()
        if len(window) < o.undelivered_min:
            return
        share = sum(1 for _, bad in window if bad) / len(window)
        drain = r.drained.get(country)
        if share > o.undelivered_share and (drain is None or drain.until <= mono):
            r.drained[country] = _Drain(mono + o.drain_s, share)
            r.since = self._clock.time()
            window.clear()
            self._changed.add(name)
            log.warning("route_drained", account=name, country=country, undelivered_share=round(share, 3))
            m.ROUTE_DRAINED.labels(name, country).set(1)
        elif drain is not None and drain.until <= mono:
            del r.drained[country]
            m.ROUTE_DRAINED.labels(name, country).set(0)

    # -- state ------------------------------------------------------------------------------------------

    def take_changed(self) -> list[tuple[str, str, str, float, float]]:
        """The routes whose state changed since the last call, as operators see them: (account,
        state, why, since, until) in epoch seconds; a closed route's until is now (nothing to show)."""
        now, mono = self._clock.time(), self._clock.monotonic()
        out = []
        for name in sorted(self._changed):
            r = self.routes[name]
            drained = {c: d for c, d in r.drained.items() if d.until > mono}
            if r.paused_until > mono:
                out.append((name, "paused", r.why, r.since, now + r.paused_until - mono))
            elif r.circuit is Circuit.OPEN:
                out.append((name, "open", r.why, r.since, now + max(0.0, r.opened_at + self.options.open_s - mono)))
            elif r.circuit is Circuit.HALF_OPEN:
                out.append((name, "half_open", r.why, r.since, now + self.options.open_s))
            elif drained:
                why = ", ".join(f"{c} {d.share:.0%} undelivered" for c, d in sorted(drained.items()))
                out.append((name, "drained", why, r.since, now + max(d.until for d in drained.values()) - mono))
            else:
                out.append((name, "closed", r.why, r.since, now))
        self._changed.clear()
        return out

    def describe(self) -> dict[str, dict[str, object]]:
        now, mono = self._clock.time(), self._clock.monotonic()
        return {name: r.describe(now, mono) for name, r in self.routes.items()}

    def _open(self, r: Route, mono: float, why: str) -> None:
        r.opened_at = mono
        r.in_a_row = 0
        self._set(r, Circuit.OPEN, why)

    def _set(self, r: Route, state: Circuit, why: str) -> None:
        if state is not r.circuit:
            (log.warning if state is Circuit.OPEN else log.info)("route_" + str(state), account=r.name, why=why)
            r.circuit, r.since, r.why = state, self._clock.time(), why
            self._gauge(r.name)
            self._changed.add(r.name)

    def _gauge(self, name: str) -> None:
        state = self.routes[name].circuit
        for s in Circuit:
            m.ROUTE_STATE.labels(name, str(s)).set(1 if s is state else 0)
        m.ROUTE_OPEN_SINCE.labels(name).set(self.routes[name].since if state is not Circuit.CLOSED else 0)


def _code(results: Sequence[ItemResult]) -> str:
    error = results[0].error if results else None
    return error.code if error is not None else "no error"
