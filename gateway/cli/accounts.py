"""`gateway accounts`: each account's queue, consumers, limits and pauses, while gateways run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import click

from gateway.cli import common as x


@click.command()
@click.option("--sandbox", is_flag=True, help="With the sandbox's demo account when none is configured.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per account, in an array.")
def accounts(sandbox: bool, as_json: bool) -> int:
    """Per account: queue depth, unacknowledged (in flight in a gateway) and consumers, in total
    and per lane (urgent / normal / bulk); rate and burst (and the provider's throttle factor);
    the parts each budget has used in its day or month; whether it is paused, why and until when;
    and its route's state in each replica that is not closed (open, half_open, paused, drained: since
    when and why).

    Depth and consumers come from RabbitMQ, in-flight counts from its management API (when it
    answers), pauses and throttling from the state store the gateways share.
    """
    from gateway.app import resolve_accounts

    s = x.settings()
    configured = resolve_accounts(s, sandbox=sandbox)

    async def go() -> list[dict[str, Any]]:
        from gateway import contract as c
        from gateway.bus.broker_api import BrokerApi

        store = x.state_store(s)
        rows = []
        try:
            async with x.broker(s) as connection, BrokerApi(x.management_url(s)) as api:
                for account in configured:
                    row: dict[str, Any] = {"account": account.name, "provider": account.provider}
                    lanes: dict[str, dict[str, Any]] = {}
                    for lane in c.LANES:
                        lanes[lane] = await _lane(connection, api, c.account_queue(account.name, lane))
                    for key in ("ready", "consumers", "in_flight", "publish_rate"):
                        values = [v[key] for v in lanes.values()]
                        row[key] = None if None in values else round(sum(values), 2)
                    missing = [v["queue"] for v in lanes.values() if v.get("problem")]
                    if missing:
                        row["problem"] = "queue missing: " + ", ".join(missing)
                    row["lanes"] = lanes
                    row["rate_per_s"], row["burst"] = account.rate_per_s, account.burst
                    try:
                        state = await asyncio.wait_for(store.account_state(account.name), 5)
                    except Exception as exc:  # noqa: BLE001 - one line, exit 4
                        raise x.Fail(f"cannot read the state store: {type(exc).__name__}", x.UNREACHABLE) from None
                    row["throttle_factor"] = round(state.throttle_factor, 3)
                    row["paused"] = [
                        {"owner": p.owner, "reason": p.reason, "code": p.code, "until": _iso(p.until)}
                        for p in state.pauses
                        if not p.owner.endswith("/route")
                    ]
                    row["route"] = [
                        {
                            "owner": p.owner.removesuffix("/route"),
                            "state": p.reason,
                            "why": p.code,
                            "since": _iso(p.since or p.until),
                            "until": _iso(p.until),
                        }
                        for p in state.pauses
                        if p.owner.endswith("/route")
                    ]
                    row["failover_to"] = list(account.failover_to)
                    row["route_by_country"] = dict(account.route_by_country)
                    row["budgets"] = await _budgets(store, account)
                    rows.append(row)
        finally:
            await store.close()
        return rows

    rows = asyncio.run(go())
    if as_json:
        x.emit_json(rows)
        return x.OK
    table = []
    for r in rows:
        pause = r["paused"]
        paused = "-"
        if pause:
            last = max(pause, key=lambda p: p["until"])
            paused = f"{last['reason']}" + (f" {last['code']}" if last["code"] else "") + f" until {last['until']}"
            paused += f" ({len(pause)} replica(s))"
        route = "closed"
        if r["route"]:
            worst = max(r["route"], key=lambda p: p["since"])
            route = f"{worst['state']} since {worst['since']}: {worst['why']} ({len(r['route'])} replica(s))"
        limit = f"{r['rate_per_s']:g}/s burst {r['burst']}"
        if r["throttle_factor"] < 1:
            limit += f" (throttled x{r['throttle_factor']})"
        lanes = r["lanes"].values()
        budget = ", ".join(
            f"{b['scope'].removeprefix('app:')} {b['used']}/{b['limit']} a {b['period']}" for b in r["budgets"]
        )
        table.append(
            (
                r["account"],
                r["provider"],
                "/".join(_n(v["ready"]) for v in lanes),
                "/".join(_n(v["in_flight"]) for v in lanes),
                "/".join(_n(v["consumers"]) for v in lanes),
                limit,
                budget or "-",
                paused,
                route,
            )
        )
    head = [
        "account",
        "provider",
        "queued u/n/b",
        "in flight u/n/b",
        "consumers u/n/b",
        "rate",
        "budget parts",
        "paused",
        "route",
    ]
    x.table(None, head, table)
    return x.OK


async def _lane(connection: Any, api: Any, queue: str) -> dict[str, Any]:
    """One lane's queue: depth and consumers from AMQP, in-flight count and publish rate from the
    management API (None where it does not answer)."""
    from aiormq.exceptions import ChannelNotFoundEntity

    from gateway.errors import ApiUnavailable

    out: dict[str, Any] = {"queue": queue}
    try:
        async with connection.channel() as channel:
            q = await channel.declare_queue(queue, passive=True)
            out["ready"] = q.declaration_result.message_count
            out["consumers"] = q.declaration_result.consumer_count
    except ChannelNotFoundEntity:
        out["ready"] = out["consumers"] = None
        out["problem"] = "queue missing"
    try:
        info = await api.queue(queue)
        out["in_flight"] = info.unacked if info is not None else None
        out["publish_rate"] = info.publish_rate if info is not None else None
    except ApiUnavailable:
        out["in_flight"] = out["publish_rate"] = None
    return out


async def _budgets(store: Any, account: Any) -> list[dict[str, Any]]:
    """Each budget's parts used in its current period (core/budgets.py)."""
    import time

    from gateway.core import budgets

    counters = budgets.counters_for(account, None, time.time())
    for app in account.app_budgets:
        counters += [c for c in budgets.counters_for(account, app, time.time()) if c.scope != "account"]
    try:
        used = await asyncio.wait_for(store.budget_use(account.name, counters), 5)
    except Exception as exc:  # noqa: BLE001 - one line, exit 4
        raise x.Fail(f"cannot read the state store: {type(exc).__name__}", x.UNREACHABLE) from None
    return [
        {"scope": c.scope, "period": c.period, "used": u, "limit": c.limit, "name": c.name}
        for c, u in zip(counters, used, strict=True)
    ]


def _n(value: Any) -> str:
    return "?" if value is None else str(value)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
