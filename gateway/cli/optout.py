"""`gateway optout`: the opt-out registry in the state store the gateways share. A number in it gets
no normal or bulk message of the account (`--account A`) or of any account (`--all`); urgent
one-time codes still go unless the account's `optout_lanes` says otherwise. Applications change it
through the `sms.optout` exchange; operators and imports through here."""

from __future__ import annotations

import asyncio
import csv
import getpass
import io
import re
import sys
import time
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from gateway.cli import common as x
from gateway.contract import rfc3339
from gateway.errors import InvalidNumber
from gateway.numbers import mask, normalize
from gateway.state.base import OPTOUT_ALL, OptOut

T = TypeVar("T")
CHUNK = 10_000  # entries per store call of an import
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
INTERNATIONAL_ONLY = "ZZ"


class Scope:
    """`--account A` or `--all`: the registry's scope and how its numbers are read."""

    def __init__(self, account: str | None, everyone: bool, sandbox: bool) -> None:
        from gateway.app import resolve_accounts

        if (account is None) == (not everyone):
            raise x.Fail("give --account A or --all (one of them)", x.USAGE)
        self.settings = x.settings()
        if everyone:
            self.key, self.label, self.region = OPTOUT_ALL, "all", INTERNATIONAL_ONLY
            return
        found = [a for a in resolve_accounts(self.settings, sandbox=sandbox) if a.name == account]
        if not found:
            raise x.Fail(f"no account {account!r} is configured", x.USAGE)
        assert account is not None
        self.key, self.label, self.region = account, account, found[0].default_country

    def number(self, raw: str) -> str:
        """E.164: as written when it already is (an import of millions), else through the parser
        with the account's country (`--all`: international numbers only)."""
        text = raw.strip()
        if _E164.match(text):
            return text
        return normalize(text, self.region)


