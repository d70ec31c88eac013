"""`python -m bench.profile [drain] [label] [--store redis|sqlite] [--relay]`: a process under
py-spy (sampling CPU, native off) while it drains a prefilled backlog of `drain` requests over 10
accounts: the gateway on Redis (the default) or on its embedded SQLite store, or the relay
(bench/relay.py, the ceiling). Writes bench/results/profile-<label>.txt: CPU per message split by
part, then the top functions by own and total CPU time.

The parts, each sample going to the first frame from the leaf that belongs to one:
- broker client: aio-pika, aiormq, pamqp, and the gateway's connection (bus/connect.py);
- store: redis-py, sqlite3, and gateway/state/;
- provider call: httpx, httpcore, h11, and gateway/providers/;
- gateway: the rest of the gateway's own code (and the libraries it calls: json, phonenumbers);
- event loop: samples with none of the above (asyncio's own scheduling, selectors, and the
  callbacks it runs for them).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.run import RESULTS, SMOKE, Bench, cpu_seconds
from testkit import REDIS_URL, Process, free_port, gateway_env

PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("broker client", ("aio_pika/", "aiormq/", "pamqp/", "gateway/bus/connect.py")),
    ("store", ("redis/", "sqlite3/", "gateway/state/")),
    ("provider call", ("httpx/", "httpcore/", "h11/", "gateway/providers/")),
    ("gateway", ("gateway/",)),
]
LOOP = "event loop"


def part_of(stack: list[str]) -> str:
    """The part a sample's CPU goes to: the first frame from the leaf that belongs to a part. A
    frame reads `function (path/to/file.py:line)`, its path relative to where it was imported from.
    Only the frames the event loop called count: the ones above it (the command that started the
    loop) are in every sample."""
    called = max((i for i, frame in enumerate(stack) if frame.startswith("Handle._run ")), default=-1)
    for frame in reversed(stack[called + 1 :]):
        path = frame.rpartition("(")[2]
        for name, marks in PARTS:
            if any(path.startswith(mark) or f"/{mark}" in path for mark in marks):
                return name
    return LOOP


def split(raw: Path, cpu_s: float, messages: int) -> str:
    """CPU per 1,000 messages by part, as a table: each part's share of the samples times the CPU
    measured."""
    parts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        parts[part_of(stack.split(";"))] += int(count)
    samples = sum(parts.values()) or 1
    lines = [f"CPU {cpu_s:.2f} s for {messages} messages: {cpu_s / messages * 1000:.3f} s per 1,000", ""]
    lines += ["part            s/1k    share"]
    for name in [*(n for n, _ in PARTS), LOOP]:
        share = parts[name] / samples
        lines.append(f"{name:<15} {cpu_s * share / messages * 1000:.3f}   {100 * share:5.1f}%")
    return "\n".join(lines)


def summarize(raw: Path, top: int = 40) -> str:
    """Own and total samples per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [f.split(" (")[0] + " " + f.split("(")[-1].split(":")[0].rsplit("/", 1)[-1] for f in stack.split(";")]
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    lines = [f"{samples} samples", "", "own %   function"]
    lines += [f"{100 * n / samples:5.1f}   {f}" for f, n in own.most_common(top)]
    lines += ["", "total % function"]
    lines += [f"{100 * n / samples:5.1f}   {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)


async def main(bench: Bench, drain: int, label: str, store: str, relay: bool) -> None:
    tmp = bench.tmp
    try:
        await bench.observer.start()
        bench.latency(0)
        await bench.prefill(0)
        port = free_port()
        settings = {"redis_url": REDIS_URL} if store == "redis" else {}
        env = gateway_env(
            accounts=bench.account_docs(),
            http_port=port,
            state_path=str(tmp / "state.sqlite3"),
            log_level="WARNING",
            **settings,
        )
        raw = RESULTS / f"profile-{label}.raw"
        raw.unlink(missing_ok=True)
        await bench.prefill(drain)  # as in the drain benchmark: the backlog is there before the gateway starts
        if relay:
            command = [sys.executable, "-m", "bench.relay", "--prefetch", "500", *bench.accounts]
        else:
            command = [sys.executable, "-m", "gateway", "run"]
        gateway = Process([], env, tmp / "profiled.log", Path.cwd(), command=command)
        if not relay:
            gateway.wait_http(port)
        while await bench.consumers(bench.queues()) == 0:  # CPU from its first consumer on, as bench.run times it
            await asyncio.sleep(0.01)
        cpu0 = cpu_seconds(gateway.popen.pid)
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(gateway.popen.pid),
                "--format",
                "raw",
                "--output",
                str(raw),
                "--rate",
                "200",
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await bench.observer.wait(drain, 600)
            cpu_s = cpu_seconds(gateway.popen.pid) - cpu0
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            gateway.terminate(60)
            gateway.close()
        table = split(raw, cpu_s, drain)
        out = RESULTS / f"profile-{label}.txt"
        out.write_text(f"{'relay' if relay else 'gateway on ' + store}\n{table}\n\n{summarize(raw)}\n")
        print(f"{'relay' if relay else 'gateway on ' + store}\n{table}\nprofile written to {out}", flush=True)
    finally:
        await bench.observer.close()


def profile(drain: int, label: str, store: str = "redis", relay: bool = False) -> None:
    (RESULTS / "work").mkdir(parents=True, exist_ok=True)
    bench = Bench(dict(SMOKE), RESULTS / "work")
    try:
        asyncio.run(main(bench, drain, label, store, relay))
    finally:
        bench.close()  # runs its own event loop


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("drain", type=int, nargs="?", default=20_000)
    ap.add_argument("label", nargs="?", default="latest")
    ap.add_argument("--store", choices=["redis", "sqlite"], default="redis")
    ap.add_argument("--relay", action="store_true", help="profile the relay instead of the gateway")
    args = ap.parse_args()
    profile(args.drain, args.label, args.store, args.relay)
