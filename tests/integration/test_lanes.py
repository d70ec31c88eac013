"""Send classes through the real broker and an in-process sandbox: the lane a producer picks with
the routing key, the urgent lane overtaking a bulk backlog inside one account's rate, and the
urgent lane's validity."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from gateway import contract as c
from gateway.obs import metrics as m
from gateway.providers.base import provider_ref
from gateway.sandbox.state import FaultRule
from testkit import Bus, eventually, new_account_name, request
from tests.conftest import InProcess

pytestmark = pytest.mark.integration


async def test_every_lane_is_served_and_its_outcome_names_it(world: InProcess) -> None:
    name = new_account_name()
    await world.gateway([world.account(name)])
    async with Bus.open([name]) as bus:
        await bus.publish(f"{name}.urgent", request("u1", to="+48500600701"))
        await bus.publish(name, request("n1", to="+48500600700"))
        await bus.wait_for(outcomes=2, timeout=60)
        # The provider throttles the bulk request once: its retry copy goes back to the bulk lane.
        world.state.faults.add(FaultRule(match=f"token:tok-{name}", http_status=429, count=1))
        await bus.publish(f"{name}.bulk", request("b1", to="+48500600702"))
        await bus.wait_for(outcomes=3, timeout=60)
        await bus.settle(0.5)
    lanes = {d["unique_id"]: (d["status"], d["lane"], d["attempts"]) for d in bus.outcome_docs()}
    assert lanes == {"u1": ("accepted", "urgent", 1), "n1": ("accepted", "normal", 1), "b1": ("accepted", "bulk", 2)}
    assert not bus.dead


async def test_an_urgent_request_overtakes_a_bulk_backlog_of_its_account(world: InProcess) -> None:
    """A slow account (20/s) with 2,000 bulk requests queued, many of its batches waiting for tokens
    at once: each urgent request takes the next token, however many bulk batches ask for it. (With
    the lanes' priority off in the store, 35 to 140 bulk requests went between an urgent one's
    publication and its send, 1.8 to 7 s; with it, 0 or 1.)"""
    name = new_account_name()
    slow = world.account(name, rate_per_s=20, burst=2, batch_size=10, concurrency=8, lane_min_share=0.1)
    await world.gateway([slow])
    async with Bus.open([name]) as bus:
        await bus.publish_many([(f"{name}.bulk", request(f"b{i}", to=f"+4850060{i:04d}")) for i in range(2000)])
        await bus.wait_for(outcomes=40, timeout=120)  # the backlog drains at the account's rate
        for k in range(3):
            sent_before = len(world.state.sends)
            await bus.publish(f"{name}.urgent", request(f"otp{k}", to="+48500600999"))
            uid = f"otp{k}"

            def answered(uid: str = uid) -> bool:
                return any(d["unique_id"] == uid for d in bus.outcome_docs())

            await eventually(answered, 30, f"an outcome for {uid}")
            sends = [r.unique_id for r in world.state.sends]
            ahead = sends.index(provider_ref(name, f"otp{k}")) - sent_before
            assert ahead <= 5, f"{ahead} bulk requests were sent between urgent request {k}'s publication and its send"
            await asyncio.sleep(0.5)
    urgent = [d for d in bus.outcome_docs() if d["lane"] == "urgent"]
    assert [(d["status"], d["attempts"]) for d in urgent] == [("accepted", 1)] * 3
    assert all(world.state.ledger()["by_unique_id"][provider_ref(name, f"otp{k}")] == 1 for k in range(3))


async def test_an_urgent_request_past_its_validity_expires_and_is_never_sent(world: InProcess) -> None:
    name = new_account_name()
    await world.gateway([world.account(name, urgent_validity_s=60)])
    published = datetime.now(UTC)
    async with Bus.open([name]) as bus:
        await bus.publish(f"{name}.urgent", request("late"), timestamp=published - timedelta(seconds=61))
        await bus.publish(f"{name}.urgent", request("fresh"), timestamp=published - timedelta(seconds=30))
        # The same age on the normal lane is no reason to drop it.
        await bus.publish(name, request("normal"), timestamp=published - timedelta(seconds=61))
        await bus.wait_for(outcomes=3, dead=1, timeout=60)
        await bus.settle(0.5)
    status = {d["unique_id"]: d["status"] for d in bus.outcome_docs()}
    assert status == {"late": "expired", "fresh": "accepted", "normal": "accepted"}
    late = next(d for d in bus.outcome_docs() if d["unique_id"] == "late")
    assert "validity" in late["error"]["message"]
    (dead,) = bus.dead
    assert dead.routing_key == f"expired.{name}"
    assert dead.headers[c.H_LANE] == "urgent"
    assert provider_ref(name, "late") not in world.state.ledger()["by_unique_id"]


async def test_a_bulk_request_in_quiet_hours_waits_in_the_broker_and_goes_when_they_end(world: InProcess) -> None:
    """Quiet hours that end at the next minute in Warsaw: the bulk request to a Polish number hops
    through the delayed-copy queues (no provider call meanwhile) and is sent once they end; a
    normal-lane request to the same number goes at once."""
    warsaw = ZoneInfo("Europe/Warsaw")
    now = datetime.now(warsaw)
    if now.second > 45:  # leave the window at least 15 s to run
        await asyncio.sleep(61 - now.second)
        now = datetime.now(warsaw)
    start = now.replace(second=0, microsecond=0)
    end = start + timedelta(minutes=1)
    name = new_account_name()
    await world.gateway([world.account(name, quiet_hours=f"{start:%H:%M}-{end:%H:%M}")])
    async with Bus.open([name]) as bus:
        await bus.publish(f"{name}.bulk", request("campaign-1", to="+48500600701"))
        await bus.publish(name, request("notice-1", to="+48500600701"))
        await bus.wait_for(outcomes=1, timeout=30)
        assert [d["unique_id"] for d in bus.outcome_docs()] == ["notice-1"]
        assert provider_ref(name, "campaign-1") not in world.state.ledger()["by_unique_id"]
        await bus.wait_for(outcomes=2, timeout=120)
    campaign = next(d for d in bus.outcome_docs() if d["unique_id"] == "campaign-1")
    assert (campaign["status"], campaign["lane"], campaign["attempts"]) == ("accepted", "bulk", 1)
    sent_at = datetime.fromisoformat(campaign["at"])  # when the gateway had the provider's answer
    assert sent_at >= end  # not before the window ended
    assert sent_at < end + timedelta(seconds=15)  # and soon after: the last hops are short
    deferred = m.REGISTRY.get_sample_value("sms_retries_total", {"account": name, "kind": "defer"})
    assert (deferred or 0) >= 1
    assert world.state.ledger()["by_unique_id"][provider_ref(name, "campaign-1")] == 1
