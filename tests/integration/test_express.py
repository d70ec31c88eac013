"""A lone request's outcome is published on a channel of its own, not behind the full batches of
another account's backlog on the same channel (consumer.EXPRESS_MAX_BATCH)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import pytest

from gateway.bus import consumer
from gateway.bus.publisher import Publish, Publisher
from gateway.sandbox.state import FaultRule
from testkit import Bus, new_account_name, request
from tests.conftest import InProcess

pytestmark = pytest.mark.integration


async def test_a_lone_request_settles_on_another_channel_than_a_backlogs_full_batches(
    world: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    channels: dict[str, set[int]] = defaultdict(set)  # account -> the publishers its outcomes went through
    publish_all = Publisher.publish_all

    async def noting(self: Publisher, publishes: Sequence[Publish]) -> list[BaseException | None]:
        for x in publishes:
            if x.exchange == "sms.outcomes":
                channels[x.routing_key.split(".", 1)[1]].add(id(self))
        return await publish_all(self, publishes)

    monkeypatch.setattr(Publisher, "publish_all", noting)
    busy, quiet = new_account_name(), new_account_name()
    # One call in flight at a time, 300 ms each: the backlog's batches fill up to 50.
    world.state.faults.add(FaultRule(match=f"token:tok-{busy}", latency_ms=300))
    accounts = [
        world.account(busy, batch_size=50, concurrency=1, max_concurrency=1, rate_per_s=10_000, burst=10_000),
        world.account(quiet),
    ]
    await world.gateway(accounts)
    n = 300
    async with Bus.open([busy, quiet]) as bus:
        await bus.publish_many([(busy, request(f"b{i}", to=f"+4850097{i:04d}")) for i in range(n)])
        await bus.wait_for(outcomes=60, timeout=30)
        await bus.publish(quiet, request("otp-1"))
        await bus.wait_for(outcomes=n + 1, timeout=60)
    assert {d["status"] for d in bus.outcome_docs()} == {"accepted"}
    assert len(channels[quiet]) == 1
    # The backlog's full batches went through the other publisher (its first lone batch may not).
    assert channels[busy] - channels[quiet], "every outcome of the backlog went through the express channel"
    assert consumer.EXPRESS_MAX_BATCH < 50
