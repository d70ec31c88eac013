"""`python -m tests.chaos [--size ci|full] [--only NAME ...]`: run chaos scenarios, print the
ledger table, write it to tests/chaos/results/<size>.md and .json. Exit 1 when any scenario lost
a message, sent one twice, or did not get its consumers back."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from tests.chaos.harness import HEADER, Ledger, infrastructure
from tests.chaos.scenarios import CI, CI_SCENARIOS, CLUSTER, FULL, SINGLE_NODE, Scenario, Size

RESULTS = Path(__file__).resolve().parent / "results"


async def _run_one(name: str, fn: Scenario, root: Path, nodes: list, redis_server: object, size: Size) -> Ledger:  # type: ignore[type-arg]
    started = time.monotonic()
    try:
        return await fn(root, nodes, redis_server, size)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - a scenario that blew up is reported, the others still run
        led = Ledger(name, consumers_restored=False)
        led.notes.append(f"scenario error: {type(exc).__name__}: {exc}")
        led.seconds = time.monotonic() - started
        traceback.print_exc()
        return led


def run(size: Size, only: list[str]) -> list[Ledger]:
    ledgers: list[Ledger] = []
    for nodes_wanted, scenarios in ((1, SINGLE_NODE), (3, CLUSTER)):
        chosen = [n for n in scenarios if n in only]
        if not chosen:
            continue
        with infrastructure(nodes_wanted) as (root, nodes, redis_server):
            for name in chosen:
                print(f"== {name}", flush=True)
                led = asyncio.run(_run_one(name, scenarios[name], root, nodes, redis_server, size))
                print(HEADER.splitlines()[0], led.row(), *led.notes[:5], sep="\n", flush=True)
                ledgers.append(led)
    return ledgers


def _exit_on_term(_signum: int, _frame: object) -> None:
    raise SystemExit(143)  # unwinds through `infrastructure`, which stops the suite's nodes and Redis


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_term)
    parser = argparse.ArgumentParser(prog="python -m tests.chaos")
    parser.add_argument("--size", choices=["ci", "full"], default="full")
    parser.add_argument("--only", nargs="*", help=f"scenarios, from: {', '.join([*SINGLE_NODE, *CLUSTER])}")
    args = parser.parse_args()
    size = FULL if args.size == "full" else CI
    only = args.only or ([*SINGLE_NODE, *CLUSTER] if size is FULL else CI_SCENARIOS)
    ledgers = run(size, only)
    table = "\n".join([HEADER, *(led.row() for led in ledgers)])
    notes = [f"- {led.scenario}: {n}" for led in ledgers for n in led.notes[:10]]
    print("\n" + table + ("\n\n" + "\n".join(notes) if notes else ""))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (RESULTS / f"{size.name}.md").write_text(
        f"Chaos run ({size.name}), {stamp}\n\n{table}\n\n" + "\n".join(notes) + "\n"
    )
    (RESULTS / f"{size.name}.json").write_text(json.dumps([asdict(led) for led in ledgers], indent=1) + "\n")
    return 0 if ledgers and all(led.ok for led in ledgers) else 1


if __name__ == "__main__":
    sys.exit(main())
