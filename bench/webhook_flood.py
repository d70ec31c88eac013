"""What a webhook flood costs sending: one gateway process on the embedded default (SQLite), a
SerwerSMS account draining a backlog while a Mobizon account of the same process takes a flood of
webhooks (signed and fresh for unknown messages, badly signed, unsigned and malformed, mixed).
Drains with and without the flood alternate in the same run; the figure is the ratio of their
medians.

    python -m bench.webhook_flood                      # 3 rounds of 5,000 requests, 10,000 webhooks
    python -m bench.webhook_flood --rounds 1 --requests 1000 --webhooks 2000    # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import httpx

from gateway import contract as c
from gateway.sandbox.dlr import sign
from testkit import AMQP_URL, Process, delete_account_queues, free_port, gateway_env, start_sandbox

ROOT = Path(__file__).resolve().parent.parent
SECRET = "flood-secret"  # noqa: S105 - the sandbox webhook secret of this run
FLOOD_CONCURRENCY = 64


def webhook_bodies(n: int) -> list[tuple[bytes, str]]:
    """(body, content type): a quarter each signed-and-fresh, badly signed, unsigned, malformed."""
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    out = []
    for i in range(n):
        doc = {
            "eventId": 1_000_000 + i,
            "eventType": "sms-delivery-report",
            "eventCreateTs": created,
            "webhookId": 1,
            "attempt": 1,
            "data": {"messageId": 9_000_000 + i, "status": "DELIVRD", "to": "77010000000"},
        }
        kind = i % 4
        if kind == 0:
            doc["sign"] = sign(doc["eventId"], 1, created, SECRET)  # type: ignore[arg-type]
        elif kind == 1:
            doc["sign"] = "0" * 40
        body = json.dumps(doc).encode() if kind != 3 else b'{"eventId": ' + str(i).encode()
        out.append((body, "application/json"))
    return out


async def flood(port: int, path: str, bodies: list[tuple[bytes, str]]) -> dict[int, int]:
    """POST every body over `FLOOD_CONCURRENCY` keep-alive connections, written as raw HTTP/1.1 so
    the flooder itself costs little CPU (an httpx client of this size takes most of a core)."""
    answers: dict[int, int] = {}
    queue = list(reversed(bodies))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                body, content_type = queue.pop()
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                )
                writer.write(head.encode() + body)
                status_line = await reader.readline()
                status = int(status_line.split()[1]) if status_line else 0
                length, close = 0, False
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                    close |= name.lower() == "connection" and value.strip().lower() == "close"
                await reader.readexactly(length)
                answers[status] = answers.get(status, 0) + 1
                if close or not status_line:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(FLOOD_CONCURRENCY)))
    return answers


def run_flood(port: int, path: str, webhooks: int) -> Process:
    """The flood in a process of its own: the drain's timing must not share its event loop."""
    command = [sys.executable, "-m", "bench.webhook_flood", "--flood-port", str(port), "--flood-path", path,
               "--webhooks", str(webhooks)]  # fmt: skip
    return Process([], dict(os.environ), Path(tempfile.mkdtemp()) / "flood.log", ROOT, command=command)


