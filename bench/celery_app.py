"""What users would build instead: one Celery task per SMS (RabbitMQ broker, late acks) that posts
to the same sandbox with httpx and publishes the outcome to `sms.outcomes`.

Configured by environment: BENCH_SANDBOX_URL, BENCH_AMQP_URL.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from typing import Any

import httpx
from celery import Celery
from kombu import Connection, Exchange, Producer

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
SANDBOX_URL = os.environ.get("BENCH_SANDBOX_URL", "http://127.0.0.1:8580")

app = Celery("bench", broker=AMQP_URL)
app.conf.update(
    task_acks_late=True,
    task_default_queue="bench.celery",
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_local = threading.local()
_outcomes = Exchange("sms.outcomes", type="topic", durable=True, no_declare=True)


def _resources() -> tuple[httpx.Client, Producer]:
    if not hasattr(_local, "http"):
        _local.http = httpx.Client(base_url=SANDBOX_URL, timeout=10)
        connection = Connection(AMQP_URL, transport_options={"confirm_publish": True})
        _local.producer = Producer(connection.channel(), exchange=_outcomes)
    return _local.http, _local.producer


@app.task(name="bench.send_sms")
def send_sms(account: str, request: dict[str, Any]) -> None:
    http, producer = _resources()
    response = http.post(
        "messages/send_sms.json",
        json={"phone": [request["to"]], "text": request["text"], "details": True},
        headers={"Authorization": f"Bearer tok-{account}"},
    )
    doc = response.json()
    item = (doc.get("items") or [{}])[0]
    status = "accepted" if item.get("status") == "queued" else "rejected"
    outcome = {
        "v": 1,
        "unique_id": request["unique_id"],
        "account": account,
        "to": request["to"],
        "status": status,
        "provider": "serwersms",
        "provider_message_id": item.get("id"),
        "parts": item.get("parts"),
        "attempts": 1,
        "error": None,
        "provider_status": item.get("status"),
        "meta": request.get("meta"),
        "at": datetime.now(UTC).isoformat(),
    }
    producer.publish(
        json.dumps(outcome).encode(),
        routing_key=f"{status}.{account}",
        content_type="application/json",
        delivery_mode=2,
        retry=True,
    )
