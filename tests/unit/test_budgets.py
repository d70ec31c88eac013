"""Which budget counters a request draws from, and when their periods turn (core/budgets.py)."""

from __future__ import annotations

from datetime import datetime

from gateway.config import Account
from gateway.contract import Lane
from gateway.core import budgets
from gateway.state.base import CounterKind, Draw


def req(parts: int, app: str | None = None, to: str = "+48500600700") -> budgets.Request:
    return budgets.Request(parts, app, to)


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def account(**kw: object) -> Account:
    doc: dict[str, object] = {"name": "acme", "provider": "serwersms", "base_url": "http://x.invalid", "token": "t"}
    return Account.model_validate({**doc, **kw})


def test_a_day_and_a_month_start_at_midnight_in_the_budget_zone() -> None:
    # 23:30 UTC on 31 December is already 1 January in Warsaw.
    (day, day_end), (month, month_end) = budgets.periods(at("2026-12-31T23:30:00+00:00"), "Europe/Warsaw")
    assert (day, month) == ("2027-01-01", "2027-01")
    assert day_end == at("2027-01-02T00:00:00+01:00")
    assert month_end == at("2027-02-01T00:00:00+01:00")
    (day, _), (month, _) = budgets.periods(at("2026-12-31T23:30:00+00:00"), "UTC")
    assert (day, month) == ("2026-12-31", "2026-12")


def test_a_day_when_the_clocks_change_ends_at_the_next_local_midnight() -> None:
    # 29 March 2026: Warsaw skips 02:00-03:00, the day has 23 hours.
    (day, day_end), _ = budgets.periods(at("2026-03-29T12:00:00+02:00"), "Europe/Warsaw")
    assert day == "2026-03-29"
    assert day_end == at("2026-03-30T00:00:00+02:00")
    assert day_end - at("2026-03-29T00:00:00+01:00") == 23 * 3600


def test_a_request_draws_from_its_accounts_and_its_applications_counters() -> None:
    acc = account(
        budget_parts_per_day=500,
        budget_parts_per_month=9000,
        app_budgets={"crm": {"budget_parts_per_day": 50}},
        budget_timezone="Europe/Warsaw",
    )
    now = at("2026-12-06T10:00:00+01:00")
    b = budgets.for_batch(acc, Lane.NORMAL, {"a": req(2, "crm"), "b": req(1), "c": req(3, "other")}, now)
    assert b is not None
    names = [c.name for c in b.counters]
    assert names == ["account:day:2026-12-06", "account:month:2026-12", "app:crm:day:2026-12-06"]
    assert [c.limit for c in b.counters] == [500, 9000, 50]
    assert b.asks["a"].draws == (Draw(0, 2), Draw(1, 2), Draw(2, 2))
    assert b.asks["b"].draws == (Draw(0, 1), Draw(1, 1))
    assert b.asks["c"].draws == (Draw(0, 3), Draw(1, 3))  # an application without a budget of its own


def test_urgent_is_counted_but_not_refused_and_no_limit_means_none() -> None:
    acc = account(budget_parts_per_day=10)
    b = budgets.for_batch(acc, Lane.URGENT, {"a": req(1)}, at("2026-12-06T10:00:00+00:00"))
    assert b is not None
    assert b.asks["a"].draws == (Draw(0, 1, enforced=False),)
    assert budgets.for_batch(account(), Lane.NORMAL, {"a": req(1)}, 0.0) is None
    only_app = account(app_budgets={"crm": {"budget_parts_per_month": 5}})
    assert budgets.for_batch(only_app, Lane.NORMAL, {"a": req(1, "web")}, 0.0) is None  # nothing to draw from
    assert budgets.scopes(only_app) == [("app:crm", "month", 5)]


def test_the_country_cap_counts_messages_on_every_lane_and_the_recipient_cap_skips_urgent() -> None:
    acc = account(country_caps_per_hour={"ng": 20, "*": 1000}, frequency_cap_per_day=3)
    now = at("2026-12-06T14:59:59+00:00")
    nigeria, poland = "+2348031234567", "+48500600700"
    b = budgets.for_batch(acc, Lane.NORMAL, {"a": req(4, to=nigeria), "b": req(1, to=poland)}, now)
    assert b is not None
    by_name = {c.name: c for c in b.counters}
    ng = by_name["country:NG:hour:2026-12-06T14"]
    assert (ng.kind, ng.limit, ng.period) == (CounterKind.VELOCITY, 20, "hour")
    assert by_name["country:PL:hour:2026-12-06T14"].limit == 1000  # any other country: `*`
    recipient = by_name[f"recipient:{nigeria}:day:2026-12-06"]
    assert (recipient.kind, recipient.limit) == (CounterKind.FREQUENCY, 3)
    assert all(d.amount == 1 and d.enforced for d in b.asks["a"].draws)  # messages, not parts
    urgent = budgets.for_batch(acc, Lane.URGENT, {"a": req(1, to=nigeria)}, now)
    assert urgent is not None
    assert [c.kind for c in urgent.counters] == [CounterKind.VELOCITY]  # codes are pumped too; not capped per person
    later = budgets.for_batch(acc, Lane.NORMAL, {"a": req(1, to=nigeria)}, now + 1)
    assert later is not None
    assert "country:NG:hour:2026-12-06T15" in {c.name for c in later.counters}  # the next hour's counter


def test_a_country_without_a_cap_and_no_catch_all_is_not_counted() -> None:
    acc = account(country_caps_per_hour={"NG": 20})
    assert budgets.for_batch(acc, Lane.NORMAL, {"a": req(1, to="+48500600700")}, 0.0) is None
