"""`python -m bench.profile [drain]`: the gateway under py-spy (sampling CPU, native off) while it
drains a prefilled backlog of `drain` requests over 10 accounts. Writes
bench/results/profile-<label>.txt: the top functions by own and total CPU time."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.run import RESULTS, SMOKE, Bench
from testkit import REDIS_URL, Process, free_port, gateway_env


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


async def main(bench: Bench, drain: int, label: str) -> None:
    tmp = bench.tmp
    try:
        await bench.observer.start()
        bench.latency(0)
        await bench.prefill(0)
        port = free_port()
        env = gateway_env(
            accounts=bench.account_docs(),
            http_port=port,
            redis_url=REDIS_URL,
            state_path=str(tmp / "state.sqlite3"),
            log_level="WARNING",
        )
        raw = RESULTS / f"profile-{label}.raw"
        await bench.prefill(drain)  # as in the drain benchmark: the backlog is there before the gateway starts
        gateway = Process([], env, tmp / "profiled.log", Path.cwd(), command=[sys.executable, "-m", "gateway", "run"])
        gateway.wait_http(port)
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
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            gateway.terminate(60)
            gateway.close()
        out = RESULTS / f"profile-{label}.txt"
        out.write_text(summarize(raw))
        print(f"profile written to {out}")
    finally:
        await bench.observer.close()


def profile(drain: int, label: str) -> None:
    (RESULTS / "work").mkdir(parents=True, exist_ok=True)
    bench = Bench(dict(SMOKE), RESULTS / "work")
    try:
        asyncio.run(main(bench, drain, label))
    finally:
        bench.close()  # runs its own event loop


if __name__ == "__main__":
    profile(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000, sys.argv[2] if len(sys.argv) > 2 else "latest")
