"""Mobizon API v1: `codes` (the tables), `api` (one call), `campaign` (bulk), `lookup`
(reconciling), `adapter` (the `ProviderAdapter`)."""

from gateway.providers.base import Provider
from gateway.providers.mobizon import webhook
from gateway.providers.mobizon.adapter import MobizonAdapter
from gateway.providers.mobizon.api import flatten, redirect_host
from gateway.providers.mobizon.codes import CODES, NAME, RECIPIENT_CODES, RECIPIENT_TABLE, TABLE, classify

__all__ = [
    "CODES",
    "NAME",
    "PROVIDER",
    "RECIPIENT_CODES",
    "RECIPIENT_TABLE",
    "TABLE",
    "MobizonAdapter",
    "classify",
    "flatten",
    "redirect_host",
]

PROVIDER = Provider(NAME, MobizonAdapter, webhook)
