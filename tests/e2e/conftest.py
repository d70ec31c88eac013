"""Fixtures of the end-to-end ring: gateway processes and throwaway accounts, cleaned up after."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aio_pika
import pytest

from gateway.ops import deadletters
from testkit import AMQP_URL, Process, delete_account_queues


@pytest.fixture
def procs() -> Iterator[list[Process]]:
    """Processes a test starts; killed at its end, whatever happened."""
    started: list[Process] = []
    yield started
    for p in started:
        p.close()


@pytest.fixture
def accounts_cleanup() -> Iterator[list[str]]:
    """Account names a test makes; their queues, and their letters in the shared sms.dead, are
    deleted at its end (a failed replay test would otherwise leave thousands behind)."""
    names: list[str] = []
    yield names
    asyncio.run(delete_account_queues(names))
    asyncio.run(_purge_dead_letters(names))


async def _purge_dead_letters(names: list[str]) -> None:
    if not names:
        return
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for name in names:
            await deadletters.purge(connection, deadletters.Filter(account=name))
