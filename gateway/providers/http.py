"""The one HTTP client setup and the one place that turns transport failures into verdicts.

Whether a failed request may have reached the provider decides between RETRY (surely not sent)
and AMBIGUOUS (reconcile first):
    connect error / connect timeout / pool timeout      -> RETRY      (nothing left this process)
    HTTP 429                                            -> RETRY      (throttled before processing)
    read/write timeout, connection reset, bad response  -> AMBIGUOUS
    HTTP 5xx or any other non-2xx, body not JSON         -> AMBIGUOUS
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from gateway.providers.base import ItemResult, ProviderError, Verdict


def make_client(base_url: str, timeout_s: float, concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
        limits=httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2),
        headers={"User-Agent": "sms-gateway/0.1"},
        follow_redirects=False,
    )


def transport_failure(exc: Exception) -> ItemResult:
    """Map an httpx exception to the verdict for every item of the request."""
    surely_unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    kind = type(exc).__name__
    error = ProviderError(
        code="transport",
        type=kind,
        message=f"{kind}: request {'did not reach' if surely_unsent else 'may have reached'} the provider",
        retryable=True,
    )
    return ItemResult(Verdict.RETRY if surely_unsent else Verdict.AMBIGUOUS, error=error)


def decode_json(response: httpx.Response) -> tuple[Any, ItemResult | None]:
    """The JSON document of a response, or the failure verdict when there is none."""
    if response.status_code == 429:
        error = ProviderError("http_429", "Throttled", "provider answered HTTP 429", retryable=True)
        return None, ItemResult(Verdict.RETRY, error=error)
    if not 200 <= response.status_code < 300:
        error = ProviderError(
            f"http_{response.status_code}",
            "HttpStatus",
            f"provider answered HTTP {response.status_code}",
            retryable=True,
        )
        return None, ItemResult(Verdict.AMBIGUOUS, error=error)
    try:
        return response.json(), None
    except (json.JSONDecodeError, UnicodeDecodeError):
        error = ProviderError("bad_response", "BadResponse", "provider answer is not JSON", retryable=True)
        return None, ItemResult(Verdict.AMBIGUOUS, error=error)
