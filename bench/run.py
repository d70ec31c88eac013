"""`make bench`: throughput, CPU, memory and latency of the gateway against the broker's ceiling and
against Celery, on this machine, all on 127.0.0.1, bounded in count and time.

Each contender runs `--reps` times, interleaved (A B C ... A B C ...), and the table shows medians.
Raw figures go to bench/results/latest.json, a chart to bench/results/latest.png.

    python -m bench.run            # the full run (about 20 minutes)
    python -m bench.run --only ceiling,gateway@0 --reps 2    # some contenders
    python -m bench.run --only latency --rate 1000           # the open-loop latency runs at shares of 1000 msg/s
    python -m bench.run --smoke    # a few thousand messages: checks that everything still runs
    python -m bench.run --base HEAD~1 --only gateway@0,base@0    # this tree against a commit, same run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from hdrh.histogram import HdrHistogram

from gateway import contract as c
from gateway.bus import topology
from testkit import AMQP_URL, REDIS_URL, Process, delete_account_queues, free_port, gateway_env, start_sandbox

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LINGER_MS = 100  # the default
ACCOUNTS = 1  # the drains measure one account: its adaptive in-flight limit is what a slow provider tests

FULL = {
    "drain": 30_000,
    "slow": 30_000,
    "celery_fast": 3_000,
    "celery_slow": 300,
    "backlog": 100_000,
    "optouts": 1_000_000,
    "latency_s": 10,
    "reps": 3,
}
SMOKE = {
    "drain": 2_000,
    "slow": 1_000,
    "celery_fast": 200,
    "celery_slow": 40,
    "backlog": 3_000,
    "optouts": 20_000,
    "latency_s": 3,
    "reps": 1,
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU of a process and its children (Celery's prefork pool)."""
    total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        try:
            total += tree_cpu(int(child))
        except OSError:
            pass
    return total


def _cpu(proc: Process) -> float:
    return cpu_seconds(proc.popen.pid)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class NotTimed(Exception):
    """A round whose figures would be wrong: it is left out of the table."""


@dataclass
class Run:
    contender: str
    rep: int
    messages: int
    seconds: float
    msgs_per_s: float
    cpu_s_per_1000: float | None = None
    peak_rss_mb: float | None = None
    http_per_sms: float | None = None


def broker_state() -> dict[str, Any]:
    """The broker as a run found it: memory, the quorum queues' log on disk, queues, messages.
    A broker whose quorum log has grown for a day drains several times slower; this shows it."""
    import httpx

    state: dict[str, Any] = {}
    try:
        auth = ("guest", "guest")
        node = httpx.get("http://127.0.0.1:15672/api/nodes", auth=auth, timeout=5).json()[0]
        overview = httpx.get("http://127.0.0.1:15672/api/overview", auth=auth, timeout=5).json()
        state["memory_mb"] = round(node["mem_used"] / 2**20, 1)
        state["queues"] = overview["object_totals"]["queues"]
        state["messages"] = overview["queue_totals"].get("messages", 0)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        state["management_api"] = f"unavailable ({type(exc).__name__})"
    try:
        out = subprocess.run(
            ["rabbitmqctl", "eval", "rabbit_mnesia:dir()."], capture_output=True, text=True, timeout=30, check=True
        )
        quorum = Path(out.stdout.strip().strip('"')) / "quorum"
        state["quorum_log_mb"] = round(sum(f.stat().st_size for f in quorum.rglob("*") if f.is_file()) / 2**20, 1)
    except (OSError, subprocess.SubprocessError) as exc:
        state["quorum_log_mb"] = f"unknown ({type(exc).__name__})"
    return state


