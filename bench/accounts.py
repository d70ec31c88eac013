"""What configured accounts cost a replica and the broker: `python -m bench.accounts [--counts 10,1000]`.

Everything runs on a RabbitMQ node of the bench's own (the chaos suite's, so the machine's broker
is not filled with thousands of queues), the embedded SQLite store and the sandbox. For each count
N, with accounts of their own names:
- **first start**: a gateway with N accounts on a node without their queues; seconds until
  `/readyz` answers 200, then its idle CPU over `--idle` seconds (from /proc, user + system), its
  RSS, the broker node's memory before and after (per account) and the node's CPU meanwhile (the
  node holds the bench's queues and nothing else);
- **restart**: the same gateway stopped and started again, the queues there (what a rollout, a
  crash or a new replica does);
- **the broker's floor**: N other accounts' queues declared alone, the way start-up declares them
  (8 channels at once): how long the node itself takes to create them. A first start cannot be
  ready sooner than this.

With `--drain K`, the traffic comparison, interleaved (`--reps` each): K requests queued for each
of 10 accounts, then a gateway started on that backlog, configured with only those 10 or with
those 10 among N (they start last). From the outcome of the first quarter to that of nine tenths
(the drain with a backlog, neither the ramp-up nor a straggler's retry): the drain rate and the
gateway's and the broker node's CPU per message; also how long after ready that window opened, the gateway's peak RSS
and the warnings it logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import httpx

from bench.run import peak_rss_mb
from gateway import contract as c
from gateway.bus import topology
from testkit import start_sandbox
from testkit.bus import account_doc, request
from testkit.processes import Process, gateway_env
from testkit.services import free_port
from tests.chaos.harness import RabbitNode, infrastructure

TICK = 100  # clock ticks a second (/proc/<pid>/stat), Linux's USER_HZ
HOT = 10  # accounts with traffic in the drain comparison
RETRY_SCHEDULE_S = [1.0, 5.0, 30.0]


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


class World:
    def __init__(self, root: Path, node: RabbitNode, sandbox_port: int) -> None:
        self.root = root
        self.node = node
        self.sandbox_port = sandbox_port

    def start(
        self, label: str, names: list[str], on_spawn: Callable[[Process], None] | None = None, **doc: Any
    ) -> tuple[Process, int, float | None]:
        """A gateway with these accounts; returns it, its HTTP port and the seconds until ready.
        `on_spawn` is given the process as soon as it runs."""
        port = free_port()
        accounts_file = self.root / f"accounts-{label}.json"  # a thousand accounts outgrow one variable
        accounts_file.write_text(json.dumps([account_doc(n, self.sandbox_port, **doc) for n in names]))
        env = gateway_env(
            accounts_file=str(accounts_file),
            http_port=port,
            amqp_url=self.node.url,
            state_path=str(self.root / f"state-{label}.sqlite3"),
            retry_schedule_s=RETRY_SCHEDULE_S,
            log_level="WARNING",
        )
        started = time.monotonic()
        proc = Process(["run"], env, self.root / f"gateway-{label}.log")
        if on_spawn is not None:
            on_spawn(proc)
        while time.monotonic() - started < 300 and proc.popen.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    return proc, port, time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return proc, port, None

    def node_pid(self) -> int:
        return int((self.node.root / "node.pid").read_text().strip())

    def stop(self, proc: Process) -> None:
        proc.terminate(60)
        proc.close()

    async def floor(self, names: list[str]) -> float:
        """Declare these accounts' queues as start-up does (8 at once), nothing else."""
        connection = await aio_pika.connect(self.node.url)
        async with connection:
            channels = [await connection.channel() for _ in range(8)]
            await topology.declare(channels[0], [], RETRY_SCHEDULE_S)
            pending = list(names)
            began = time.monotonic()

            async def declare(channel: aio_pika.abc.AbstractChannel) -> None:
                while pending:
                    await topology.declare_account(channel, pending.pop())

            await asyncio.gather(*(declare(ch) for ch in channels))
            took = time.monotonic() - began
            # Deleted again: the drains after run on the node as the gateway's accounts left it.
            doomed = [c.account_queue(n, lane) for n in names for lane in c.LANES]

            async def delete(channel: aio_pika.abc.AbstractChannel) -> None:
                while doomed:
                    await channel.queue_delete(doomed.pop())

            await asyncio.gather(*(delete(ch) for ch in channels))
            return took

    async def declare(self, names: list[str]) -> None:
        connection = await aio_pika.connect(self.node.url)
        async with connection:
            channel = await connection.channel()
            await topology.declare(channel, names, RETRY_SCHEDULE_S)

    async def drain(self, label: str, names: list[str], hot: list[str], per_account: int) -> dict[str, Any]:
        """`per_account` requests queued for each `hot` account, then a gateway with `names`
        started on that backlog. Measured from the outcome of the first quarter to that of nine
        tenths (what it drains with a backlog, neither the ramp-up nor a straggler's retry): the
        drain rate and the gateway's and the node's CPU seconds per 1,000 messages; also how long
        after `/readyz` that window opened (the hot accounts start last, so a positive figure means
        the window leaves start-up out), the gateway's peak RSS and the warnings it logged."""
        connection = await aio_pika.connect(self.node.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            total = per_account * len(hot)
            for a in hot:
                await (await channel.get_queue(c.account_queue(a))).purge()
            times: list[float] = []
            first, last = total // 4, total * 9 // 10
            cpu: dict[int, float] = {}  # the gateway's CPU seconds at the first and the last outcome counted
            node_cpu: dict[int, float] = {}  # the broker node's, at the same outcomes
            node_pid = self.node_pid()
            gateway: list[Process] = []  # given by `start` as soon as it runs
            done = asyncio.Event()

            async def on(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
                times.append(time.time())
                if len(times) - 1 in (first, last):
                    cpu[len(times) - 1] = cpu_s(gateway[0].popen.pid)
                    node_cpu[len(times) - 1] = cpu_s(node_pid)
                if len(times) >= total:
                    done.set()

            listen = await connection.channel()
            await listen.set_qos(prefetch_count=2000)
            outcomes = await listen.get_exchange(c.OUTCOMES_EXCHANGE)
            queue = await listen.declare_queue("", exclusive=True)
            for a in hot:
                await queue.bind(outcomes, routing_key=f"*.{a}")
            await queue.consume(on, no_ack=True)
            exchange = await channel.get_exchange(c.SEND_EXCHANGE)
            tag = secrets.token_hex(3)
            for start in range(0, total, 1000):
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(
                                request(f"{tag}-{i}", to=f"+4850{i % 10_000_000:07d}"),
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            ),
                            routing_key=hot[i % len(hot)],
                        )
                        for i in range(start, min(total, start + 1000))
                    )
                )
            try:
                proc, _port, ready = await asyncio.to_thread(
                    self.start, label, names, gateway.append, rate_per_s=100_000, burst=100_000, linger_ms=100
                )
                ready_at = time.time()
                if ready is None:
                    raise RuntimeError(f"{label}: not ready: {proc.log()[-600:]}")
                await asyncio.wait_for(done.wait(), 600)
                warnings = Counter(
                    e["event"]
                    for e in map(_json_line, proc.log().splitlines())
                    if e.get("level") in ("warning", "error") and e.get("event") not in ("gc_pause", "loop_stalled")
                )
                return {
                    "msg_s": (last - first) / (times[last] - times[first]),
                    "cpu_s_per_1k": 1000 * (cpu[last] - cpu[first]) / (last - first),
                    "node_cpu_s_per_1k": 1000 * (node_cpu[last] - node_cpu[first]) / (last - first),
                    "window_after_ready_s": round(times[first] - ready_at, 1),
                    "peak_rss_mb": peak_rss_mb(proc.popen.pid),
                    "warnings": dict(warnings),
                }
            finally:
                for started in gateway:
                    self.stop(started)


