"""The one HTTP client setup and the one place that turns transport failures into verdicts.

Whether a failed request may have reached the provider decides between RETRY (surely not sent)
and AMBIGUOUS (reconcile first):
    connect error / connect timeout / pool timeout      -> RETRY      (nothing left this process)
    HTTP 429                                            -> RETRY      (throttled before processing)
    read/write timeout, connection reset, bad response  -> AMBIGUOUS
    HTTP 5xx or any other non-2xx, body not JSON         -> AMBIGUOUS
"""

from __future__ import annotations

import functools
import json
import ssl
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

# A client's first request makes httpcore import sniffio, anyio's core and anyio's asyncio backend
# (anyio loads them lazily). They are imported with this module instead, so that a first provider
# call made while the process is out of file descriptors (a flood on the web port) does not fail
# on opening a module's file. tests/unit/test_provider_pool.py checks that nothing is left over.
import anyio._backends._asyncio  # noqa: F401
import httpx
import sniffio  # noqa: F401
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, StatusCode

from gateway.obs import metrics as m
from gateway.obs import tracing
from gateway.providers.base import Action, ItemResult


@functools.cache
def tls_context(trust_env: bool) -> ssl.SSLContext:
    """The one TLS context every provider client shares (`trust_env`: SSL_CERT_FILE / SSL_CERT_DIR
    are read, as with an egress proxy). httpx builds one per client otherwise, loading the CA
    bundle each time: 0.7 MB and 24 ms an account, most of what an idle account cost."""
    return httpx.create_ssl_context(trust_env=trust_env)


def make_client(
    base_url: str, timeout_s: float, concurrency: int, *, proxy_from_env: bool = False
) -> httpx.AsyncClient:
    """`concurrency`: the most provider calls the account's adaptive limit may have in flight (its
    `max_concurrency`); the pool holds twice that, as lookups and status polls run beside the sends.
    Sized from the starting `concurrency` instead, the pool was a hidden, lower limit: at 1 it held
    2 connections for up to 12 batches, and after a reconnect their redeliveries and lookups queued
    for it until they failed with PoolTimeout (a test that sent 60 of 600 in 90 s).
    `proxy_from_env`: take HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment (an egress
    proxy); otherwise the provider URL is reached directly, with no environment lookups."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
        limits=httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2),
        headers={"User-Agent": "sms-gateway/0.1"},
        follow_redirects=False,
        trust_env=proxy_from_env,
        verify=tls_context(proxy_from_env),
    )


async def traced_post(
    client: httpx.AsyncClient,
    path: str,
    *,
    account: str,
    provider: str,
    json_body: Any = None,
    form: list[tuple[str, str]] | None = None,
    params: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST with a CLIENT span (child of the current batch span, `traceparent` passed on) and the
    provider-latency histogram. The span names the path only: query strings may hold credentials."""
    operation = urlsplit(path).path.lstrip("/").removesuffix(".json")
    started = time.perf_counter()
    attributes = {
        "http.request.method": "POST",
        "url.path": operation,
        "sms.provider": provider,
        "sms.account": account,
    }
    with tracing.tracer().start_as_current_span(
        f"POST {operation}", kind=SpanKind.CLIENT, attributes=attributes
    ) as span:
        try:
            send_headers = propagate_into(dict(headers or {}))
            content = None
            if form is not None:  # repeated and bracketed keys, in order: encode it ourselves
                content = urlencode(form).encode()
                send_headers["Content-Type"] = "application/x-www-form-urlencoded"
            response = await client.post(path, json=json_body, content=content, params=params, headers=send_headers)
        except httpx.HTTPError as exc:
            m.PROVIDER_LATENCY.labels(account, provider, operation, "transport").observe(time.perf_counter() - started)
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
        result = "ok" if response.is_success else "error"
        m.PROVIDER_LATENCY.labels(account, provider, operation, result).observe(time.perf_counter() - started)
        span.set_attribute("http.response.status_code", response.status_code)
        if not response.is_success:
            span.set_status(StatusCode.ERROR, f"HTTP {response.status_code}")
        return response


def propagate_into(headers: dict[str, str]) -> dict[str, str]:
    propagate.inject(headers)
    return headers


def transport_failure(exc: Exception) -> ItemResult:
    """Map an httpx exception to the verdict for every item of the request."""
    surely_unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    kind = type(exc).__name__
    message = f"{kind}: request {'did not reach' if surely_unsent else 'may have reached'} the provider"
    return ItemResult.failure("transport", kind, message, Action.RETRYABLE if surely_unsent else Action.AMBIGUOUS)


def decode_json(response: httpx.Response) -> tuple[Any, ItemResult | None]:
    """The JSON document of a response, or the failure verdict when there is none."""
    status = response.status_code
    if status == 429:
        return None, ItemResult.failure("http_429", "Throttled", "provider answered HTTP 429", Action.THROTTLE)
    if not 200 <= status < 300:
        return None, ItemResult.failure(
            f"http_{status}", "HttpStatus", f"provider answered HTTP {status}", Action.AMBIGUOUS
        )
    try:
        return response.json(), None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, ItemResult.failure("bad_response", "BadResponse", "provider answer is not JSON", Action.AMBIGUOUS)
