"""`gateway topology`: declare the bus, or check a broker against it."""

from __future__ import annotations

import asyncio

import click

from gateway.bus import topology as t
from gateway.cli import common as x


def _plan(sandbox: bool, extra: tuple[str, ...]) -> t.Layout:
    from gateway.app import resolve_accounts

    s = x.settings()
    names = [a.name for a in resolve_accounts(s, sandbox=sandbox)] if not extra or sandbox else []
    return t.layout([*names, *(a for a in extra if a not in names)], s.retry_schedule_s)


_ACCOUNT = click.option(
    "--account", "-a", "extra", multiple=True, help="An account to include; default: the configured accounts."
)
_SANDBOX = click.option("--sandbox", is_flag=True, help="With the sandbox's demo account when none is configured.")


@click.group()
def topology() -> None:
    """The exchanges, queues and bindings of the bus (docs/contract.md)."""


@topology.command()
@_ACCOUNT
@_SANDBOX
@click.option("--json", "as_json", is_flag=True, help="Print what was declared as JSON.")
def declare(extra: tuple[str, ...], sandbox: bool, as_json: bool) -> int:
    """Declare every exchange, queue and binding (idempotent), e.g. before producers start.

    Fails (exit 1) when an existing queue or exchange was declared with other arguments; run
    `gateway topology check` to see which.
    """
    plan = _plan(sandbox, extra)

    async def go() -> None:
        async with x.broker(x.settings()) as connection, connection.channel() as channel:
            await t.apply(channel, plan)

    asyncio.run(go())  # a declaration the broker refuses (other arguments) ends as exit 1 (common.broker)
    names = {"exchanges": [e.name for e in plan.exchanges], "queues": [q.name for q in plan.queues]}
    if as_json:
        x.emit_json(names)
    else:
        click.echo(f"declared {len(plan.exchanges)} exchanges and {len(plan.queues)} queues")
    return x.OK


@topology.command()
@_ACCOUNT
@_SANDBOX
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check(extra: tuple[str, ...], sandbox: bool, as_json: bool) -> int:
    """Compare the broker with the bus layout and report drift: a missing exchange, queue or
    binding, or one declared with other arguments. Changes nothing.

    Exits 1 when something differs. Arguments and bindings are read from RabbitMQ's management
    API (GATEWAY_MANAGEMENT_URL); without it, missing entities and refused arguments are still
    found through AMQP, and bindings are reported as not checked.
    """
    from gateway.bus.broker_api import BrokerApi
    from gateway.errors import ApiUnavailable

    s = x.settings()
    plan = _plan(sandbox, extra)

    async def go() -> tuple[list[t.Drift], str | None]:
        async with x.broker(s) as connection, BrokerApi(x.management_url(s)) as api:
            try:
                await api.exchange("amq.direct")
            except ApiUnavailable as exc:
                return await t.check(connection, plan, None), str(exc)
            return await t.check(connection, plan, api), None

    drift, without_api = asyncio.run(go())
    if as_json:
        x.emit_json(
            {
                "ok": not drift,
                "drift": [{"kind": d.kind, "name": d.name, "detail": d.detail} for d in drift],
                "bindings_checked": without_api is None,
                "note": without_api,
            }
        )
    else:
        if without_api:
            click.echo(f"note: {without_api}; bindings not checked", err=True)
        if drift:
            x.table(None, ["problem", "name", "detail"], [(d.kind, d.name, d.detail) for d in drift])
        checked = f"{len(plan.exchanges)} exchanges and {len(plan.queues)} queues"
        click.echo(f"{len(drift)} problem(s) in {checked}" if drift else f"ok: {checked} as expected")
    return x.FAILED if drift else x.OK
