"""The settler when the broker is gone: every delivery of the batch is requeued (or left to the
broker), and the failure is one log line per batch, not one per message."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway import pipeline as p
from gateway import settle
from gateway.acks import AckTracker
from gateway.settle import Delivery, Settler


class ClosedChannel:
    is_closed = True


class Message:
    def __init__(self, tag: int, channel: ClosedChannel) -> None:
        self.delivery_tag = tag
        self.channel = channel
        self.reply_to = None
        self.correlation_id = None
        self.headers: dict[str, Any] = {}
        self.message_id = None


class LostPublisher:
    async def outcome(self, **_: Any) -> None:
        raise ConnectionError("connection lost")

    async def dead_letter(self, *_: Any, **__: Any) -> None:
        raise ConnectionError("connection lost")


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def is_enabled_for(self, _level: int) -> bool:
        return True

    def _record(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    error = warning = info = _record


async def test_a_lost_connection_fails_the_batch_in_one_line_and_closes_every_delivery(monkeypatch: Any) -> None:
    lines = Lines()
    monkeypatch.setattr(settle, "log", lines)
    channel = ClosedChannel()
    acks = AckTracker()
    deliveries = []
    for tag in range(1, 101):
        message = Message(tag, channel)
        acks.delivered(message)  # type: ignore[arg-type]
        d = Delivery(message, "acme", _open=True, label="unit-settle")  # type: ignore[arg-type]
        d.job.unique_id = f"id-{tag}"
        deliveries.append(d)
    decision = p.poison(0, "Boom", datetime.now(UTC))
    settler = Settler(LostPublisher(), "sandbox", acks)  # type: ignore[arg-type]

    acked = await settler.settle_all([(d, decision) for d in deliveries])

    assert acked == 0
    assert [event for event, _ in lines.lines] == ["settle_failed", "nack_failed"]
    failed = dict(lines.lines)
    assert failed["settle_failed"]["count"] == 100
    assert failed["settle_failed"]["error"] == "ConnectionError"
    assert failed["nack_failed"]["count"] == 100
    assert all(not d._open for d in deliveries)  # each left the in-flight gauge, as `requeued`
