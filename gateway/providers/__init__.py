"""Provider adapters, one module each, behind `ProviderAdapter` (see base.py)."""

from __future__ import annotations

import hashlib

from gateway.config import Account
from gateway.providers.base import ProviderAdapter


def provider_ref(account: str, unique_id: str) -> str:
    """Deterministic provider-safe id for (account, unique_id): 32 lowercase letters and digits.

    SerwerSMS accepts [a-zA-Z0-9]{3,50}; the same request always maps to the same id, so a resend
    after a crash is recognisable at the provider and can be looked up there.
    """
    digest = hashlib.sha256(f"{account}\x00{unique_id}".encode()).hexdigest()
    return "g" + digest[:31]


def build_adapter(account: Account) -> ProviderAdapter:
    if account.provider == "serwersms":
        from gateway.providers.serwersms import SerwerSmsAdapter

        return SerwerSmsAdapter(account)
    from gateway.providers.mobizon import MobizonAdapter

    return MobizonAdapter(account)
