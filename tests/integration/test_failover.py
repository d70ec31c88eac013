"""Provider failover and routing end to end: the real broker and store, two sandboxes (SerwerSMS the
primary on one, Mobizon the backup on another), each provider's ledger the ground truth of what was
sent. Counted across both ledgers: nothing twice, and nothing lost."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import Account, parse_accounts
from gateway.obs import metrics as m
from gateway.providers.base import provider_ref
from gateway.sandbox.app import start_sandbox
from gateway.sandbox.dlr import DlrConfig, Undelivered
from gateway.sandbox.state import FaultRule, SandboxState
from gateway.state.base import Pause
from testkit import Bus, account_doc, new_account_name, request
from testkit.services import free_port
from tests.conftest import InProcess

pytestmark = pytest.mark.integration
FAST: dict[str, Any] = {
    "failover_open_s": 1.0,
    "failover_failures": 2,
    "retry_schedule_s": [0.3, 0.6],
    "max_attempts": 40,
}


class Backup:
    """A second sandbox, where the Mobizon account sends."""

    def __init__(self) -> None:
        self.state = SandboxState(seed=11)
        self.port = free_port()
        self.runner: Any = None

    async def start(self) -> None:
        self.runner = await start_sandbox("127.0.0.1", self.port, self.state)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def account(self, name: str, **kw: Any) -> dict[str, Any]:
        return {
            "name": name,
            "provider": "mobizon",
            "base_url": f"http://127.0.0.1:{self.port}",
            "api_key": f"key-{name}",
            "sender": "Backup",
            "rate_per_s": 1000,
            "burst": 1000,
            "linger_ms": 50,
            "http_timeout_s": 2,
            **kw,
        }


@pytest.fixture
async def backup() -> Any:
    b = Backup()
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


def accounts(world: InProcess, *docs: dict[str, Any]) -> list[Account]:
    """Accounts that route to each other are read together, as from one accounts file."""
    world.account_names.update(d["name"] for d in docs)
    return parse_accounts(list(docs))


def primary(world: InProcess, name: str, **kw: Any) -> dict[str, Any]:
    return account_doc(name, world.sandbox_port, **kw)


def primary_sends(world: InProcess, home: str) -> Counter[str]:
    """unique_id -> sends in the primary's ledger (SerwerSMS carries our reference)."""
    refs = {provider_ref(home, f"f-{n}"): f"f-{n}" for n in range(5000)}
    return Counter(refs[r.unique_id] for r in world.state.sends if r.unique_id in refs)


def backup_sends(b: Backup) -> Counter[str]:
    """unique_id -> sends in the backup's ledger (Mobizon has no reference: the text is the id)."""
    return Counter(r.text.removeprefix("text ") for r in b.state.sends)


async def route_note(gw: Gateway, name: str, timeout: float = 5.0) -> Pause:
    """The route's state as the replica noted it in the store for operators (once a second)."""
    assert gw._store is not None
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = await gw._store.account_state(name)
        notes = [p for p in state.pauses if p.owner.endswith("/route")]
        if notes or asyncio.get_running_loop().time() > deadline:
            assert notes, "no route note in the store"
            return notes[0]
        await asyncio.sleep(0.2)


def sample(name: str, **labels: str) -> float:
    return m.REGISTRY.get_sample_value(name, labels) or 0.0


async def publish(bus: Bus, home: str, ids: range, **kw: Any) -> None:
    for n in ids:
        await bus.publish(home, request(f"f-{n}", text=f"text f-{n}", **kw))


async def test_the_primary_down_mid_run_moves_traffic_and_back_and_each_request_goes_once(
    world: InProcess, backup: Backup
) -> None:
    home, other = new_account_name(), new_account_name()
    gw = await world.gateway(accounts(world, primary(world, home, failover_to=[other]), backup.account(other)), **FAST)
    async with Bus.open([home]) as bus:
        await publish(bus, home, range(100))
        await bus.wait_for(outcomes=100)
        await world.stop_sandbox()  # the primary is gone: connections refused
        await publish(bus, home, range(100, 200))
        # A request whose call the stop cut may be at the primary: it waits for the primary's answer.
        await bus.wait_for(outcomes=195, timeout=60)
        note = await route_note(gw, home)  # what `gateway accounts` shows of the route
        assert note.reason in ("open", "half_open")
        assert "failed" in (note.code or "")  # why: "2 calls in a row failed (transport)", or a probe's
        await world.start_sandbox()  # back: the half-open probe finds it, and traffic fails back
        await asyncio.sleep(1.5)
        await publish(bus, home, range(200, 300))
        await bus.wait_for(outcomes=300, timeout=60)
    docs = bus.outcome_docs()
    assert Counter(d["status"] for d in docs) == {"accepted": 300}
    assert {d["unique_id"] for d in docs} == {f"f-{n}" for n in range(300)}
    p, b = primary_sends(world, home), backup_sends(backup)
    assert max(p.values()) == 1
    assert max(b.values()) == 1
    assert set(p) | set(b) == {f"f-{n}" for n in range(300)}
    assert not set(p) & set(b)  # none went both ways
    via = {d["unique_id"]: d["via"] for d in docs}
    assert all(via[f"f-{n}"] == home for n in range(100))
    # Published while the primary was down: they go through the backup, but for a call the stop cut
    # (its answer lost): that one waits for the primary and is reconciled with it once it is back.
    assert sum(via[f"f-{n}"] == other for n in range(100, 200)) >= 95
    assert sum(via[f"f-{n}"] == home for n in range(200, 300)) >= 90  # failed back
    assert {d["provider"] for d in docs if d["via"] == other} == {"mobizon"}
    assert sample("sms_failovers_total", account=home, via=other, reason="open") > 0


