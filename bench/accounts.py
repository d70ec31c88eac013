"""What configured accounts cost an idle replica and the broker: `python -m bench.accounts [--counts 10,300,1000]`.

For each count, on a RabbitMQ node of its own (the chaos suite's, so the machine's broker is not
filled with thousands of queues) and the embedded SQLite store: a gateway process with that many
sandbox accounts is started, and the bench prints how long until `/readyz` answers 200, its idle
CPU over `--idle` seconds (from /proc, user + system), its RSS, and the broker node's memory before
and after (per account). The counts run one after another on the same node (stopped at the end),
each with accounts of its own names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from testkit import start_sandbox
from testkit.bus import account_doc
from testkit.processes import Process, gateway_env
from testkit.services import free_port
from tests.chaos.harness import RabbitNode, infrastructure

TICK = 100  # clock ticks a second (/proc/<pid>/stat), Linux's USER_HZ


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def broker_mb(node: RabbitNode) -> float:
    return int(node.ctl("eval", "erlang:memory(total).").strip().rstrip(".")) / 2**20


def one(root: Path, node: RabbitNode, sandbox_port: int, n: int, idle_s: float) -> dict[str, Any]:
    names = [f"bench{n}x{i:04d}" for i in range(n)]
    docs = [account_doc(name, sandbox_port) for name in names]
    before = broker_mb(node)
    port = free_port()
    accounts_file = root / f"accounts-{n}.json"  # a thousand accounts outgrow one environment variable
    accounts_file.write_text(json.dumps(docs))
    env = gateway_env(
        accounts_file=str(accounts_file),
        http_port=port,
        amqp_url=node.url,
        state_path=str(root / f"state-{n}.sqlite3"),
        log_level="WARNING",
    )
    started = time.monotonic()
    proc = Process(["run"], env, root / f"gateway-{n}.log")
    ready_s = None
    try:
        while time.monotonic() - started < 300:
            if proc.popen.poll() is not None:
                break
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    ready_s = time.monotonic() - started
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pid = proc.popen.pid
        out: dict[str, Any] = {"accounts": n, "ready_s": None if ready_s is None else round(ready_s, 1)}
        if ready_s is None:
            out["error"] = "not ready: " + (root / f"gateway-{n}.log").read_text(errors="replace")[-600:]
            return out
        time.sleep(3)  # the start-up's own work settles
        c0, t0 = cpu_s(pid), time.monotonic()
        time.sleep(idle_s)
        out["idle_cpu_pct"] = round(100 * (cpu_s(pid) - c0) / (time.monotonic() - t0), 2)
        out["rss_mb"] = round(rss_mb(pid), 1)
        after = broker_mb(node)
        out["broker_mb"] = round(after - before, 1)
        out["broker_kb_per_account"] = round(1024 * (after - before) / n, 1)
        return out
    finally:
        proc.terminate(60)
        proc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="10,300,1000")
    parser.add_argument("--idle", type=float, default=15.0)
    args = parser.parse_args()
    rows = []
    node_pid = None
    try:
        with infrastructure(1) as (root, nodes, _redis):
            node_pid = int((nodes[0].root / "node.pid").read_text().strip() or 0) or None
            proc, sandbox = start_sandbox(root)
            try:
                for n in (int(x) for x in args.counts.split(",")):
                    row = one(root, nodes[0], sandbox.port, n, args.idle)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                proc.close()
    finally:
        # A node holding thousands of quorum queues may outlast `rabbitmqctl stop`'s minute.
        if node_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node_pid, signal.SIGKILL)
    print("| accounts | ready after | idle CPU | RSS | broker memory (per account) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['accounts']:,} | not ready | - | - | - |")
            continue
        print(
            f"| {r['accounts']:,} | {r['ready_s']} s | {r['idle_cpu_pct']}% of a core | {r['rss_mb']:.0f} MB | "
            f"{r['broker_mb']:.0f} MB ({r['broker_kb_per_account']:.0f} KB) |"
        )


if __name__ == "__main__":
    main()
