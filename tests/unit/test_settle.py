"""The settler when the broker is gone: every delivery of the batch is requeued (or left to the
broker), and the failure is one log line per batch, not one per message."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.bus import settle
from gateway.bus.acks import AckTracker
from gateway.bus.publisher import Publish, Publisher
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
        self.body = b"{}"
        self.content_type = self.content_encoding = self.timestamp = self.type = self.app_id = None


class LostPublisher(Publisher):
    """The real publisher's messages, sent nowhere: the broker's connection is lost."""

    def __init__(self) -> None:
        super().__init__(channel=None)  # type: ignore[arg-type]  # publish_all never reaches a channel
        self.published: list[Publish] = []

    async def publish_all(self, publishes: Sequence[Publish]) -> list[BaseException | None]:
        self.published += publishes
        return [self.answer(x) for x in publishes]

    def answer(self, _: Publish) -> BaseException | None:
        return ConnectionError("connection lost")


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
    def answer(self, _: Publish) -> BaseException | None:
        return None


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
    settler = Settler(publisher, "sandbox", acks)
    done = dec.finish(Status.DUPLICATE, "sandbox", at=datetime.now(UTC), attempts=0, store=False)

    assert await settler.settle_all([(d, done) for d in deliveries]) == 0
    assert publisher.published == []
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
    settler = Settler(LostPublisher(), "sandbox", acks)

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

    def answer(self, publish: Publish) -> BaseException | None:
        return ConnectionError("confirm lost") if publish.props.correlation_id == "id-2" else None


async def test_only_confirmed_outcomes_are_announced_and_before_the_acks(monkeypatch: Any) -> None:
    """The worker ends the final-event holds of what `on_confirmed` names: an `accepted` whose
    publish failed must not be named (its redelivered copy publishes and names it)."""
    monkeypatch.setattr(settle, "log", Lines())
    acks = AckTracker()
    deliveries = delivered(acks, OpenChannel(), 3)  # no ack can be written on this channel
    settler = Settler(OnePublishLost(), "sandbox", acks)
    accepted = dec.finish(Status.ACCEPTED, "sandbox", at=datetime.now(UTC), attempts=1, store=True)
    seen: list[str | None] = []

    acked = await settler.settle_all(
        [(d, accepted) for d in deliveries], lambda done: seen.extend(d.unique_id for d, _ in done)
    )

    assert acked == 0  # the acks failed, after the announcement
    assert seen == ["id-1", "id-3"]


class DeadLettersLost(LostPublisher):
    """Confirms every outcome; every dead letter is lost. Counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def publish_all(self, publishes: Sequence[Publish]) -> list[BaseException | None]:
        self.calls += 1
        return await super().publish_all(publishes)

    def answer(self, publish: Publish) -> BaseException | None:
        return ConnectionError("returned") if publish.exchange == "sms.dead" else None


async def test_a_batch_publishes_as_one_unit_and_a_delivery_fails_when_any_of_its_publishes_does(
    monkeypatch: Any,
) -> None:
    """One call for the whole batch (outcomes, dead letters, retry copies); a delivery whose dead
    letter failed is requeued though its outcome went out, and the others are confirmed."""
    lines = Lines()
    monkeypatch.setattr(settle, "log", lines)
    acks = AckTracker()
    deliveries = delivered(acks, OpenChannel(), 3)
    publisher = DeadLettersLost()
    settler = Settler(publisher, "sandbox", acks)
    now = datetime.now(UTC)
    accepted = dec.finish(Status.ACCEPTED, "sandbox", at=now, attempts=1)
    poisoned = dec.poison(0, "Boom", now)  # an outcome and a dead letter
    wait = dec.Wait(1000)
    confirmed: list[str | None] = []

    await settler.settle_all(
        [(deliveries[0], accepted), (deliveries[1], poisoned), (deliveries[2], wait)],
        lambda done: confirmed.extend(d.unique_id for d, _ in done),
    )

    assert publisher.calls == 1
    assert [(x.exchange, x.routing_key) for x in publisher.published] == [
        ("sms.outcomes", "accepted.acme"),
        ("sms.outcomes", "failed.acme"),
        ("sms.dead", "poison.acme"),
        ("sms.retry", "acme"),
    ]
    assert confirmed == ["id-1", "id-3"]
    failed = [fields for event, fields in lines.lines if event == "settle_failed"]
    assert failed[0]["count"] == 1
    assert failed[0]["unique_id"] == "id-2"


async def test_a_decision_that_cannot_be_published_requeues_its_delivery_only(monkeypatch: Any) -> None:
    monkeypatch.setattr(settle, "log", Lines())
    acks = AckTracker()
    deliveries = delivered(acks, OpenChannel(), 2)
    publisher = CountingPublisher()
    settler = Settler(publisher, "sandbox", acks)
    accepted = dec.finish(Status.ACCEPTED, "sandbox", at=datetime.now(UTC), attempts=1)
    setattr(deliveries[0].message, "headers", ["not", "a", "table"])  # noqa: B010 - its retry copy cannot be built
    confirmed: list[str | None] = []

    await settler.settle_all(
        [(deliveries[0], dec.Wait(1000)), (deliveries[1], accepted)],
        lambda done: confirmed.extend(d.unique_id for d, _ in done),
    )

    assert confirmed == ["id-2"]
    assert [x.routing_key for x in publisher.published] == ["accepted.acme"]
