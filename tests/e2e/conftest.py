"""Fixtures of the end-to-end ring: gateway processes and throwaway accounts, cleaned up after."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from testkit import Process, delete_account_queues


@pytest.fixture
def procs() -> Iterator[list[Process]]:
    """Processes a test starts; killed at its end, whatever happened."""
    started: list[Process] = []
    yield started
    for p in started:
        p.close()


@pytest.fixture
def accounts_cleanup() -> Iterator[list[str]]:
    """Account names a test makes; their queues are deleted at its end."""
    names: list[str] = []
    yield names
    asyncio.run(delete_account_queues(names))
