"""The SIGUSR2 task dump: each task's await chain, grouped, with code locations only."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from gateway.ops.diagnostics import await_chain, dump_tasks


async def hold(lock: asyncio.Lock, gate: asyncio.Event) -> None:
    async with lock:
        await gate.wait()


async def wait_for_lock(lock: asyncio.Lock, secret_text: str) -> None:
    async with lock:
        pass


async def outer(lock: asyncio.Lock, secret_text: str) -> None:
    await wait_for_lock(lock, secret_text)


async def test_the_chain_follows_each_await_down_to_the_future() -> None:
    lock, gate = asyncio.Lock(), asyncio.Event()
    holder = asyncio.create_task(hold(lock, gate), name="holder")
    await asyncio.sleep(0)
    waiter = asyncio.create_task(outer(lock, "+48500600700 hello"), name="waiter")
    await asyncio.sleep(0)
    chain = await_chain(waiter)
    names = [link.split(":")[0] for link in chain]
    assert names[:2] == ["outer", "wait_for_lock"]
    assert "Lock.acquire" in names  # under asyncio's own frames, which differ between versions
    assert names[-1] == "Future"
    assert await_chain(holder)[0].startswith("hold:")
    assert await_chain(holder)[-2].startswith("Event.wait:")
    gate.set()
    await asyncio.gather(holder, waiter)


async def test_the_dump_groups_tasks_by_chain_and_logs_no_locals() -> None:
    lock, gate = asyncio.Lock(), asyncio.Event()
    holder = asyncio.create_task(hold(lock, gate), name="holder")
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(outer(lock, "+48500600700 hello"), name=f"w{i}") for i in range(5)]
    await asyncio.sleep(0)
    with capture_logs() as logs:
        total = dump_tasks()
    assert total == 7  # the test's own task, the holder, the five waiters
    assert logs[0]["event"] == "task_dump"
    assert logs[0]["tasks"] == 7
    waits = [e for e in logs if e["event"] == "task_waits"]
    assert waits[0]["count"] == 5  # the most shared chain first
    assert waits[0]["chain"].startswith("outer:")
    assert "wait_for_lock" in waits[0]["chain"]
    assert sum(e["count"] for e in waits) == 7
    assert "48500600700" not in repr(logs)
    assert "hello" not in repr(logs)
    gate.set()
    await asyncio.gather(holder, *waiters)