class Observer:
    """Counts outcomes for the bench accounts; notes when each arrived and its latency."""

    def __init__(self, accounts: list[str]) -> None:
        self.accounts = accounts
        self.times: list[float] = []
        self.latency = HdrHistogram(1, 120_000_000, 3)  # microseconds
        self._connection: Any = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(AMQP_URL)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=2000)
        exchange = await channel.declare_exchange(c.OUTCOMES_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("", exclusive=True)
        for a in self.accounts:
            await queue.bind(exchange, routing_key=f"*.{a}")
        await queue.consume(self._on, no_ack=True)

    async def _on(self, message: AbstractIncomingMessage) -> None:
        now = time.time()
        self.times.append(now)
        meta = json.loads(message.body).get("meta") or {}
        if "t" in meta:
            self.latency.record_value(max(1, int((now - meta["t"]) * 1e6)))

    def reset(self) -> None:
        self.times.clear()
        self.latency.reset()

    async def wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.times) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.times)} of {n} outcomes after {timeout}s")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self._connection.close()


class Bench:
    def __init__(self, sizes: dict[str, int], tmp: Path) -> None:
        self.sizes = sizes
        self.tmp = tmp
        self.tag = secrets.token_hex(3)
        self.accounts = [f"bench{self.tag}{i}" for i in range(ACCOUNTS)]
        self.runs: list[Run] = []
        self.sandbox_proc, self.sandbox = start_sandbox(tmp)
        self.observer = Observer(self.accounts)
        self.optout_import: dict[str, Any] | None = None  # the registry's import, once the contender needs it
        self._looks: aio_pika.abc.AbstractChannel | None = None  # where `consumers` asks the broker
        self._looks_connection: aio_pika.abc.AbstractConnection | None = None

    # -- plumbing ---------------------------------------------------------------------------------

    def account_docs(self, **overrides: Any) -> list[dict[str, Any]]:
        base = {
            "provider": "serwersms",
            "base_url": self.sandbox.url,
            "rate_per_s": 100_000,
            "burst": 100_000,
            "batch_size": 100,
            "linger_ms": LINGER_MS,
            "concurrency": 4,
            "http_timeout_s": 10,
        }
        return [{"name": a, "token": f"tok-{a}", **base, **overrides} for a in self.accounts]

    def latency(self, ms: float) -> None:
        self.sandbox.clear_faults()
        if ms:
            self.sandbox.fault(latency_ms=ms)

    async def prefill(self, n: int) -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await topology.declare(channel, self.accounts, [1, 5, 30, 120, 600, 1800])
            for a in self.accounts:
                await (await channel.get_queue(c.account_queue(a))).purge()
            exchange = await channel.get_exchange(c.SEND_EXCHANGE)
            for start in range(0, n, 500):
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(self.body(i), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                            routing_key=self.accounts[i % ACCOUNTS],
                        )
                        for i in range(start, min(n, start + 500))
                    )
                )

    def body(self, i: int, **extra: Any) -> bytes:
        doc = {
            "unique_id": f"{self.tag}-{i}-{secrets.token_hex(3)}",
            "to": f"+4850{i % 10_000_000:07d}",
            "text": f"Your code is {i % 10_000:04d}",
            **extra,
        }
        return json.dumps(doc).encode()

    async def consumers(self, queues: list[str]) -> int:
        """Consumers on these queues now, asked on one channel kept for it: a connection for each
        look took tens of milliseconds, long enough for a fast contender's first outcomes to come
        before its consumer was seen (the round is then not timed)."""
        if self._looks is None or self._looks.is_closed:
            connection = await aio_pika.connect(AMQP_URL)
            self._looks = await connection.channel()
            self._looks_connection = connection
        total = 0
        for name in queues:
            queue = await self._looks.declare_queue(name, passive=True)
            total += queue.declaration_result.consumer_count or 0
        return total

    async def close_looks(self) -> None:
        if self._looks_connection is not None:
            await self._looks_connection.close()
            self._looks, self._looks_connection = None, None

    async def measure(
        self,
        name: str,
        rep: int,
        n: int,
        start: Callable[[], Process],
        cpu_of: Callable[[Process], float],
        queues: list[str],
        timeout: float,
    ) -> Run:
        """Start the contender over a prefilled backlog; time from its first consumer to the last outcome."""
        self.observer.reset()
        before = self.sandbox.ledger()["requests"]
        proc = start()
        try:
            deadline = time.monotonic() + 60
            while await self.consumers(queues) == 0:
                if time.monotonic() > deadline or proc.popen.poll() is not None:
                    raise RuntimeError(f"{name} never consumed:\n{proc.log()[-2000:]}")
                await asyncio.sleep(0.01)
            t0, cpu0 = time.time(), cpu_of(proc)
            await self.observer.wait(n, timeout)
            cpu1 = cpu_of(proc)
            if self.observer.times[0] < t0:
                # Outcomes came before the contender's consumer was seen: this round cannot be timed.
                raise NotTimed(f"{sum(t < t0 for t in self.observer.times)} outcomes came before its consumer was seen")
            seconds = max(1e-6, self.observer.times[-1] - t0)
            requests = self.sandbox.ledger()["requests"] - before
            run = Run(
                name,
                rep,
                n,
                round(seconds, 3),
                round(n / seconds, 1),
                cpu_s_per_1000=round((cpu1 - cpu0) / n * 1000, 3),
                peak_rss_mb=round(peak_rss_mb(proc.popen.pid), 1),
                http_per_sms=round(requests / n, 4) if requests > 0 else None,
            )
        finally:
            proc.terminate(60)
            proc.close()
        self.runs.append(run)
        print(
            f"  {name:<28} rep {rep}: {run.msgs_per_s:>9.1f} msg/s  cpu/1k {run.cpu_s_per_1000}s  "
            f"rss {run.peak_rss_mb} MB  http/sms {run.http_per_sms}",
            flush=True,
        )
        return run

    # -- contenders -------------------------------------------------------------------------------

    def queues(self) -> list[str]:
        return [c.account_queue(a) for a in self.accounts]

    async def ceiling(self, rep: int, writes: str = "coalesced") -> None:
        """The relay on the gateway's own connection (`writes="plain"`: aio-pika's, one socket
        write per publish)."""
        n = self.sizes["drain"]
        self.latency(0)
        await self.prefill(n)
        prefetch = 100 * (4 + 1)  # the gateway's prefetch: batch_size x (concurrency + 1)
        command = [sys.executable, "-m", "bench.relay", "--prefetch", str(prefetch), "--writes", writes, *self.accounts]

        def start() -> Process:
            return Process([], dict(os.environ), self.tmp / "relay.log", ROOT, command=command)

        name = "ceiling (aio-pika relay)" if writes == "coalesced" else "relay, plain writes"
        await self.measure(name, rep, n, start, _cpu, self.queues(), 300)

    async def raw(self, rep: int) -> None:
        """The broker's raw capacity: the same relay with nobody consuming the outcomes (the
        observer's queue is gone, so the broker drops them), timed by the relay itself."""
        n = self.sizes["drain"]
        self.latency(0)
        await self.prefill(n)
        await self.observer.close()
        log = self.tmp / f"raw-{rep}.log"
        log.unlink(missing_ok=True)
        command = [sys.executable, "-m", "bench.relay", "--prefetch", "500", "--count", str(n), *self.accounts]
        proc = Process([], dict(os.environ), log, ROOT, command=command)
        try:
            deadline = time.monotonic() + 300
            while '"relayed"' not in proc.log():
                if time.monotonic() > deadline or (proc.popen.poll() is not None and '"relayed"' not in proc.log()):
                    raise RuntimeError(f"raw relay did not finish:\n{proc.log()[-2000:]}")
                await asyncio.sleep(0.05)
            doc = json.loads(next(line for line in proc.log().splitlines() if '"relayed"' in line))
        finally:
            proc.terminate(60)
            proc.close()
            await self.observer.start()
        seconds = float(doc["seconds"])
        run = Run("raw broker (relay, outcomes unconsumed)", rep, n, round(seconds, 3), round(n / seconds, 1),
                  cpu_s_per_1000=None)  # its CPU counter would include the start-up: not comparable  # fmt: skip
        self.runs.append(run)
        print(f"  {run.contender:<28} rep {rep}: {run.msgs_per_s:>9.1f} msg/s", flush=True)

    def gateway(self, tmp: Path, *, wait: bool = True, tree: Path = ROOT, **settings: Any) -> tuple[Process, int]:
        """A gateway process; `tree` is the checkout whose `gateway` package it runs."""
        port = free_port()
        redis_url = settings.pop("redis_url", REDIS_URL)  # None: the embedded store alone
        if redis_url is not None:
            settings["redis_url"] = redis_url
        env = gateway_env(
            accounts=settings.pop("accounts", self.account_docs()),
            http_port=port,
            state_path=str(tmp / "state.sqlite3"),
            log_level="WARNING",
            **settings,
        )
        if tree != ROOT:
            env["PYTHONPATH"] = str(tree)
        proc = Process(["run"], env, tmp / f"gateway-{port}.log", cwd=tree)
        if wait:
            proc.wait_http(port)
        return proc, port

    async def gateway_drain(
        self, rep: int, latency_ms: float, n: int, name: str, tree: Path = ROOT, **settings: Any
    ) -> Run:
        self.latency(latency_ms)
        await self.prefill(n)
        start = lambda: self.gateway(self.tmp, wait=False, tree=tree, **settings)[0]  # noqa: E731
        return await self.measure(name, rep, n, start, _cpu, self.queues(), 600)

    async def optout_drain(self, rep: int) -> Run:
        """The drain of gateway@0 with the account's opt-out registry holding `optouts` entries,
        imported once through `gateway optout import`. One in a hundred of the backlog's numbers is
        among them (those requests end `rejected` / `opted_out`, an outcome like any other)."""
        if self.optout_import is None:
            self.optout_import = self.import_optouts(self.sizes["optouts"], self.sizes["drain"])
        n = self.sizes["optouts"]
        return await self.gateway_drain(rep, 0, self.sizes["drain"], f"gateway, {n:,} opt-outs @0ms")

    def import_optouts(self, n: int, drain: int) -> dict[str, Any]:
        path = self.tmp / "optouts.csv"
        backlog = [f"+4850{i:07d}" for i in range(0, drain, 100)]  # the numbers body(i) writes
        with path.open("w") as out:
            out.writelines(f"{x}\n" for x in backlog)
            out.writelines(f"+4851{j:07d}\n" for j in range(n - len(backlog)))
        env = gateway_env(accounts=self.account_docs(), redis_url=REDIS_URL, state_path=str(self.tmp / "state.sqlite3"))
        command = [sys.executable, "-m", "gateway", "optout", "import", str(path), "--account", self.accounts[0]]
        started = time.monotonic()
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False, timeout=900)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"the opt-out import failed: {done.stdout[-500:]} {done.stderr[-1500:]}")
        path.unlink()
        figure = {"entries": n, "seconds": round(seconds, 1), "per_s": round(n / seconds)}
        print(f"  opt-out import: {n:,} entries in {seconds:.1f} s ({n / seconds:,.0f}/s)", flush=True)
        return figure

    async def celery(self, rep: int, latency_ms: float, pool: str, n: int) -> None:
        self.latency(latency_ms)
        env = {**os.environ, "BENCH_SANDBOX_URL": self.sandbox.url, "PYTHONPATH": str(ROOT)}
        from bench.celery_app import app, send_sms

        app.control.purge()
        for i in range(n):
            doc = json.loads(self.body(i))
            send_sms.apply_async((self.accounts[i % ACCOUNTS], doc))
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_app",
            "worker",
            "-Q",
            "bench.celery",
            "--loglevel",
            "WARNING",
            "-P",
            pool,
        ]
        if pool == "threads":
            args += ["-c", "32"]
        label = f"celery {pool}{'-32' if pool == 'threads' else ''} @{int(latency_ms)}ms"

        def start() -> Process:
            return Process([], env, self.tmp / f"celery-{pool}.log", ROOT, command=args)

        await self.measure(label, rep, n, start, lambda p: tree_cpu(p.popen.pid), ["bench.celery"], 900)

    async def open_loop(self, rate: float, seconds: float, label: str) -> dict[str, Any]:
        """Publish at `rate` for `seconds`, stamping the intended send time; latency to the outcome."""
        connection = await aio_pika.connect(AMQP_URL)
        self.observer.reset()
        n = int(rate * seconds)
        async with connection:
            # Confirmed, but never awaited one by one: the schedule must not wait for the broker.
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(c.SEND_EXCHANGE)
            confirms = []
            start = time.time() + 0.2
            for i in range(n):
                intended = start + i / rate
                delay = intended - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                message = aio_pika.Message(
                    self.body(i, meta={"t": intended}), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                )
                confirms.append(
                    asyncio.ensure_future(exchange.publish(message, routing_key=self.accounts[i % ACCOUNTS]))
                )
            await asyncio.gather(*confirms)
        await self.observer.wait(n, 120)
        h = self.observer.latency
        result = {
            "label": label,
            "rate": round(rate, 1),
            "messages": n,
            "p50_ms": h.get_value_at_percentile(50) / 1000,
            "p99_ms": h.get_value_at_percentile(99) / 1000,
            "max_ms": h.get_max_value() / 1000,
        }
        print(
            f"  latency at {label} ({rate:.0f} msg/s): p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
            f"max {result['max_ms']:.1f} ms",
            flush=True,
        )
        return result

    async def latency_runs(self, drain_rate: float) -> list[dict[str, Any]]:
        """The gateway's open-loop latency at 10% and 50% of its drain rate, then the relay's at the
        same rates: the floor this machine, broker and observer set (the relay sends a partial
        batch within 2 ms, so nearly all of its latency is the broker's and the measurement's)."""
        self.latency(0)
        await self.prefill(0)
        results = []
        for who in ("gateway", "relay"):
            if who == "gateway":
                proc, _ = self.gateway(self.tmp)
            else:
                command = [sys.executable, "-m", "bench.relay", "--prefetch", "500", "--tick-ms", "2", "--echo-meta"]
                proc = Process(
                    [], dict(os.environ), self.tmp / "relay-latency.log", ROOT, command=[*command, *self.accounts]
                )
                deadline = time.monotonic() + 60
                while await self.consumers(self.queues()) == 0:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the relay never consumed:\n{proc.log()[-2000:]}")
                    await asyncio.sleep(0.05)
            prefix = "" if who == "gateway" else "relay "
            try:
                # Steady state is measured: a short unrecorded run first loads what a fresh process
                # loads on first use (Lua scripts, number metadata, HTTP and AMQP connections).
                await self.open_loop(drain_rate * 0.25, 2, f"{prefix}warm-up (not recorded)")
                for share in (0.1, 0.5):
                    label = f"{prefix}{int(share * 100)}%"
                    results.append(await self.open_loop(drain_rate * share, self.sizes["latency_s"], label))
            finally:
                proc.terminate(60)
                proc.close()
        return results

    async def backlog_rss(self) -> Run:
        return await self.gateway_drain(0, 0, self.sizes["backlog"], "gateway backlog (peak RSS)")

    async def shared_rate_limit(self) -> dict[str, Any]:
        """Two processes sharing Redis, one account limited: the sandbox sees at most rate + burst per second."""
        self.latency(0)
        rate, burst, n = 50, 10, 500 if self.sizes["reps"] > 1 else 200
        account = self.accounts[0]
        docs = [d for d in self.account_docs(rate_per_s=rate, burst=burst) if d["name"] == account]
        for i in range(2):
            (self.tmp / f"r{i}").mkdir(exist_ok=True)
        procs = [self.gateway(self.tmp / f"r{i}", accounts=docs) for i in range(2)]
        try:
            self.observer.reset()
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange(c.SEND_EXCHANGE)
                before = len(self.sandbox.ledger()["records"])
                await asyncio.gather(
                    *(exchange.publish(aio_pika.Message(self.body(i)), routing_key=account) for i in range(n))
                )
            await self.observer.wait(n, 120)
            times = sorted(
                r["t"] for r in self.sandbox.ledger()["records"][before:] if r["who"] == f"token:tok-{account}"
            )
            worst = max(sum(1 for t in times[i:] if t < s + 1.0) for i, s in enumerate(times))
            observed = (len(times) - burst) / (times[-1] - times[0])
            result = {
                "rate": rate,
                "burst": burst,
                "messages": n,
                "worst_1s_window": worst,
                "observed_rate": round(observed, 1),
                "within_limit": worst <= rate + burst,
            }
            print(f"  shared limit {rate}/s + {burst}: worst 1 s window {worst}, observed {observed:.1f}/s", flush=True)
            return result
        finally:
            for proc, _ in procs:
                proc.terminate(30)
                proc.close()

    async def run(
        self, only: set[str] | None = None, rate: float | None = None, base: tuple[str, Path] | None = None
    ) -> dict[str, Any]:
        await self.observer.start()
        self.broker_before = broker_state()
        s = self.sizes
        contenders: list[tuple[str, Callable[[int], Any]]] = [
            ("raw", self.raw),
            ("ceiling", self.ceiling),
            ("ceiling-plain", lambda r: self.ceiling(r, "plain")),
            ("gateway@0", lambda r: self.gateway_drain(r, 0, s["drain"], "gateway @0ms")),
            # The embedded default: the state in a local SQLite file, no Redis.
            (
                "embedded@0",
                lambda r: self.gateway_drain(r, 0, s["drain"], "gateway, embedded store @0ms", redis_url=None),
            ),
            ("gateway@200", lambda r: self.gateway_drain(r, 200, s["slow"], "gateway @200ms")),
            ("gateway@500", lambda r: self.gateway_drain(r, 500, s["slow"], "gateway @500ms")),
            # The same drain without delivery-report tracking: what writing the correlations costs.
            (
                "nodlr@0",
                lambda r: self.gateway_drain(r, 0, s["drain"], "gateway, no DLR tracking @0ms", dlr_enabled=False),
            ),
            # At 200 ms without fair admission: what holding a saturated process's batches costs a slow provider.
            (
                "nofair@200",
                lambda r: self.gateway_drain(
                    r, 200, s["slow"], "gateway, no fair admission @200ms", fair_admission=False
                ),
            ),
            # The same drain with a registry of a million opt-outs: what the check before the claim costs.
            ("optouts@0", self.optout_drain),
            ("celery-prefork@0", lambda r: self.celery(r, 0, "prefork", s["celery_fast"])),
            ("celery-threads@0", lambda r: self.celery(r, 0, "threads", s["celery_fast"])),
            ("celery-prefork@200", lambda r: self.celery(r, 200, "prefork", s["celery_slow"])),
            ("celery-threads@200", lambda r: self.celery(r, 200, "threads", s["celery_slow"])),
        ]
        if base is not None:  # the same drain, by the gateway of another commit, interleaved with this one
            ref, tree = base
            contenders[4:4] = [
                ("base@0", lambda r: self.gateway_drain(r, 0, s["drain"], f"gateway {ref} @0ms", tree=tree)),
                ("base@200", lambda r: self.gateway_drain(r, 200, s["slow"], f"gateway {ref} @200ms", tree=tree)),
                ("base@500", lambda r: self.gateway_drain(r, 500, s["slow"], f"gateway {ref} @500ms", tree=tree)),
            ]
        for rep in range(1, s["reps"] + 1):
            print(f"round {rep} of {s['reps']}", flush=True)
            for key, fn in contenders:
                if only is None or key in only:
                    try:
                        await fn(rep)
                    except NotTimed as exc:
                        print(f"  {key:<28} rep {rep}: not timed: {exc}", flush=True)
        if only is not None:
            self.broker_after = broker_state()
            if "latency" in only:  # at --rate, or at the drain rate measured in this run
                drain = rate or statistics.median(r.msgs_per_s for r in self.runs if r.contender == "gateway @0ms")
                await self.latency_runs(drain)
            await self.observer.close()
            await self.close_looks()
            return {}
        drain = statistics.median(r.msgs_per_s for r in self.runs if r.contender == "gateway @0ms")
        latencies = await self.latency_runs(drain)
        backlog = await self.backlog_rss()
        shared = await self.shared_rate_limit()
        await self.observer.close()
        await self.close_looks()
        self.broker_after = broker_state()
        return {
            "latency": latencies,
            "optout_import": self.optout_import,
            "backlog": asdict(backlog),
            "shared_rate_limit": shared,
            "broker": {"before": self.broker_before, "after": self.broker_after},
        }

    def close(self) -> None:
        self.sandbox_proc.close()
        asyncio.run(delete_account_queues(self.accounts))
        if self.optout_import is not None:  # a million entries do not stay behind in the shared Redis
            import redis

            from gateway.state.redis import optout_key

            redis.Redis.from_url(REDIS_URL).delete(optout_key(self.accounts[0]))


