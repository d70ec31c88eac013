"""The providers, one package each: its adapter (behind `ProviderAdapter`, see base.py), code
tables, delivery-status table and webhook format, declared as one `Provider`. This registry is the
one place that lists them; a new provider is a new package and one line here."""

from __future__ import annotations

from gateway.config import Account
from gateway.providers import mobizon, serwersms
from gateway.providers.base import Provider, ProviderAdapter

PROVIDERS: dict[str, Provider] = {p.name: p for p in (serwersms.PROVIDER, mobizon.PROVIDER)}


def provider(name: str) -> Provider | None:
    return PROVIDERS.get(name)


def build_adapter(account: Account, *, proxy_from_env: bool = False) -> ProviderAdapter:
    found = PROVIDERS.get(account.provider)
    if found is None:  # the settings admit only registered names
        raise LookupError(f"no provider named {account.provider!r}")
    return found.adapter(account, proxy_from_env=proxy_from_env)
