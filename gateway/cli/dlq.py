"""`gateway dlq`: what is in the dead-letter queue and why; replay or purge a selection."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import click

from gateway.cli import common as x
from gateway.ops import deadletters as dl

_FILTERS = [
    click.option("--account", "-a", help="Only this account's letters."),
    click.option(
        "--reason",
        type=click.Choice(["invalid", "rejected", "retries_exhausted", "expired", "unknown_account", "poison"]),
        help="Only letters dead-lettered for this reason.",
    ),
    click.option(
        "--code", help="Only this error code (the provider's, e.g. 3005, or the gateway's, e.g. missing_var)."
    ),
    click.option("--since", help="Only letters dead-lettered since: a duration (30m, 2h, 7d) or an RFC 3339 time."),
    click.option("--id", "ids", multiple=True, help="Only the letter with this id (from `dlq list`); repeat."),
]


def _filters(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_FILTERS):
        fn = option(fn)
    return fn


def _keep(
    account: str | None, reason: str | None, code: str | None, since: str | None, ids: tuple[str, ...]
) -> dl.Filter:
    return dl.Filter(account, reason, code, x.parse_since(since), frozenset(ids))


@click.group()
def dlq() -> None:
    """Inspect, replay and purge the dead letters in sms.dead.

    Reading never removes a letter: each is fetched unacknowledged and given back. Only `replay`
    and `purge` remove letters, and only those they selected.
    """


@dlq.command("list")
@_filters
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many rows.")
@click.option("--json", "as_json", is_flag=True, help="Rows as a JSON array.")
def list_(
    account: str | None,
    reason: str | None,
    code: str | None,
    since: str | None,
    ids: tuple[str, ...],
    limit: int,
    as_json: bool,
) -> int:
    """A table of dead letters: time, account, reason, code, masked number, unique_id.

    \b
      gateway dlq list --account acme --reason rejected --since 2h
    """
    keep = _keep(account, reason, code, since, ids)

    async def go() -> tuple[list[dl.DeadLetter], int]:
        async with x.broker(x.settings()) as connection:
            letters = await dl.listing(connection, keep, limit)
            async with connection.channel() as channel:
                return letters, await dl.depth(channel)

    letters, total = asyncio.run(go())
    if as_json:
        x.emit_json([d.row() for d in letters])
        return x.OK
    rows = [(r["at"] or "-", r["account"], r["reason"], r["code"], r["to"] or "-", r["unique_id"] or "-", r["id"])
            for r in (d.row() for d in letters)]  # fmt: skip
    x.table(None, ["time", "account", "reason", "code", "to", "unique_id", "id"], rows)
    click.echo(f"{len(letters)} shown; sms.dead holds {total}", err=True)
    return x.OK


@dlq.command()
@click.argument("letter_id")
@click.option("--json", "as_json", is_flag=True, help="As JSON (the default output is JSON too, indented).")
def show(letter_id: str, as_json: bool) -> int:
    """One dead letter in full: why (headers), its properties and its body."""
    keep = dl.Filter(ids=frozenset({letter_id}))

    async def go() -> list[dl.DeadLetter]:
        async with x.broker(x.settings()) as connection:
            return await dl.listing(connection, keep, 1)

    found = asyncio.run(go())
    if not found:
        x.die(f"no dead letter with id {letter_id} in sms.dead")
    x.emit_json(found[0].full())
    return x.OK


@dlq.command()
@_filters
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Replay at most this many.")
@click.option("--dry-run", is_flag=True, help="Only count what would be replayed.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def replay(
    account: str | None,
    reason: str | None,
    code: str | None,
    since: str | None,
    ids: tuple[str, ...],
    limit: int | None,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> int:
    """Republish a selection into sms.send with the same unique_id, then remove exactly those.

    Each letter is removed only after the broker confirmed its copy; a crash part-way leaves the
    rest in place, and replaying again is safe: a copy whose first replay was accepted comes back
    `duplicate` and is not sent again. The copies carry the x-gateway-replay header, so a request
    whose earlier result was rejected, failed or expired is sent again instead of answered
    `duplicate`.

    \b
      gateway dlq replay --account acme --code 3005 --dry-run
      gateway dlq replay --account acme --code 3005 --yes
    """
    keep = _keep(account, reason, code, since, ids)
    s = x.settings()

    async def count() -> int:
        async with x.broker(s) as connection:
            return len(await dl.listing(connection, keep, limit))

    matched = asyncio.run(count())
    if dry_run or matched == 0:
        summary = {"matched": matched, "replayed": 0, "dry_run": dry_run}
        x.emit_json(summary) if as_json else click.echo(
            f"{matched} dead letter(s) would be replayed" if dry_run else "no dead letter matches"
        )
        return x.OK
    x.confirm(f"Replay {matched} dead letter(s) into sms.send?", yes)

    async def go() -> dl.Summary:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        async with x.broker(s) as connection:
            if not sys.stderr.isatty():  # a job's log: one plain line per confirmed chunk
                done = 0

                def line(n: int) -> None:
                    nonlocal done
                    done += n
                    x.stderr(f"replayed {done}/{matched}")

                return await dl.replay(connection, keep, limit=limit, progress=line)
            with Progress(
                TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                disable=matched < 200, transient=True, console=Console(stderr=True),
            ) as bar:  # fmt: skip
                task = bar.add_task("replay", total=matched)
                return await dl.replay(connection, keep, limit=limit, progress=lambda n: bar.advance(task, n))

    result = asyncio.run(go())
    doc = {**result.as_dict(), "replayed": result.done, "dry_run": False}
    if as_json:
        x.emit_json(doc)
    else:
        click.echo(f"replayed {result.done} dead letter(s) into sms.send" + _skipped(result))
    return x.OK


@dlq.command()
@_filters
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Purge at most this many.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (needed without a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def purge(
    account: str | None,
    reason: str | None,
    code: str | None,
    since: str | None,
    ids: tuple[str, ...],
    limit: int | None,
    yes: bool,
    as_json: bool,
) -> int:
    """Remove the selected dead letters for good (no filter: all of them)."""
    keep = _keep(account, reason, code, since, ids)
    s = x.settings()

    async def count() -> int:
        async with x.broker(s) as connection:
            return len(await dl.listing(connection, keep, limit))

    matched = asyncio.run(count())
    if matched == 0:
        x.emit_json({"matched": 0, "purged": 0}) if as_json else click.echo("no dead letter matches")
        return x.OK
    x.confirm(f"Purge {matched} dead letter(s) for good?", yes)

    async def go() -> dl.Summary:
        async with x.broker(s) as connection:
            return await dl.purge(connection, keep, limit=limit)

    result = asyncio.run(go())
    if as_json:
        x.emit_json({**result.as_dict(), "purged": result.done})
    else:
        click.echo(f"purged {result.done} dead letter(s)" + _skipped(result))
    return x.OK


def _skipped(result: dl.Summary) -> str:
    return f"; {result.skipped} without an account left in place" if result.skipped else ""
