"""Provider adapters, one per provider behind `ProviderAdapter` (see base.py)."""

from __future__ import annotations

from gateway.config import Account
from gateway.providers.base import ProviderAdapter


def build_adapter(account: Account, *, proxy_from_env: bool = False) -> ProviderAdapter:
    if account.provider == "serwersms":
        from gateway.providers.serwersms import SerwerSmsAdapter

        return SerwerSmsAdapter(account, proxy_from_env=proxy_from_env)
    from gateway.providers.mobizon import MobizonAdapter

    return MobizonAdapter(account, proxy_from_env=proxy_from_env)