async def test_swallowed_answers_then_the_primary_down_never_send_twice(world: InProcess, backup: Backup) -> None:
    home, other = new_account_name(), new_account_name()
    docs = [primary(world, home, failover_to=[other], batch_size=10), backup.account(other)]
    await world.gateway(accounts(world, *docs), **FAST)
    world.state.faults.add(FaultRule(match=f"token:tok-{home}", swallow=True, rate=0.1))
    async with Bus.open([home]) as bus:
        await publish(bus, home, range(200))
        await asyncio.sleep(1.0)
        await world.stop_sandbox()  # down, with swallowed ones unreconciled
        await asyncio.sleep(3.0)
        [rule] = world.state.faults.describe()
        assert rule["fired"] > 0  # answers were swallowed: those requests are at the primary
        world.state.faults.clear()
        await world.start_sandbox()
        await bus.wait_for(outcomes=200, timeout=90)
    docs = bus.outcome_docs()
    assert Counter(d["status"] for d in docs) == {"accepted": 200}
    p, b = primary_sends(world, home), backup_sends(backup)
    assert max(p.values()) == 1
    assert not b or max(b.values()) == 1
    assert not set(p) & set(b)
    assert set(p) | set(b) == {f"f-{n}" for n in range(200)}


async def test_an_account_error_fails_over_within_the_batch(world: InProcess, backup: Backup) -> None:
    home, other = new_account_name(), new_account_name()
    await world.gateway(accounts(world, primary(world, home, failover_to=[other]), backup.account(other)), **FAST)
    world.state.faults.add(FaultRule(match=f"token:tok-{home}", code=3002))  # SerwerSMS: the FULL quota is spent
    async with Bus.open([home]) as bus:
        await publish(bus, home, range(20))
        await bus.wait_for(outcomes=20)
    docs = bus.outcome_docs()
    assert Counter((d["status"], d["via"]) for d in docs) == {("accepted", other): 20}
    assert backup_sends(backup) == Counter(f"f-{n}" for n in range(20))
    assert not world.gateways[0].paused_accounts()


async def test_a_country_route_and_its_drain_on_undelivered_reports(world: InProcess, backup: Backup) -> None:
    home, other, east = new_account_name(), new_account_name(), new_account_name()
    configured = accounts(
        world,
        primary(world, home, route_by_country={"UA": other}, failover_to=[east]),
        backup.account(other),
        primary(world, east),
    )
    backup.state.lifecycle.config = DlrConfig(
        delay_s=0.1, undelivered=[Undelivered(match=f"key:key-{other}", country="UA", share=1.0)]
    )
    gw = await world.gateway(
        configured,
        dlr_poll_after_s=0.3,
        dlr_poll_max_gap_s=0.5,
        failover_undelivered_min=5,
        **FAST,
    )
    ua = "+380501234567"
    async with Bus.open([home]) as bus:
        await publish(bus, home, range(5), to=ua)
        await bus.wait_for(outcomes=10, timeout=30)  # 5 accepted, then 5 undelivered events
        await publish(bus, home, range(5, 7))  # Poland: the home account's own route
        await publish(bus, home, range(7, 9), to=ua)  # Ukraine, drained from the backup: the failover
        await bus.wait_for(outcomes=14, timeout=30)
    docs = [d for d in bus.outcome_docs() if d["status"] == "accepted"]
    via = {d["unique_id"]: d["via"] for d in docs}
    assert [via[f"f-{n}"] for n in range(9)] == [other] * 5 + [home] * 2 + [east] * 2
    events = [d for d in bus.outcome_docs() if d["status"] == "undelivered"]
    assert len(events) == 5
    assert {e["via"] for e in events} == {other}
    assert sample("sms_route_drained", account=other, country="UA") == 1
    assert gw.routes.describe()[other]["drained"] == {"UA": 1.0}
