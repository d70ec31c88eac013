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
    """Per account: queue depth, unacknowledged (in flight in a gateway), consumers, rate and
    burst (and the provider's throttle factor), and whether it is paused, why and until when.

    Depth and consumers come from RabbitMQ, in-flight counts from its management API (when it
    answers), pauses and throttling from the state store the gateways share.
    """
    from gateway.app import resolve_accounts

    s = x.settings()
    configured = resolve_accounts(s, sandbox=sandbox)

    async def go() -> list[dict[str, Any]]:
        from aiormq.exceptions import ChannelNotFoundEntity

        from gateway import contract as c
        from gateway.bus.broker_api import BrokerApi
        from gateway.errors import ApiUnavailable

        store = x.state_store(s)
        rows = []
        try:
            async with x.broker(s) as connection, BrokerApi(x.management_url(s)) as api:
                for account in configured:
                    row: dict[str, Any] = {"account": account.name, "provider": account.provider}
                    try:
                        async with connection.channel() as channel:
                            q = await channel.declare_queue(c.account_queue(account.name), passive=True)
                            row["ready"] = q.declaration_result.message_count
                            row["consumers"] = q.declaration_result.consumer_count
                    except ChannelNotFoundEntity:
                        row["ready"] = row["consumers"] = None
                        row["problem"] = "queue missing"
                    try:
                        info = await api.queue(c.account_queue(account.name))
                        row["in_flight"] = info.unacked if info is not None else None
                        row["publish_rate"] = info.publish_rate if info is not None else None
                    except ApiUnavailable:
                        row["in_flight"] = row["publish_rate"] = None
                    row["rate_per_s"], row["burst"] = account.rate_per_s, account.burst
                    try:
                        state = await asyncio.wait_for(store.account_state(account.name), 5)
                    except Exception as exc:  # noqa: BLE001 - one line, exit 4
                        raise x.Fail(f"cannot read the state store: {type(exc).__name__}", x.UNREACHABLE) from None
                    row["throttle_factor"] = round(state.throttle_factor, 3)
                    row["paused"] = [
                        {"owner": p.owner, "reason": p.reason, "code": p.code, "until": _iso(p.until)}
                        for p in state.pauses
                    ]
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
        limit = f"{r['rate_per_s']:g}/s burst {r['burst']}"
        if r["throttle_factor"] < 1:
            limit += f" (throttled x{r['throttle_factor']})"
        table.append(
            (r["account"], r["provider"], _n(r["ready"]), _n(r["in_flight"]), _n(r["consumers"]), limit, paused)
        )
    x.table(None, ["account", "provider", "queued", "in flight", "consumers", "rate", "paused"], table)
    return x.OK


def _n(value: Any) -> str:
    return "?" if value is None else str(value)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