def _json_line(line: str) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def one(world: World, n: int, idle_s: float) -> dict[str, Any]:
    names = [f"bench{n}x{i:04d}" for i in range(n)]
    before = broker_mb(world.node)
    proc, _port, ready = world.start(f"{n}", names)
    out: dict[str, Any] = {"accounts": n, "ready_s": None if ready is None else round(ready, 1)}
    try:
        if ready is None:
            out["error"] = "not ready: " + proc.log()[-600:]
            return out
        pid, node_pid = proc.popen.pid, world.node_pid()
        time.sleep(3)  # the start-up's own work settles
        c0, b0, t0 = cpu_s(pid), cpu_s(node_pid), time.monotonic()
        time.sleep(idle_s)
        out["idle_cpu_pct"] = round(100 * (cpu_s(pid) - c0) / (time.monotonic() - t0), 2)
        out["broker_idle_cpu_pct"] = round(100 * (cpu_s(node_pid) - b0) / (time.monotonic() - t0), 1)
        out["rss_mb"] = round(rss_mb(pid), 1)
        after = broker_mb(world.node)
        out["broker_mb"] = round(after - before, 1)
        out["broker_kb_per_account"] = round(1024 * (after - before) / n, 1)
    finally:
        world.stop(proc)
    proc, _port, ready = world.start(f"{n}-again", names)
    world.stop(proc)
    out["restart_ready_s"] = None if ready is None else round(ready, 1)
    out["broker_floor_s"] = round(await world.floor([f"floor{n}x{i:04d}" for i in range(n)]), 1)
    return out


