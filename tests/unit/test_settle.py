"""The settler when the broker is gone: every delivery of the batch is requeued (or left to the
broker), and the failure is one log line per batch, not one per message."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.bus import settle
from gateway.bus.acks import AckTracker
from gateway.bus.settle import Delivery, Settler
from gateway.contract import Status
from gateway.core import decisions as dec


class ClosedChannel:
    is_closed = True


class OpenChannel:
    """A consumer channel still open whose frames cannot be written (no basic_nack here): the
    connection the publishes use is the one that was lost."""

    is_closed = False


class Message:
    def __init__(self, tag: int, channel: ClosedChannel | OpenChannel) -> None:
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


def delivered(acks: AckTracker, channel: ClosedChannel | OpenChannel, n: int) -> list[Delivery]:
    """`n` deliveries of `channel`, registered with `acks` and open in the in-flight gauge."""
    out = []
    for tag in range(1, n + 1):
        message = Message(tag, channel)
        acks.delivered(message)  # type: ignore[arg-type]
        d = Delivery(message, "acme", _open=True, label="unit-settle")  # type: ignore[arg-type]
        d.job.unique_id = f"id-{tag}"
        out.append(d)
    return out


class CountingPublisher(LostPublisher):
    def __init__(self) -> None:
        self.calls = 0

    async def outcome(self, **_: Any) -> None:
        self.calls += 1


async def test_deliveries_of_a_lost_channel_publish_nothing_and_are_left_to_their_redelivery(
    monkeypatch: Any,
) -> None:
    """Their redeliveries are the gateway's own copies and get the outcome: published for these
    too, a result another replica finished meanwhile would reach the producer as `duplicate`."""
    lines = Lines()
    monkeypatch.setattr(settle, "log", lines)
    channel = ClosedChannel()
    acks = AckTracker()
    deliveries = delivered(acks, channel, 10)
    publisher = CountingPublisher()
    settler = Settler(publisher, "sandbox", acks)  # type: ignore[arg-type]
    done = dec.finish(Status.DUPLICATE, "sandbox", at=datetime.now(UTC), attempts=0, store=False)

    assert await settler.settle_all([(d, done) for d in deliveries]) == 0
    assert publisher.calls == 0
    assert [event for event, _ in lines.lines] == ["stale_deliveries_not_settled"]
    assert lines.lines[0][1]["count"] == 10
    assert all(not d._open for d in deliveries)


async def test_a_lost_connection_fails_the_batch_in_one_line_and_closes_every_delivery(monkeypatch: Any) -> None:
    lines = Lines()
    monkeypatch.setattr(settle, "log", lines)
    channel = OpenChannel()
    acks = AckTracker()
    deliveries = delivered(acks, channel, 100)
    decision = dec.poison(0, "Boom", datetime.now(UTC))
    settler = Settler(LostPublisher(), "sandbox", acks)  # type: ignore[arg-type]

    acked = await settler.settle_all([(d, decision) for d in deliveries])

    assert acked == 0
    assert [event for event, _ in lines.lines] == ["settle_failed", "nack_failed"]
    failed = dict(lines.lines)
    assert failed["settle_failed"]["count"] == 100
    assert failed["settle_failed"]["error"] == "ConnectionError"
    assert failed["nack_failed"]["count"] == 100
    assert all(not d._open for d in deliveries)  # each left the in-flight gauge, as `requeued`


class OnePublishLost(LostPublisher):
    """Confirms every outcome but the one of `id-2`."""

    async def outcome(self, **fields: Any) -> None:
        if fields["unique_id"] == "id-2":
            raise ConnectionError("confirm lost")


async def test_only_confirmed_outcomes_are_announced_and_before_the_acks(monkeypatch: Any) -> None:
    """The worker ends the final-event holds of what `on_confirmed` names: an `accepted` whose
    publish failed must not be named (its redelivered copy publishes and names it)."""
    monkeypatch.setattr(settle, "log", Lines())
    acks = AckTracker()
    deliveries = delivered(acks, OpenChannel(), 3)  # no ack can be written on this channel
    settler = Settler(OnePublishLost(), "sandbox", acks)  # type: ignore[arg-type]
    accepted = dec.finish(Status.ACCEPTED, "sandbox", at=datetime.now(UTC), attempts=1, store=True)
    seen: list[str | None] = []

    acked = await settler.settle_all(
        [(d, accepted) for d in deliveries], lambda done: seen.extend(d.unique_id for d, _ in done)
    )

    assert acked == 0  # the acks failed, after the announcement
    assert seen == ["id-1", "id-3"]
