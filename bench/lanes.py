"""Send classes under a campaign: urgent requests beside a bulk backlog that fills one account's rate.

Two gateway replicas share Redis (the rate budget and the lanes' priority are the store's); one
account at `--rate` messages per second; a backlog of `--backlog` requests drains while urgent
requests are published at `--urgent-rate` per second for `--seconds`. Printed for each mode, in
the same run, on the same machine:

- lanes on: the backlog in `<account>.bulk`, the urgent requests in `<account>.urgent`;
- lanes off: everything in `<account>` (one FIFO queue, as before lanes existed).

Figures: the urgent requests' latency (publish to outcome, p50 / p99 / max, with the provider's
latency `--latency-ms` inside it) and the bulk lane's throughput while they flow, as a share of
the account's rate.

    python -m bench.lanes                          # 20,000 backlog, 200/s, urgent 5/s for 30 s
    python -m bench.lanes --backlog 100000 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from gateway import contract as c
from gateway.bus import topology
from testkit import AMQP_URL, REDIS_URL, Process, delete_account_queues, free_port, gateway_env, start_sandbox

ROOT = Path(__file__).resolve().parent.parent
RETRY_SCHEDULE_S = [1, 5, 30, 120, 600, 1800]


class Watch:
    """Outcomes of one account: when each arrived, and the urgent ones' latency."""

    def __init__(self, account: str) -> None:
        self.account = account
        self.bulk_at: list[float] = []
        self.urgent_ms: list[float] = []
        self._connection: Any = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(AMQP_URL)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=2000)
        exchange = await channel.declare_exchange(c.OUTCOMES_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(exchange, routing_key=f"*.{self.account}")
        await queue.consume(self._on, no_ack=True)

    async def _on(self, message: AbstractIncomingMessage) -> None:
        now = time.time()
        meta = json.loads(message.body).get("meta") or {}
        if "urgent" in meta:
            self.urgent_ms.append((now - meta["urgent"]) * 1000)
        else:
            self.bulk_at.append(now)

    async def close(self) -> None:
        await self._connection.close()


def body(tag: str, i: int, meta: dict[str, Any] | None = None) -> bytes:
    doc: dict[str, Any] = {
        "unique_id": f"{tag}-{i}",
        "to": f"+4850{i % 10_000_000:07d}",
        "text": f"Code {i % 10_000:04d}",
    }
    if meta:
        doc["meta"] = meta
    return json.dumps(doc).encode()


async def prefill(account: str, routing_key: str, n: int, tag: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, [account], RETRY_SCHEDULE_S)
        exchange = await channel.get_exchange(c.SEND_EXCHANGE)
        for start in range(0, n, 500):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body(tag, i), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=routing_key,
                    )
                    for i in range(start, min(n, start + 500))
                )
            )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def one_mode(args: argparse.Namespace, lanes: bool, sandbox_url: str, tmp: Path) -> dict[str, Any]:
    tag = secrets.token_hex(3)
    account = f"lanes{tag}"
    bulk_key = c.lane_key(account, c.Lane.BULK if lanes else c.Lane.NORMAL)
    urgent_key = c.lane_key(account, c.Lane.URGENT if lanes else c.Lane.NORMAL)
    await prefill(account, bulk_key, args.backlog, tag)
    watch = Watch(account)
    await watch.start()
    doc = {
        "name": account,
        "provider": "serwersms",
        "base_url": sandbox_url,
        "token": f"tok-{account}",
        "rate_per_s": args.rate,
        "burst": max(1, args.rate // 10),
        "batch_size": 100,
    }
    procs = []
    try:
        for i in range(args.replicas):
            env = gateway_env(
                accounts=[doc], http_port=free_port(), redis_url=REDIS_URL, log_level="WARNING", dlr={"enabled": False}
            )
            procs.append(Process(["run"], env, tmp / f"gateway-{tag}-{i}.log", cwd=ROOT))
        # The backlog drains at the account's rate; the urgent requests come once it does.
        deadline = time.monotonic() + 120
        while len(watch.bulk_at) < args.rate * 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the backlog does not drain:\n" + procs[0].log()[-2000:])
            await asyncio.sleep(0.1)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(c.SEND_EXCHANGE)
            started = time.time()
            sent = 0
            while time.time() < started + args.seconds:
                await exchange.publish(
                    aio_pika.Message(
                        body(f"{tag}u", sent, {"urgent": time.time()}),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        timestamp=time.time(),
                    ),
                    routing_key=urgent_key,
                )
                sent += 1
                await asyncio.sleep(max(0.0, started + sent / args.urgent_rate - time.time()))
            ended = time.time()
        deadline = time.monotonic() + args.backlog / args.rate + 120
        while len(watch.urgent_ms) < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        in_window = [t for t in watch.bulk_at if started <= t < ended]
        bulk_rate = len(in_window) / (ended - started)
        result = {
            "mode": "lanes on" if lanes else "lanes off (one queue)",
            "urgent_sent": sent,
            "urgent_answered": len(watch.urgent_ms),
            "urgent_p50_ms": round(statistics.median(watch.urgent_ms), 1) if watch.urgent_ms else None,
            "urgent_p99_ms": round(pct(watch.urgent_ms, 0.99), 1) if watch.urgent_ms else None,
            "urgent_max_ms": round(max(watch.urgent_ms), 1) if watch.urgent_ms else None,
            "bulk_per_s": round(bulk_rate, 1),
            "bulk_share_of_rate": round(bulk_rate / args.rate, 3),
            "urgent_slowest_ms": [round(x) for x in sorted(watch.urgent_ms)[-5:]],
        }
    finally:
        for proc in procs:
            proc.terminate(60)
            proc.close()
        await watch.close()
        await delete_account_queues([account])
    print(json.dumps(result), flush=True)
    return result


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sandbox_proc, sandbox = start_sandbox(tmp)
        try:
            if args.latency_ms:
                sandbox.fault(latency_ms=args.latency_ms)
            results = []
            for lanes in (False, True):
                results.append(await one_mode(args, lanes, sandbox.url, tmp))
        finally:
            sandbox_proc.terminate(30)
            sandbox_proc.close()
    print(
        f"\n{args.replicas} replicas sharing Redis, one account at {args.rate}/s, {args.backlog:,} queued, "
        f"urgent {args.urgent_rate}/s for {args.seconds} s, provider latency {args.latency_ms} ms\n"
    )
    print(
        "| mode | urgent answered | urgent p50 ms | urgent p99 ms | urgent max ms | bulk msg/s | bulk share of rate |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['urgent_answered']}/{r['urgent_sent']} | {r['urgent_p50_ms']} | "
            f"{r['urgent_p99_ms']} | {r['urgent_max_ms']} | {r['bulk_per_s']} | {r['bulk_share_of_rate']} |"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lanes", description=__doc__.split("\n")[0])
    parser.add_argument("--backlog", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--urgent-rate", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--replicas", type=int, default=2)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