def summarize(runs: list[Run]) -> dict[str, dict[str, float | None]]:
    table: dict[str, dict[str, float | None]] = {}
    for name in dict.fromkeys(r.contender for r in runs):
        mine = [r for r in runs if r.contender == name]

        def med(attr: str, rows: list[Run] = mine) -> float | None:
            values = [getattr(r, attr) for r in rows if getattr(r, attr) is not None]
            return round(statistics.median(values), 3) if values else None

        table[name] = {k: med(k) for k in ("msgs_per_s", "cpu_s_per_1000", "peak_rss_mb", "http_per_sms")}
        rates = [r.msgs_per_s for r in mine]
        table[name]["min_msgs_per_s"], table[name]["max_msgs_per_s"] = min(rates), max(rates)
    return table


def render_table(table: dict[str, dict[str, float | None]], extra: dict[str, Any]) -> str:
    def rate(name: str) -> float:
        return float(table.get(name, {}).get("msgs_per_s") or 0)

    ceiling = rate("ceiling (aio-pika relay)")
    lines = [
        "| contender | msg/s median (min-max) | vs ceiling | CPU s / 1k msgs | peak RSS MB | HTTP requests / SMS |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in table.items():
        ratio = f"{(v['msgs_per_s'] or 0) / ceiling:.0%}" if ceiling else "-"
        spread = f"{v['msgs_per_s']} ({v.get('min_msgs_per_s')}-{v.get('max_msgs_per_s')})"
        cells = [name, spread, ratio, v["cpu_s_per_1000"], v["peak_rss_mb"], v["http_per_sms"]]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    lines.append("")
    broker = extra.get("broker", {})
    for when in ("before", "after"):
        b = broker.get(when, {})
        lines.append(
            f"- broker {when}: memory {b.get('memory_mb')} MB, quorum log {b.get('quorum_log_mb')} MB, "
            f"{b.get('queues')} queues, {b.get('messages')} messages"
        )
    fast, slow, slower = rate("gateway @0ms"), rate("gateway @200ms"), rate("gateway @500ms")
    celery_threads = rate("celery threads-32 @200ms") or 1
    cpu = table.get("gateway @0ms", {}).get("cpu_s_per_1000") or 0
    relay_cpu = table.get("ceiling (aio-pika relay)", {}).get("cpu_s_per_1000") or 0

    def target(text: str, ok: bool) -> str:
        return f"- {text}: {'met' if ok else 'NOT met'}"

    if fast and ceiling:
        lines.append(
            target(f"gateway @0 ms = {fast / ceiling:.2f} of the ceiling (target >= 0.9)", fast / ceiling >= 0.9)
        )
    if cpu and relay_cpu:
        lines.append(
            target(
                f"gateway CPU per message = {cpu / relay_cpu:.2f}x the relay's (target <= 1.1x)", cpu <= 1.1 * relay_cpu
            )
        )
    if fast and slow:
        lines.append(
            target(f"gateway @200 ms = {slow / fast:.0%} of its own @0 ms rate (target >= 90%)", slow >= 0.9 * fast)
        )
        versus = f"gateway @200 ms = {slow / celery_threads:.1f}x Celery with 32 threads @200 ms (target >= 20x)"
        lines.append(target(versus, slow >= 20 * celery_threads))
    if fast and slower:
        lines.append(
            target(f"gateway @500 ms = {slower / fast:.0%} of its own @0 ms rate (target >= 80%)", slower >= 0.8 * fast)
        )
    tracked, untracked = fast, rate("gateway, no DLR tracking @0ms")
    if tracked and untracked:
        lines.append(f"- delivery-report tracking on vs off: {tracked / untracked:.0%} of the drain rate")
    floor = {x["label"].removeprefix("relay "): x for x in extra["latency"] if x["label"].startswith("relay ")}
    for lat in extra["latency"]:
        if lat["label"].startswith("relay "):
            continue
        relay = floor.get(lat["label"])
        lines.append(
            f"- open-loop latency at {lat['label']} of the drain rate ({lat['rate']} msg/s): "
            f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms"
            + (
                f" (the relay at the same rate: p50 {relay['p50_ms']:.1f} ms, p99 {relay['p99_ms']:.1f} ms, "
                f"max {relay['max_ms']:.1f} ms)"
                if relay
                else ""
            )
        )
        if lat["label"] == "10%":  # provider latency 0 here
            lines.append(target("  p50 at 10% <= 20 ms", lat["p50_ms"] <= 20))
        if lat["label"] == "50%":
            lines.append(
                target(f"  p99 at 50% <= linger + 50 ms = {LINGER_MS + 50} ms", lat["p99_ms"] <= LINGER_MS + 50)
            )
    b = extra["backlog"]
    lines.append(target(f"backlog of {b['messages']}: peak RSS {b['peak_rss_mb']} MB (target <= 200 MB)",
                        (b["peak_rss_mb"] or 1e9) <= 200))  # fmt: skip
    sh = extra["shared_rate_limit"]
    lines.append(
        f"- two processes, one account at {sh['rate']}/s + burst {sh['burst']}: worst 1 s window "
        f"{sh['worst_1s_window']} sends, observed {sh['observed_rate']}/s"
    )
    return "\n".join(lines)


def chart(table: dict[str, dict[str, float | None]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    values = [table[n]["msgs_per_s"] or 0 for n in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(
        names,
        values,
        color=["#888" if n.startswith("ceiling") else "#2a7" if n.startswith("gateway") else "#c63" for n in names],
    )
    ax.set_xscale("log")
    ax.set_xlabel("messages per second (median, log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def checkout(ref: str, tmp: Path) -> tuple[str, Path]:
    """A worktree of `ref` for the base@0 contender: (its short name, its path)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True)
    path = tmp / f"base-{sha.stdout.strip()}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT, check=True)
    return sha.stdout.strip(), path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="small counts, one round")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", help="comma-separated contenders (ceiling, gateway@0, celery-threads@200, ...)")
    ap.add_argument("--reps", type=int, help="rounds (default 3; 1 with --smoke)")
    ap.add_argument("--rate", type=float, help="with --only latency: the drain rate the loads are shares of")
    ap.add_argument("--base", help="a git ref: its gateway drains too (contender base@0), for before/after figures")
    args = ap.parse_args()
    sizes = dict(SMOKE if args.smoke else FULL)
    if args.reps:
        sizes["reps"] = args.reps
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "work"
    tmp.mkdir(exist_ok=True)
    bench = Bench(sizes, tmp)
    base = checkout(args.base, tmp) if args.base else None
    try:
        only = set(args.only.split(",")) if args.only else None
        extra = asyncio.run(bench.run(only, args.rate, base))
    finally:
        bench.close()
        if base is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(base[1])], cwd=ROOT, check=False)
    if args.only:
        print(json.dumps(summarize(bench.runs), indent=2))
        return 0
    table = summarize(bench.runs)
    text = render_table(table, extra)
    doc = {
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "sizes": sizes,
        "runs": [asdict(r) for r in bench.runs],
        "medians": table,
        **extra,
        "table": text,
    }
    name = "smoke" if args.smoke else "latest"
    (args.out / f"{name}.json").write_text(json.dumps(doc, indent=2))
    chart(table, args.out / f"{name}.png")
    print(f"\nmachine: {doc['machine']}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
