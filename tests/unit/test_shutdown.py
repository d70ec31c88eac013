"""Shutdown does not hang on a channel that a lost connection left wedged, nor on a loop whose
cancel a library swallowed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from structlog.testing import capture_logs

from gateway.app import cancel_all
from gateway.bus.queue import close_within
from gateway.config import Account, Settings
from gateway.dlr.desk import Desk, Poller, PollScheduler
from gateway.state.base import Tracked
from gateway.state.sqlite import SqliteStore
from testkit import eventually


class NeverClosing:
    is_closed = False

    async def close(self) -> None:
        await asyncio.Event().wait()  # a close frame that never gets written


class Closing:
    is_closed = False

    async def close(self) -> None:
        self.is_closed = True


async def test_a_channel_that_never_closes_is_left_after_its_bound() -> None:
    with capture_logs() as logs:
        await asyncio.wait_for(close_within(NeverClosing(), 0.05, "channel_not_closed"), 10)
    assert [e["event"] for e in logs] == ["channel_not_closed"]


async def test_a_healthy_channel_is_closed_quietly() -> None:
    channel = Closing()
    with capture_logs() as logs:
        await close_within(channel, 5, "channel_not_closed")
    assert channel.is_closed
    assert logs == []


class SwallowingAdapter:
    """Answers status polls slowly, and swallows the CancelledError a cancel throws into the call,
    as anyio's connect does when its own cancellation lands in the same loop turn."""

    name = "serwersms"
    max_batch = 100
    max_status_ids = 1  # every round is full: the poller goes straight on, without its idle sleep

    def __init__(self) -> None:
        self.swallowed = 0
        self.calls = 0

    async def statuses(self, message_ids: Any) -> list[Any]:
        self.calls += 1
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.swallowed += 1
        return []


async def test_a_poller_whose_cancel_was_swallowed_still_stops(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.sqlite3")
    account = Account(name="pl", provider="serwersms", base_url="https://api2.serwersms.pl", token=SecretStr("t"))
    await store.track(
        "pl", [Tracked(f"m{i}", f"u{i}", None, None, "serwersms", time.time()) for i in range(50)], 0, 600
    )
    desk = Desk(store=store, sink=None, accounts=[account], owner="one")  # type: ignore[arg-type]
    adapter = SwallowingAdapter()
    poller = Poller(desk=desk, account=account, adapter=adapter, store=store, dlr=Settings().dlr)  # type: ignore[arg-type]
    task = asyncio.create_task(PollScheduler([poller], store).run())
    try:
        await eventually(lambda: adapter.calls > 0, 5, "the poller inside a status call")
        task.cancel()
        await asyncio.wait([task], timeout=5)
        assert task.cancelled()  # the library swallowed the cancel; the loop ended all the same
        assert adapter.swallowed == 1
    finally:
        task.cancel()
        await store.close()


async def test_cancel_all_cancels_again_what_a_swallowed_cancel_left_running() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed > 1:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all([task], timeout_s=5), 10)
    assert task.cancelled()
    assert swallowed == 2