async def drains(world: World, n: int, per_account: int, reps: int) -> dict[str, Any]:
    names = [f"bench{n}x{i:04d}" for i in range(n)]
    await world.declare(names)  # there already when `one` ran first
    # The last ones: start-up declares and consumes the accounts in order, so these consume last,
    # when every other configured account consumes already.
    hot = names[-HOT:]
    rates: dict[str, list[float]] = {"only": [], "among": []}
    cpus: dict[str, list[float]] = {"only": [], "among": []}
    for rep in range(reps):
        for kind, configured in (("only", hot), ("among", names)):
            got = await world.drain(f"drain-{kind}-{rep}", configured, hot, per_account)
            rates[kind].append(got["msg_s"])
            cpus[kind].append(got["cpu_s_per_1k"])
            row = {"drain": kind, "configured": len(configured), "rep": rep}
            row |= {k: round(v, 3) if isinstance(v, float) else v for k, v in got.items()}
            print(json.dumps(row), flush=True)
    only, among = statistics.median(rates["only"]), statistics.median(rates["among"])
    cpu_only, cpu_among = statistics.median(cpus["only"]), statistics.median(cpus["among"])
    return {
        "accounts": n,
        "only_msg_s": round(only),
        "among_msg_s": round(among),
        "ratio": round(among / only, 3),
        "only_cpu_s_per_1k": round(cpu_only, 3),
        "among_cpu_s_per_1k": round(cpu_among, 3),
        "cpu_ratio": round(cpu_among / cpu_only, 3),
    }


async def bench(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    traffic: list[dict[str, Any]] = []
    node_pid = None
    try:
        with infrastructure(1) as (root, nodes, _redis):
            node_pid = int((nodes[0].root / "node.pid").read_text().strip() or 0) or None
            proc, sandbox = start_sandbox(root)
            world = World(root, nodes[0], sandbox.port)
            try:
                counts = [int(x) for x in args.counts.split(",")]
                for n in [] if args.only_drain else counts:
                    row = await one(world, n, args.idle)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                if args.drain:
                    traffic.append(await drains(world, max(counts), args.drain, args.reps))
            finally:
                proc.close()
    finally:
        # A node holding thousands of quorum queues may outlast `rabbitmqctl stop`'s minute.
        if node_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node_pid, signal.SIGKILL)
    return rows, traffic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="10,1000")
    parser.add_argument("--idle", type=float, default=15.0)
    parser.add_argument("--drain", type=int, default=0, help="requests per account with traffic (0: no drain)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--only-drain", action="store_true", help="the drain comparison alone, at the largest count")
    args = parser.parse_args()
    rows, traffic = asyncio.run(bench(args))
    print(
        "| accounts | first start: ready | restart: ready | broker's floor | idle CPU | RSS "
        "| broker memory (per account) | broker idle CPU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['accounts']:,} | not ready | - | - | - | - | - | - |")
            continue
        print(
            f"| {r['accounts']:,} | {r['ready_s']} s | {r['restart_ready_s']} s | {r['broker_floor_s']} s | "
            f"{r['idle_cpu_pct']}% of a core | {r['rss_mb']:.0f} MB | "
            f"{r['broker_mb']:.0f} MB ({r['broker_kb_per_account']:.0f} KB) | {r['broker_idle_cpu_pct']}% |"
        )
    for t in traffic:
        print(
            f"\ntraffic on {HOT} accounts: {t['only_msg_s']:,} msg/s configured alone, "
            f"{t['among_msg_s']:,} msg/s among {t['accounts']:,} (ratio {t['ratio']}); the gateway's CPU "
            f"{t['only_cpu_s_per_1k']} against {t['among_cpu_s_per_1k']} s per 1,000 (ratio {t['cpu_ratio']})"
        )


if __name__ == "__main__":
    main()