async def _call(call: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(call, 60)
    except Exception as exc:  # noqa: BLE001 - one line, exit 4
        raise x.Fail(f"the state store: {type(exc).__name__}: {exc}"[:300], x.UNREACHABLE) from None


def _scope_options(fn: Any) -> Any:
    fn = click.option("--sandbox", is_flag=True, help="With the sandbox's demo account when none is configured.")(fn)
    fn = click.option("--all", "everyone", is_flag=True, help="The registry of every account.")(fn)
    return click.option("--account", default=None, help="The registry of this account.")(fn)


@click.group()
def optout() -> None:
    """The opt-out registry: numbers that get no normal or bulk messages.

    \b
      gateway optout add +48500600700 --account shop --source "STOP reply"
      gateway optout remove +48500600700 --account shop
      gateway optout list --all
      gateway optout import stops.csv --all
      gateway optout export --account shop > shop-optouts.csv
    """


@optout.command("add")
@click.argument("numbers", nargs=-1, required=True)
@_scope_options
@click.option("--source", default="", help="Where the opt-out came from (kept with each entry).")
@click.option("--json", "as_json", is_flag=True)
def add(
    numbers: tuple[str, ...], account: str | None, everyone: bool, sandbox: bool, source: str, as_json: bool
) -> int:
    """Add NUMBERS to the registry."""
    scope = Scope(account, everyone, sandbox)
    try:
        e164 = [scope.number(n) for n in numbers]
    except InvalidNumber as exc:
        raise x.Fail(f"{exc}", x.USAGE) from None
    now, who = time.time(), _operator()
    added = asyncio.run(_add(scope, [OptOut(n, now, "cli", source, who) for n in e164]))
    _report({"scope": scope.label, "added": added, "already": len(set(e164)) - added}, as_json)
    return x.OK


@optout.command("remove")
@click.argument("numbers", nargs=-1, required=True)
@_scope_options
@click.option("--json", "as_json", is_flag=True)
def remove(numbers: tuple[str, ...], account: str | None, everyone: bool, sandbox: bool, as_json: bool) -> int:
    """Remove NUMBERS from the registry (they get messages again). Exit 1 when none was there."""
    scope = Scope(account, everyone, sandbox)
    try:
        e164 = [scope.number(n) for n in numbers]
    except InvalidNumber as exc:
        raise x.Fail(f"{exc}", x.USAGE) from None

    async def go() -> int:
        store = x.state_store(scope.settings)
        try:
            return await _call(store.optout_remove(scope.key, e164))
        finally:
            await store.close()

    removed = asyncio.run(go())
    _report({"scope": scope.label, "removed": removed, "absent": len(set(e164)) - removed}, as_json)
    return x.OK if removed else x.FAILED


@optout.command("list")
@_scope_options
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--show-number", is_flag=True, help="Print numbers in full (masked by default).")
@click.option("--json", "as_json", is_flag=True)
def list_(account: str | None, everyone: bool, sandbox: bool, limit: int, show_number: bool, as_json: bool) -> int:
    """How many numbers the registry holds, and the first LIMIT of them."""
    scope = Scope(account, everyone, sandbox)

    async def go() -> tuple[int, list[OptOut]]:
        store = x.state_store(scope.settings)
        try:
            total = await _call(store.optout_count(scope.key))
            shown: list[OptOut] = []
            cursor: str | None = ""
            while cursor is not None and len(shown) < limit:
                page, cursor = await _call(store.optout_page(scope.key, cursor, min(1000, limit)))
                shown += page
            return total, shown[:limit]
        finally:
            await store.close()

    total, shown = asyncio.run(go())
    rows = [_row(e, show_number) for e in shown]
    if as_json:
        x.emit_json({"scope": scope.label, "total": total, "entries": rows})
    else:
        x.table(
            f"opt-outs of {scope.label}: {total}",
            ["number", "at", "via", "source", "by"],
            [list(r.values()) for r in rows],
        )
    return x.OK


@optout.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@_scope_options
@click.option("--source", default=None, help="Where these came from (default: the file's name).")
@click.option("--json", "as_json", is_flag=True)
def import_(
    file: io.TextIOBase, account: str | None, everyone: bool, sandbox: bool, source: str | None, as_json: bool
) -> int:
    """Add every number of FILE (`-`: standard input): one per line, or CSV whose first column is
    the number and whose optional second and third are the source and the time (RFC 3339). Lines
    that hold no valid number are counted and named, the rest imported; exit 1 when there were any."""
    scope = Scope(account, everyone, sandbox)
    default_source = source if source is not None else (getattr(file, "name", "") or "import")
    who, now = _operator(), time.time()
    bad: list[int] = []

    def entries() -> Iterator[OptOut]:
        for n, row in enumerate(csv.reader(file), start=1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            try:
                number = scope.number(row[0])
                at = _at(row[2]) if len(row) > 2 and row[2].strip() else now
            except (InvalidNumber, ValueError):
                if not (n == 1 and not any(ch.isdigit() for ch in row[0])):  # a header line is no error
                    bad.append(n)
                continue
            yield OptOut(
                number, at, "import", row[1].strip() if len(row) > 1 and row[1].strip() else default_source, who
            )

    async def go() -> tuple[int, int]:
        store = x.state_store(scope.settings)
        added = seen = 0
        try:
            chunk: list[OptOut] = []
            for entry in entries():
                chunk.append(entry)
                if len(chunk) >= CHUNK:
                    added += await _call(store.optout_add(scope.key, chunk))
                    seen += len(chunk)
                    chunk = []
            if chunk:
                added += await _call(store.optout_add(scope.key, chunk))
                seen += len(chunk)
        finally:
            await store.close()
        return added, seen

    added, seen = asyncio.run(go())
    doc: dict[str, Any] = {"scope": scope.label, "read": seen, "added": added, "invalid": len(bad)}
    if bad:
        doc["invalid_lines"] = bad[:20]
    _report(doc, as_json)
    return x.FAILED if bad else x.OK


@optout.command("export")
@_scope_options
def export(account: str | None, everyone: bool, sandbox: bool) -> int:
    """Every entry as CSV on standard output: number, at, via, source, by (numbers in full: this is
    the registry itself, for a backup or another system)."""
    scope = Scope(account, everyone, sandbox)
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["number", "at", "via", "source", "by"])

    async def go() -> None:
        store = x.state_store(scope.settings)
        try:
            cursor: str | None = ""
            while cursor is not None:
                page, cursor = await _call(store.optout_page(scope.key, cursor, 5000))
                for e in page:
                    out.writerow(list(_row(e, True).values()))
        finally:
            await store.close()

    asyncio.run(go())
    return x.OK


def _row(e: OptOut, show_number: bool) -> dict[str, str]:
    at = rfc3339(datetime.fromtimestamp(e.at, UTC).replace(microsecond=0))
    return {
        "number": e.number if show_number else str(mask(e.number)),
        "at": at,
        "via": e.via,
        "source": e.source,
        "by": e.by,
    }


def _at(text: str) -> float:
    ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (a container's arbitrary user)
        return ""


def _report(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        x.emit_json(doc)
    else:
        click.echo(", ".join(f"{k} {v}" for k, v in doc.items()))


async def _add(scope: Scope, entries: list[OptOut]) -> int:
    store = x.state_store(scope.settings)
    try:
        return await _call(store.optout_add(scope.key, entries))
    finally:
        await store.close()
