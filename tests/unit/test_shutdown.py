"""Shutdown does not hang on a channel that a lost connection left wedged."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from gateway.bus.queue import close_within


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
