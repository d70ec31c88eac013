"""The whole gateway against the sandbox in Mobizon mode, with the real broker."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from gateway.config import Account
from gateway.sandbox.state import FaultRule
from testkit import Bus, new_account_name, request
from tests.conftest import InProcess

pytestmark = pytest.mark.integration


def mobizon(world: InProcess, name: str, **overrides: Any) -> Account:
    return world.account(name, provider="mobizon", api_key=f"key-{name}", token=None, **overrides)


async def test_thousand_same_text_requests_use_the_campaign_flow(world: InProcess) -> None:
    name = new_account_name()
    # quiet_ms = linger_ms: a bulk account that always batches (otherwise the first requests of a
    # burst, arriving while slots are free, go in small batches as single sends).
    await world.gateway([mobizon(world, name, batch_size=1000, linger_ms=300, quiet_ms=300)])
    async with Bus.open([name]) as bus:
        await bus.publish_many(
            [(name, request(f"c{i}", to=f"+7701{i:07d}", text="Spring sale: -20%")) for i in range(1000)]
        )
        await bus.wait_for(outcomes=1000, timeout=120)
        await bus.settle(0.5)
    docs = bus.outcome_docs()
    assert Counter(d["status"] for d in docs) == {"accepted": 1000}
    assert all(d["provider"] == "mobizon" and d["provider_message_id"] for d in docs)
    ledger = world.state.ledger()
    assert ledger["sends"] == 1000
    assert set(ledger["by_recipient"].values()) == {1}
    calls = ledger["calls"]
    assert calls.get("mobizon:message/sendsmsmessage", 0) < 50  # the bulk went through campaigns
    assert calls["mobizon:campaign/send"] >= 1
    assert calls["mobizon:campaign/addrecipients"] >= 2  # at most 500 per call


async def test_partial_add_retries_only_the_failed_recipients(world: InProcess) -> None:
    name = new_account_name()
    failing = {f"7702{i:07d}": 99 for i in range(0, 40, 8)}  # 5 of 40 get code 99 once
    world.state.mobizon_recipient_codes = dict(failing)
    await world.gateway([mobizon(world, name, batch_size=100, linger_ms=300, quiet_ms=300)])
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"p{i}", to=f"+7702{i:07d}", text="Same text")) for i in range(40)])
        await bus.wait_for(outcomes=40, timeout=30)
        await bus.settle(0.5)
    docs = {d["unique_id"]: d for d in bus.outcome_docs()}
    assert {d["status"] for d in docs.values()} == {"accepted"}
    retried = {uid for uid, d in docs.items() if d["attempts"] == 2}
    assert retried == {f"p{i}" for i in range(0, 40, 8)}
    assert set(world.state.ledger()["by_recipient"].values()) == {1}
    # The five came back as a small batch: single sends, the campaign was not repeated.
    assert world.state.ledger()["calls"]["mobizon:message/sendsmsmessage"] == 5
    assert world.state.ledger()["calls"]["mobizon:campaign/send"] == 1


async def test_code_30_storm_slows_the_account_and_everything_gets_through(world: InProcess) -> None:
    name = new_account_name()
    world.state.mobizon_rate_per_s = 8  # per method: far below the account's configured 200/s
    await world.gateway(
        [mobizon(world, name, rate_per_s=200, burst=50, batch_size=20, linger_ms=20)],
        retry_schedule_s=[0.3, 0.6, 1.0],
        max_attempts=30,
    )
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"s{i}", to=f"+7707{i:07d}", text=f"code {i}")) for i in range(60)])
        await bus.wait_for(outcomes=60, timeout=90)
    assert Counter(d["status"] for d in bus.outcome_docs()) == {"accepted": 60}
    ledger = world.state.ledger()
    assert ledger["answers"].get("mobizon:30", 0) > 0
    assert set(ledger["by_recipient"].values()) == {1}
    from gateway.obs import metrics

    slowed = metrics.REGISTRY.get_sample_value("sms_rate_factor", {"account": name})
    assert slowed is not None
    assert slowed < 1.0
    # The storm passes: successful sends bring the account's rate back up.
    world.state.mobizon_rate_per_s = None
    async with Bus.open([name]) as bus:
        await bus.publish_many(
            [(name, request(f"after{i}", to=f"+7707{i + 100:07d}", text=f"x{i}")) for i in range(60)]
        )
        await bus.wait_for(outcomes=60, timeout=60)
    recovered = metrics.REGISTRY.get_sample_value("sms_rate_factor", {"account": name})
    assert recovered is not None
    assert recovered > slowed


async def test_code_13_is_followed_once_and_remembered(world: InProcess) -> None:
    name = new_account_name()
    world.state.mobizon_home = {f"key-{name}": f"localhost:{world.sandbox_port}"}
    await world.gateway([mobizon(world, name, batch_size=5, linger_ms=10, concurrency=1)])
    async with Bus.open([name]) as bus:
        for wave in range(3):
            await bus.publish_many(
                [(name, request(f"h{wave}-{i}", to=f"+7708{wave}{i:06d}", text=f"t{i}")) for i in range(5)]
            )
            await bus.wait_for(outcomes=5 * (wave + 1))
    assert Counter(d["status"] for d in bus.outcome_docs()) == {"accepted": 15}
    assert world.state.ledger()["answers"]["mobizon:13"] == 1


async def test_swallowed_answers_never_charge_a_recipient_twice_under_both_providers(world: InProcess) -> None:
    serwer, mob = new_account_name(), new_account_name()
    world.state.faults.add(FaultRule(swallow=True, rate=0.1))
    await world.gateway(
        [
            world.account(serwer, http_timeout_s=0.5, batch_size=50, linger_ms=50),
            mobizon(world, mob, http_timeout_s=0.5, batch_size=100, linger_ms=50, concurrency=8),
        ],
        retry_schedule_s=[0.2, 0.5],
        max_attempts=10,
    )
    requests = []
    for i in range(1000):
        text = "Same for all" if i % 2 else f"Your code is {i}"  # campaigns and single sends
        requests.append((serwer, request(f"a{i}", to=f"+4850100{i:04d}", text=text)))
        requests.append((mob, request(f"b{i}", to=f"+7705{i:07d}", text=text)))
    async with Bus.open([serwer, mob]) as bus:
        await bus.publish_many(requests)
        await bus.wait_for(outcomes=2000, timeout=240)
        await bus.settle(2.0)
    per_request: dict[tuple[str, str], set[str]] = {}
    for d in bus.outcome_docs():
        per_request.setdefault((d["account"], d["unique_id"]), set()).add(d["status"])
    assert len(per_request) == 2000
    assert all(len(s) == 1 for s in per_request.values()), "a request got two different outcomes"
    statuses = Counter(next(iter(s)) for s in per_request.values())
    assert set(statuses) <= {"accepted", "failed"}
    ledger = world.state.ledger()
    charged = Counter(ledger["by_recipient"])
    assert max(charged.values()) == 1, [n for n, c in charged.items() if c > 1][:5]
    assert world.state.faults.describe()[0]["fired"] > 0
    # Every `accepted` was really sent; `failed` ones were never sent (or could not be told apart).
    accepted_numbers = {d["to"].lstrip("+") for d in bus.outcome_docs() if d["status"] == "accepted"}
    assert accepted_numbers <= set(charged)


async def test_code_12_splits_the_campaign_in_halves_without_a_retry(world: InProcess) -> None:
    """Code 12 (a parameter breaks a limit) is SPLIT in the table: the campaign's messages go out
    again at once in two halves, not back through the retry queue."""
    name = new_account_name()
    world.state.faults.add(FaultRule(path="campaign/create", code=12, count=1))
    await world.gateway([mobizon(world, name, batch_size=100, linger_ms=300, quiet_ms=300)])
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"k{i}", to=f"+7701{i + 500:07d}", text="One text")) for i in range(40)])
        await bus.wait_for(outcomes=40, timeout=30)
        await bus.settle(0.5)
    docs = bus.outcome_docs()
    assert Counter(d["status"] for d in docs) == {"accepted": 40}
    assert {d["attempts"] for d in docs} == {1}  # split and sent within the first attempt
    calls = world.state.ledger()["calls"]
    assert calls["mobizon:campaign/send"] == 2  # two campaigns of 20
    assert set(world.state.ledger()["by_recipient"].values()) == {1}
