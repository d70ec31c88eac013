"""Delivery reports end to end: gateway processes, the sandbox process, the real broker and Redis.
Every accepted message ends as exactly one `delivered` or `undelivered` event, through webhooks
that are retried, duplicated and early, through polling alone, across two replicas, and across a
`kill -9`."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit import (
    REDIS_URL,
    Bus,
    Process,
    Sandbox,
    account_doc,
    delete_account_queues,
    eventually,
    new_account_name,
    request,
    start_gateway,
)

pytestmark = pytest.mark.e2e
FINAL = ("delivered", "undelivered")
SECRET = "e2e-hook-secret"


@pytest.fixture
def names() -> Iterator[list[str]]:
    created = [new_account_name("dlr"), new_account_name("dlr")]
    yield created
    asyncio.run(delete_account_queues(created))


def accounts(sandbox: Sandbox, serwer: str, mob: str) -> list[dict[str, Any]]:
    return [
        account_doc(serwer, sandbox.port, linger_ms=50),
        account_doc(
            mob, sandbox.port, provider="mobizon", api_key=f"key-{mob}", token=None, webhook_secret=SECRET, linger_ms=50
        ),
    ]


def requests(serwer: str, mob: str, n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        text = "Same for all" if i % 4 == 0 else f"Your code is {i}"  # Mobizon campaigns and single sends
        out.append((serwer, request(f"s{i}", to=f"+4850200{i:04d}", text=text, meta={"n": i})))
        out.append((mob, request(f"m{i}", to=f"+7701{i:07d}", text=text, meta={"n": i})))
    return out


def final_events(bus: Bus) -> Counter[tuple[str, str]]:
    return Counter((d["account"], d["unique_id"]) for d in bus.outcome_docs() if d["status"] in FINAL)


async def wait_finals(bus: Bus, n: int, timeout: float) -> None:
    """Until at least `n` final events arrived; fails when they do not within `timeout`."""
    await eventually(lambda: len(final_events(bus)) >= n, timeout, f"{n} final events")


def lifecycle(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "delay_s": 0.5,
        "jitter_s": 1.5,
        "mix": {"delivered": 0.85, "undelivered": 0.05, "expired": 0.05, "rejected": 0.05},
        "partial_share": 0.2,
    }
    doc.update(overrides)
    return doc


def assert_exactly_once(bus: Bus, serwer: str, mob: str, n: int) -> None:
    events = final_events(bus)
    expected = {(serwer, f"s{i}") for i in range(n)} | {(mob, f"m{i}") for i in range(n)}
    assert set(events) == expected, f"missing: {sorted(expected - set(events))[:5]}"
    assert set(events.values()) == {1}, [k for k, v in events.items() if v > 1][:5]
    accepted = {(d["account"], d["unique_id"]) for d in bus.outcome_docs() if d["status"] == "accepted"}
    assert accepted == expected
    sample = next(d for d in bus.outcome_docs() if d["status"] in FINAL)
    assert sample["meta"] == {"n": int(sample["unique_id"][1:])}  # the request's meta comes back


async def test_a_thousand_messages_end_exactly_once_while_webhooks_are_retried_duplicated_and_early(
    tmp_path: Path, sandbox_process: tuple[Process, Sandbox], procs: list[Process], names: list[str]
) -> None:
    _, sandbox = sandbox_process
    serwer, mob = names
    # The webhook bounds (rate, concurrency) are not this test's subject: a burst of 600 webhooks on
    # a loaded machine met them and got 503s, which Mobizon would retry but the answers check counts.
    bounds = {"webhook_rate_per_s": 100_000, "webhook_concurrency": 10_000}
    gateway, port = start_gateway(
        tmp_path,
        accounts(sandbox, serwer, mob),
        redis_url=REDIS_URL,
        dlr_poll_after_s=3,
        dlr_poll_max_gap_s=3,
        **bounds,
    )
    procs.append(gateway)
    hook = {"url": f"http://127.0.0.1:{port}/dlr/mobizon/{mob}", "secret": SECRET}
    sandbox.configure(
        dlr=lifecycle(
            webhooks={f"key-{mob}": hook}, retry_share=0.2, duplicate_share=0.05, early_share=0.1, retry_gap_s=0.5
        )
    )
    n = 500
    async with Bus.open([serwer, mob]) as bus:
        await bus.publish_many(requests(serwer, mob, n))
        await wait_finals(bus, 2 * n, timeout=120)
        await bus.settle(2.0)  # late webhook retries and duplicates must publish nothing more
    assert_exactly_once(bus, serwer, mob, n)
    hooks = sandbox.ledger()["webhooks"]
    assert hooks["events"] == n
    assert hooks["posts"] >= n * 1.1  # retried (20%) and duplicated (5%) events did reach the gateway
    assert set(hooks["answers"]) == {"200"}


async def test_polling_alone_produces_every_final_event(
    tmp_path: Path, sandbox_process: tuple[Process, Sandbox], procs: list[Process], names: list[str]
) -> None:
    _, sandbox = sandbox_process
    serwer, mob = names
    sandbox.configure(dlr=lifecycle())
    gateway, _ = start_gateway(
        tmp_path, accounts(sandbox, serwer, mob), redis_url=REDIS_URL, dlr_poll_after_s=0.5, dlr_poll_max_gap_s=1
    )
    procs.append(gateway)
    n = 500
    async with Bus.open([serwer, mob]) as bus:
        await bus.publish_many(requests(serwer, mob, n))
        await wait_finals(bus, 2 * n, timeout=120)
        await bus.settle(1.0)
    assert_exactly_once(bus, serwer, mob, n)
    assert sandbox.ledger()["webhooks"]["posts"] == 0


async def test_two_replicas_share_the_polling_and_publish_once(
    tmp_path: Path, sandbox_process: tuple[Process, Sandbox], procs: list[Process], names: list[str]
) -> None:
    _, sandbox = sandbox_process
    serwer, mob = names
    sandbox.configure(dlr=lifecycle(delay_s=1.0, jitter_s=3.0))
    after = 1.0
    for i in range(2):
        gateway, _ = start_gateway(
            tmp_path / f"r{i}",
            accounts(sandbox, serwer, mob),
            redis_url=REDIS_URL,
            dlr_poll_after_s=after,
            dlr_poll_max_gap_s=after,
        )
        procs.append(gateway)
    n = 300
    async with Bus.open([serwer, mob]) as bus:
        await bus.publish_many(requests(serwer, mob, n))
        await wait_finals(bus, 2 * n, timeout=120)
        await bus.settle(1.0)
    assert_exactly_once(bus, serwer, mob, n)
    # No id was polled by both replicas in one round: two polls of an id are a round apart.
    times = sandbox.poll_times()
    assert any(len(ts) > 1 for ts in times.values())  # some ids needed several rounds
    gaps = [b - a for ts in times.values() for a, b in itertools.pairwise(ts)]
    assert min(gaps) > after / 2, f"an id was polled twice within {min(gaps):.3f} s"


async def test_kill_9_of_a_replica_while_reports_flow_loses_no_final_event(
    tmp_path: Path, sandbox_process: tuple[Process, Sandbox], procs: list[Process], names: list[str]
) -> None:
    _, sandbox = sandbox_process
    serwer, mob = names
    settings = {"redis_url": REDIS_URL, "dlr_poll_after_s": 1.0, "dlr_poll_max_gap_s": 1.0, "claim_lease_s": 2}
    docs = accounts(sandbox, serwer, mob)
    first, port = start_gateway(tmp_path / "a", docs, **settings)
    procs.append(first)
    hook = {"url": f"http://127.0.0.1:{port}/dlr/mobizon/{mob}", "secret": SECRET}
    sandbox.configure(dlr=lifecycle(delay_s=1.0, jitter_s=4.0, webhooks={f"key-{mob}": hook}, retry_gap_s=0.5))
    n = 400
    async with Bus.open([serwer, mob]) as bus:
        await bus.publish_many(requests(serwer, mob, n))
        await wait_finals(bus, n // 2, timeout=60)
        first.kill()  # SIGKILL while reports are flowing: webhooks now fail and are retried
        killed_at = len(final_events(bus))
        assert killed_at < 2 * n, "the kill came too late to interrupt anything"
        second, _ = start_gateway(tmp_path / "b", docs, **settings)
        procs.append(second)
        # The sandbox keeps retrying the webhooks at the dead replica's port; polling finishes them.
        await wait_finals(bus, 2 * n, timeout=120)
        await bus.settle(1.0)
    events = final_events(bus)
    expected = {(serwer, f"s{i}") for i in range(n)} | {(mob, f"m{i}") for i in range(n)}
    assert set(events) == expected, f"lost: {sorted(expected - set(events))[:5]}"
    # At least once across a crash: a repeat is possible only for an event published in the
    # instant between its confirm and its record (none was seen in the runs so far).
    repeats = sum(v - 1 for v in events.values())
    assert repeats <= 5, repeats
