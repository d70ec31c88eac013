"""A latency-sensitive producer in a process of its own: it publishes one request every `interval`
seconds to an account and waits for each one's outcome on a queue of its own, bound to that
account's outcomes only, as an application that sends login codes would. It prints one JSON line:
the milliseconds from each publish to its outcome, in publish order, and of those the part after
the gateway wrote the outcome (its `at`, on the same machine's clock) until the probe read it.

The chaos runner's own observer reads every outcome of the run through one queue, so a request's
outcome seen there waits behind the other accounts' outcomes in that queue and in that process:
what a quiet account's own producer sees is measured here instead.

    python -m tests.chaos.probe AMQP_URL ROUTING_KEY PREFIX COUNT INTERVAL_S
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from datetime import datetime

import aio_pika

from gateway import contract as c
from tests.chaos.harness import request_body


async def probe(
    url: str, routing_key: str, prefix: str, count: int, interval_s: float
) -> tuple[list[float | None], list[float | None]]:
    account, _lane = c.split_key(routing_key)
    sent_at: dict[str, float] = {}
    seen_at: dict[str, float] = {}
    made_at: dict[str, float] = {}  # the outcome's own `at`: when the gateway wrote it (same clock)
    done = asyncio.Event()
    connection = await aio_pika.connect(url + "?name=chaos-probe")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(c.OUTCOMES_EXCHANGE, routing_key=f"*.{account}")

        async def on_outcome(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            doc = json.loads(message.body)
            uid = doc.get("unique_id")
            if uid in sent_at and uid not in seen_at:
                seen_at[uid] = time.monotonic()
                made_at[uid] = time.time() - datetime.fromisoformat(doc["at"].replace("Z", "+00:00")).timestamp()
                if len(seen_at) == count:
                    done.set()
            await message.ack()

        await queue.consume(on_outcome)
        exchange = await channel.get_exchange(c.SEND_EXCHANGE, ensure=False)
        start = time.monotonic()
        for i in range(count):
            # A steady rate: the next publish is due at its slot, however long this one took.
            await asyncio.sleep(max(0.0, start + i * interval_s - time.monotonic()))
            uid = f"{prefix}{i}"
            sent_at[uid] = time.monotonic()
            message = aio_pika.Message(request_body(uid, i), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, routing_key=routing_key)
        with contextlib.suppress(TimeoutError):  # the unanswered ones are reported as None
            await asyncio.wait_for(done.wait(), timeout=300)
    uids = [f"{prefix}{i}" for i in range(count)]
    total = [round((seen_at[u] - sent_at[u]) * 1000, 1) if u in seen_at else None for u in uids]
    back = [round(made_at[u] * 1000, 1) if u in made_at else None for u in uids]
    return total, back


def main() -> None:
    url, routing_key, prefix, count, interval = sys.argv[1:6]
    latencies, back = asyncio.run(probe(url, routing_key, prefix, int(count), float(interval)))
    # back_ms: from the outcome's `at` (written by the gateway) to this process reading it.
    print(json.dumps({"latency_ms": latencies, "back_ms": back}), flush=True)


if __name__ == "__main__":
    main()
