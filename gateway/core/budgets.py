"""Budgets in SMS parts, per account and per producing application (the AMQP `app_id`), per day
and per calendar month in the account's `budget_timezone`: which counters a batch's requests draw
from, decided without I/O. The store reserves them with the claim, atomically across replicas
(state.base: `Budget`), and the pipeline spends or refunds them in the batch's record.

A counter is named by its scope, its period and the period's date (`account:day:2026-12-06`,
`app:billing:month:2026-12`): a new day starts a new counter, and the old one expires a while
after its period ended (kept that long for `gateway accounts` and the metrics)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from gateway.config import Account
from gateway.contract import Lane
from gateway.state.base import Budget, BudgetAsk, BudgetCounter

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


def for_batch(account: Account, lane: Lane, asks: Mapping[str, tuple[int, str | None]], now: float) -> Budget | None:
    """The budget of a batch whose requests (unique_id -> (parts, app_id)) go out on `lane`; None
    when the account has no budget."""
    if not account.has_budget:
        return None
    enforce = lane in account.budget_lanes
    counters: list[BudgetCounter] = []
    index: dict[str, int] = {}
    out: dict[str, BudgetAsk] = {}
    for uid, (parts, app_id) in asks.items():
        mine = []
        for counter in counters_for(account, app_id, now):
            if counter.name not in index:
                index[counter.name] = len(counters)
                counters.append(counter)
            mine.append(index[counter.name])
        if mine:
            out[uid] = BudgetAsk(parts, tuple(mine), enforce)
    return Budget(tuple(counters), out) if out else None


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