async def drain(account: str, n: int, flood_at: tuple[int, str] | None, webhooks: int) -> tuple[float, str]:
    """Publish `n` requests and time them until the last outcome; with `flood_at` (port, path), a
    webhook flood runs from just before the first publish."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(c.OUTCOMES_EXCHANGE, routing_key=f"*.{account}")
        seen = asyncio.Event()
        count = 0

        async def on(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            count += 1
            if count >= n:
                seen.set()

        await queue.consume(on, no_ack=True)
        exchange = await channel.get_exchange(c.SEND_EXCHANGE)
        flooding = run_flood(*flood_at, webhooks) if flood_at else None
        if flooding is not None:
            await asyncio.sleep(0.5)  # under way before the first request
        started = time.monotonic()
        tag = secrets.token_hex(3)
        for start in range(0, n, 500):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            json.dumps({"unique_id": f"{tag}-{i}", "to": f"+4850{i:07d}", "text": "x"}).encode()
                        ),
                        routing_key=account,
                    )
                    for i in range(start, min(n, start + 500))
                )
            )
        await asyncio.wait_for(seen.wait(), 300)
        seconds = time.monotonic() - started
    answers = ""
    if flooding is not None:
        still_flooding = flooding.popen.poll() is None
        flooding.popen.wait(300)
        answers = flooding.log().strip().splitlines()[-1] + (" (outlasted the drain)" if still_flooding else "")
        flooding.close()
    return n / seconds, answers


def cpu_s(pid: int) -> float:
    """CPU seconds (user and system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def flood_alone(port: int, path: str, webhooks: int, pid: int) -> str:
    """The flood with nothing else going on: the gateway's CPU per webhook, and the flood's rate."""
    before, started = cpu_s(pid), time.monotonic()
    flooding = run_flood(port, path, webhooks)
    flooding.popen.wait(300)
    took, used = time.monotonic() - started, cpu_s(pid) - before
    answers = flooding.log().strip().splitlines()[-1]
    flooding.close()
    return f"{used / webhooks * 1e6:,.0f} us of gateway CPU per webhook ({used / took:.0%} of a core); {answers}"


async def main_async(rounds: int, n: int, webhooks: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="webhook-flood-"))
    sandbox_proc, sandbox = start_sandbox(tmp)
    tag = secrets.token_hex(3)
    send, hooks = f"flood{tag}s", f"flood{tag}m"
    accounts = [
        {"name": send, "provider": "serwersms", "base_url": sandbox.url, "token": f"tok-{send}", "rate_per_s": 100_000,
         "burst": 100_000},
        {"name": hooks, "provider": "mobizon", "base_url": sandbox.url, "api_key": f"key-{hooks}",
         "webhook_secret": SECRET},
    ]  # fmt: skip
    port = free_port()
    env = gateway_env(accounts=accounts, http_port=port, state_path=str(tmp / "state.sqlite3"))  # default INFO logs
    gateway = Process(["run"], env, tmp / "gateway.log")
    gateway.wait_http(port)
    path = f"/dlr/mobizon/{hooks}"
    quiet: list[float] = []
    flooded: list[float] = []
    try:
        await drain(send, min(n, 1000), None, 0)  # warm-up: connections, pools, the first batches
        print(f"flood alone: {await flood_alone(port, path, webhooks, gateway.popen.pid)}", flush=True)
        for r in range(rounds):
            rate, _ = await drain(send, n, None, 0)
            quiet.append(rate)
            rate_f, answers = await drain(send, n, (port, path), webhooks)
            flooded.append(rate_f)
            print(f"round {r + 1}: {rate:,.0f} msg/s quiet, {rate_f:,.0f} msg/s under the flood {answers}", flush=True)
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code
    finally:
        gateway.terminate(60)
        gateway.close()
        sandbox_proc.close()
        await delete_account_queues([send, hooks])
    ratio = statistics.median(flooded) / statistics.median(quiet)
    print(
        f"median drain: {statistics.median(quiet):,.0f} msg/s quiet, {statistics.median(flooded):,.0f} msg/s under "
        f"a {webhooks:,}-webhook flood: {ratio:.2f} of the quiet rate (target >= 0.80); healthz {health}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_flood")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--webhooks", type=int, default=10_000)
    parser.add_argument("--flood-port", type=int, help=argparse.SUPPRESS)  # the flooding child process
    parser.add_argument("--flood-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_port:
        started = time.monotonic()
        answers = asyncio.run(flood(args.flood_port, args.flood_path, webhook_bodies(args.webhooks)))
        took = time.monotonic() - started
        print(f"{args.webhooks} webhooks in {took:.1f} s ({args.webhooks / took:,.0f}/s): {answers}", flush=True)
        return 0
    return asyncio.run(main_async(args.rounds, args.requests, args.webhooks))


if __name__ == "__main__":
    sys.exit(main())
