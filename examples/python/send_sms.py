"""Publish one SMS request to the gateway and wait for its outcome (aio-pika).

    python -m pip install aio-pika
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ SMS_ACCOUNT=demo SMS_TO=+48500600700 python send_sms.py

The outcome comes back on a reply queue of our own (reply_to), matched by our correlation_id;
the gateway keeps the producer's correlation_id and names the request by unique_id."""

import asyncio
import json
import os
import sys
import uuid

import aio_pika


async def main() -> int:
    connection = await aio_pika.connect(os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue("", exclusive=True)  # ours alone, gone when we are
        request = {
            "unique_id": os.environ.get("SMS_UNIQUE_ID", f"py-{uuid.uuid4()}"),  # your idempotency key
            "to": os.environ.get("SMS_TO", "+48500600700"),
            "text": "Your code is {code}",
            "vars": {"code": "4711"},
        }
        correlation_id = uuid.uuid4().hex
        exchange = await channel.get_exchange("sms.send")
        await exchange.publish(
            aio_pika.Message(
                json.dumps(request).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                correlation_id=correlation_id,
                reply_to=replies.name,
            ),
            # The account's urgent lane: a one-time code goes ahead of the account's campaigns
            # (`<account>` is the normal lane, `<account>.bulk` the campaigns').
            routing_key=os.environ.get("SMS_ACCOUNT", "demo") + ".urgent",
        )
        async with replies.iterator(timeout=60) as messages:
            async for message in messages:
                await message.ack()
                if message.correlation_id == correlation_id:
                    outcome = json.loads(message.body)
                    print(json.dumps(outcome))
                    return 0 if outcome["status"] == "accepted" else 1
    return 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
