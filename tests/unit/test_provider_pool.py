"""The provider HTTP pool is sized for the most calls the adaptive limit may have in flight."""

from __future__ import annotations

import httpx
import pytest

from gateway.config import Account
from gateway.providers import build_adapter


def pool_size(client: httpx.AsyncClient) -> int:
    return int(client._transport._pool._max_connections)  # type: ignore[attr-defined]  # httpx's own pool


@pytest.mark.parametrize(
    "doc",
    [
        {"name": "pl", "provider": "serwersms", "base_url": "https://api2.serwersms.pl", "token": "t"},
        {"name": "kz", "provider": "mobizon", "base_url": "https://api.mobizon.kz", "api_key": "k"},
    ],
)
async def test_the_pool_follows_max_concurrency_not_the_starting_concurrency(doc: dict[str, str]) -> None:
    """Sized from the starting concurrency (1 here: 2 connections), the pool was a hidden limit
    below the adaptive one (12): after a reconnect, redeliveries and lookups queued for it until
    they failed with PoolTimeout."""
    account = Account.model_validate({**doc, "concurrency": 1, "max_concurrency": 12})
    adapter = build_adapter(account)
    try:
        client = adapter._client if hasattr(adapter, "_client") else adapter._api._client  # type: ignore[attr-defined]
        assert pool_size(client) == 24
    finally:
        await adapter.close()
