"""The account's counted limits, decided without I/O: which counters a batch's requests draw from.
The store reserves the draws with the claim, atomically across replicas (state.base: `Budget`),
and the pipeline spends or refunds them in the batch's record.

- Budgets in SMS parts, per account and per producing application (the AMQP `app_id`), per day
  and per calendar month in the account's `budget_timezone` (`quota_exceeded`).
- The fraud guard: messages per hour to one country (`country_caps_per_hour`, `velocity_blocked`),
  every lane: SMS pumping rides on login codes as much as on campaigns.
- Messages per day to one recipient (`frequency_cap_per_day`, `frequency_capped`), normal and
  bulk lanes.

A counter is named by its scope, its period and the period's date (`account:day:2026-12-06`,
`app:billing:month:2026-12`, `country:NG:hour:2026-12-06T14`): a new period starts a new counter,
and the old one expires a while after its period ended (kept that long for `gateway accounts`)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo

from gateway.config import Account
from gateway.contract import Lane
from gateway.numbers import country_of
from gateway.state.base import Budget, BudgetAsk, BudgetCounter, CounterKind, Draw


class Request(NamedTuple):
    """What the limits need of one request."""

    parts: int
    app_id: str | None
    phone: str


KEEP_DAY_S = 2 * 86400  # a day's counter is kept this long after the day ended
KEEP_MONTH_S = 35 * 86400  # a month's, this long after the month ended


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def periods(now: float, zone: str) -> tuple[tuple[str, float], tuple[str, float]]:
    """(day stamp, the day's end) and (month stamp, the month's end), epoch seconds, in `zone`."""
    local = datetime.fromtimestamp(now, _zone(zone))
    day_start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    # Midnight of the next local day (a day is 23 or 25 hours when the clocks change).
    next_day = (day_start + timedelta(days=1, hours=2)).replace(hour=0)
    month_start = day_start.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    return (day_start.date().isoformat(), next_day.timestamp()), (f"{local:%Y-%m}", next_month.timestamp())


def counters_for(account: Account, app_id: str | None, now: float) -> list[BudgetCounter]:
    """Every counter a request of `app_id` draws from now: the account's, then its application's."""
    (day, day_end), (month, month_end) = periods(now, account.budget_timezone)
    out: list[BudgetCounter] = []

    def add(scope: str, per_day: int | None, per_month: int | None) -> None:
        if per_day is not None:
            out.append(BudgetCounter(f"{scope}:day:{day}", scope, "day", per_day, day_end + KEEP_DAY_S))
        if per_month is not None:
            out.append(BudgetCounter(f"{scope}:month:{month}", scope, "month", per_month, month_end + KEEP_MONTH_S))

    add("account", account.budget_parts_per_day, account.budget_parts_per_month)
    app = account.app_budgets.get(app_id) if app_id is not None else None
    if app is not None:
        add(f"app:{app_id}", app.budget_parts_per_day, app.budget_parts_per_month)
    return out


def for_batch(account: Account, lane: Lane, asks: Mapping[str, Request], now: float) -> Budget | None:
    """The limits a batch's requests on `lane` draw from: budgets (their parts; refused on
    `budget_lanes`, counted on the others), the country's hourly cap (one message, every lane) and
    the recipient's daily cap (one message, normal and bulk). None when none applies. The periods
    and each application's and country's counters are worked out once per batch."""
    if not account.has_limits:
        return None
    enforce_budget = lane in account.budget_lanes
    capped = account.frequency_cap_per_day is not None and lane is not Lane.URGENT
    (day, day_end), _ = periods(now, account.budget_timezone)
    counters: list[BudgetCounter] = []
    index: dict[str, int] = {}
    by_app: dict[str | None, list[int]] = {}
    by_country: dict[str, int | None] = {}
    out: dict[str, BudgetAsk] = {}

    def at(counter: BudgetCounter) -> int:
        if counter.name not in index:
            index[counter.name] = len(counters)
            counters.append(counter)
        return index[counter.name]

    for uid, req in asks.items():
        if req.app_id not in by_app:
            by_app[req.app_id] = [at(c) for c in counters_for(account, req.app_id, now)]
        draws = [Draw(c, req.parts, enforce_budget) for c in by_app[req.app_id]]
        if account.country_caps_per_hour:
            country = country_of(req.phone) or "ZZ"
            if country not in by_country:
                cap = velocity_counter(account, country, now)
                by_country[country] = at(cap) if cap is not None else None
            if (c := by_country[country]) is not None:
                draws.append(Draw(c, 1))
        if capped:
            assert account.frequency_cap_per_day is not None
            name = f"recipient:{req.phone}:day:{day}"
            recipient = BudgetCounter(
                name, f"recipient:{req.phone}", "day", account.frequency_cap_per_day, day_end + 3600,
                CounterKind.FREQUENCY,
            )  # fmt: skip
            draws.append(Draw(at(recipient), 1))
        if draws:
            out[uid] = BudgetAsk(tuple(draws))
    return Budget(tuple(counters), out) if out else None


def velocity_counter(account: Account, country: str, now: float) -> BudgetCounter | None:
    """The hourly counter (UTC hours) of a country, when the account caps it."""
    caps = account.country_caps_per_hour
    limit = caps.get(country, caps.get("*"))
    if limit is None:
        return None
    hour = int(now // 3600)
    stamp = datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y-%m-%dT%H")
    return BudgetCounter(
        f"country:{country}:hour:{stamp}", f"country:{country}", "hour", limit, (hour + 1) * 3600 + KEEP_DAY_S,
        CounterKind.VELOCITY,
    )  # fmt: skip


def scopes(account: Account) -> list[tuple[str, str, int]]:
    """(scope, period, limit) of every budget the account has: for the metrics and the CLI."""
    out = []
    for scope, per_day, per_month in [
        ("account", account.budget_parts_per_day, account.budget_parts_per_month),
        *((f"app:{app}", b.budget_parts_per_day, b.budget_parts_per_month) for app, b in account.app_budgets.items()),
    ]:
        if per_day is not None:
            out.append((scope, "day", per_day))
        if per_month is not None:
            out.append((scope, "month", per_month))
    return out
