"""Many accounts on one replica, against the real broker: what grows with their number."""

from __future__ import annotations

from collections import Counter

import pytest

from testkit import Bus, new_account_name, request
from tests.conftest import InProcess

pytestmark = pytest.mark.integration


async def test_consumers_spread_over_connections_when_one_is_full(world: InProcess) -> None:
    """An account brings three lane channels; past `channels_per_connection` the next consumers go
    on a connection of their own (a thousand accounts would pass RabbitMQ's channel_max, 2,047)."""
    names = [new_account_name() for _ in range(3)]
    gw = await world.gateway([world.account(n) for n in names], channels_per_connection=4)
    assert len(gw._consumer_connections) == 3  # 9 lane channels: 4 + 4 + 1
    assert await gw.problems() == []
    async with Bus.open(names) as bus:
        for n in names:
            await bus.publish(n, request(f"{n}-1"))
        await bus.wait_for(outcomes=3)
    assert Counter(d["status"] for d in bus.outcome_docs()) == {"accepted": 3}
    await gw.stop()
    world.gateways.remove(gw)
    assert all(c.is_closed for c, _ in gw._consumer_connections)
