"""The ceiling: a bare aio-pika relay with the gateway's broker layout and no SMS logic.

One connection (the gateway's own kind, whose writes are coalesced per turn of the loop:
bus/connect.py; `--writes plain` for aio-pika's); one channel per account queue with the gateway's
prefetch; one confirming publisher channel. Each delivery becomes an outcome-sized message on
`sms.outcomes` (confirmed), then the delivery is acked (acks are batched with `multiple=True`).
Outcomes are published the way the gateway publishes them (on the AMQP channel, no aio-pika
`Message` each), so the ceiling is not handicapped by a cost the gateway does not pay;
`--publish message` is the older, slower way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from pamqp.commands import Basic

from gateway import contract as c
from gateway.bus.connect import connect_robust

OUTCOME = json.dumps(
    {
        "v": 1,
        "unique_id": "x" * 12,
        "account": "bench",
        "to": "+48500600700",
        "status": "accepted",
        "provider": "serwersms",
        "provider_message_id": "8931c3c014",
        "parts": 1,
        "attempts": 1,
        "error": None,
        "provider_status": "queued",
        "meta": None,
        "at": "2026-11-27T18:00:00.000000Z",
    }
).encode()


def _with_meta(request: bytes) -> bytes:
    """The outcome carrying the request's `meta` (the latency runs' observer reads its send time)."""
    doc = json.loads(OUTCOME)
    doc["meta"] = json.loads(request).get("meta")
    return json.dumps(doc).encode()


async def main(
    amqp_url: str,
    accounts: list[str],
    prefetch: int,
    flush: int,
    count: int | None,
    tick_s: float = 0.02,
    echo_meta: bool = False,
    frames: bool = True,
    coalesce: bool = True,
) -> None:
    connection = await connect_robust(amqp_url, timeout_s=10, coalesce=coalesce)
    publisher = await connection.channel(publisher_confirms=True)
    outcomes = await publisher.get_exchange(c.OUTCOMES_EXCHANGE, ensure=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    relayed = 0
    first: float | None = None

    def done(n: int) -> None:
        """With --count: say when that many were relayed (nobody may be counting outcomes)."""
        nonlocal relayed
        relayed += n
        if count is not None and relayed >= count and not stop.is_set():
            assert first is not None
            print(json.dumps({"relayed": relayed, "seconds": round(loop.time() - first, 4)}), flush=True)
            stop.set()

    async def relay(account: str) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(c.account_queue(account), ensure=False)
        pending: list[AbstractIncomingMessage] = []
        full = asyncio.Event()  # a whole batch waits

        async def drain() -> None:
            """One batch in flight per channel, so `ack(multiple=True)` never acks an unconfirmed
            message. (Several concurrent batches with one ack each measured slower here: acks
            dominate.)"""
            batch, pending[:] = list(pending), []
            if not batch:
                return
            if frames:
                # As the gateway publishes: straight on the AMQP channel, ready-made properties.
                underlay = await publisher.get_underlay_channel()
                await asyncio.gather(
                    *(
                        underlay.basic_publish(  # type: ignore[call-arg]  # `wait` is on aiormq's Channel
                            _with_meta(m.body) if echo_meta else OUTCOME,
                            exchange=c.OUTCOMES_EXCHANGE,
                            routing_key=f"accepted.{account}",
                            properties=Basic.Properties(
                                content_type="application/json", delivery_mode=2, correlation_id=m.message_id
                            ),
                            wait=False,
                        )
                        for m in batch
                    )
                )
            else:
                await asyncio.gather(
                    *(
                        outcomes.publish(
                            aio_pika.Message(
                                _with_meta(m.body) if echo_meta else OUTCOME,
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                correlation_id=m.message_id,
                                content_type="application/json",
                            ),
                            routing_key=f"accepted.{account}",
                        )
                        for m in batch
                    )
                )
            await batch[-1].ack(multiple=True)
            done(len(batch))

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal first
            if first is None:
                first = loop.time()
            pending.append(message)
            if len(pending) >= flush:
                full.set()

        await queue.consume(on_message)
        # One drainer per channel: a full batch goes at once, a partial one after at most a tick.
        while not stop.is_set():
            try:
                await asyncio.wait_for(full.wait(), tick_s)
            except TimeoutError:
                pass
            full.clear()
            await drain()

    tasks = [asyncio.create_task(relay(a)) for a in accounts]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await connection.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--prefetch", type=int, required=True)
    ap.add_argument("--flush", type=int, default=100)
    ap.add_argument("--count", type=int, help="print when this many are relayed, then stop")
    ap.add_argument("--tick-ms", type=float, default=20.0, help="a partial batch goes after at most this long")
    ap.add_argument("--echo-meta", action="store_true", help="copy each request's meta into its outcome")
    ap.add_argument(
        "--publish",
        choices=["frames", "message"],
        default="frames",
        help="frames: on the AMQP channel with ready-made properties, as the gateway does (the default); "
        "message: an aio-pika Message and Exchange.publish per outcome (the relay before 2026-11-29)",
    )
    ap.add_argument(
        "--writes",
        choices=["coalesced", "plain"],
        default="coalesced",
        help="coalesced: the gateway's connection, one socket write per turn of the loop (the default); "
        "plain: aio-pika's, one write per publish and per ack",
    )
    ap.add_argument("accounts", nargs="+")
    args = ap.parse_args()
    tick_s = args.tick_ms / 1000
    frames = args.publish == "frames"
    asyncio.run(
        main(
            args.amqp_url,
            args.accounts,
            args.prefetch,
            args.flush,
            args.count,
            tick_s,
            args.echo_meta,
            frames,
            args.writes == "coalesced",
        )
    )
